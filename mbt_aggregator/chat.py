"""Chat messages into one prompt: the template a model is served with.

A model may carry its template in its checkpoint's ``info`` under ``chat_template`` (a JSON
object with the fields of :class:`ChatTemplate`); ``info`` travels inside the trunk artifact,
whose hash the signed manifest lists, so the template is as trusted as the weights and no
artifact format changes for it. Without one (the shipped model, a base model) the plain
default below is used: it is the kind of dialogue a model trained on scripts continues.
Templates are plain strings, not Jinja: nothing in a model file is ever executed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

INFO_KEY = "chat_template"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class ChatTemplate:
    """Each message becomes ``<role prefix><content><end>``; ``generation`` follows the last
    one, and the model's answer is cut at any of ``stop`` (where the next turn would begin)."""

    system: str = "System: "
    user: str = "User: "
    assistant: str = "Assistant: "
    end: str = "\n"
    generation: str = "Assistant:"
    stop: tuple[str, ...] = ("\nUser:",)

    def __post_init__(self) -> None:
        texts = [getattr(self, f.name) for f in fields(self) if f.name != "stop"]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("chat template fields must be strings")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("chat template stop must be a list of non-empty strings")

    def render(self, messages: Sequence[Message]) -> str:
        prefix = {"system": self.system, "user": self.user, "assistant": self.assistant}
        turns = "".join(prefix[m.role] + m.content + self.end for m in messages)
        return turns + self.generation

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> ChatTemplate:
        """The template a model's ``info`` carries, else the default; a malformed one is a
        ``ValueError`` (the model's owner signed a mistake: say so at start)."""
        raw = info.get(INFO_KEY)
        if raw is None:
            return cls()
        try:
            data = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            known = {f.name for f in fields(cls)}
            if set(data) - known:
                raise ValueError(f"unknown fields {sorted(set(data) - known)}")
            if "stop" in data:
                if not isinstance(data["stop"], list):
                    raise ValueError("stop must be a list")
                data["stop"] = tuple(data["stop"])
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"the model's {INFO_KEY} is malformed: {exc}") from exc

    def to_info(self) -> str:
        """The ``info`` value that stores this template with a model."""
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, sort_keys=True)
