"""Calls that fit a node: a batch of session steps split into Forwards within the node's limits.

A node refuses a Forward with more session steps, positions or message bytes than its limits
(``Describe`` reports them), so the gateway never sends one: a batch is cut into calls in
order, and a step longer than a call allows (a long prompt's prefill, a replay) into chunks
that follow each other. Concatenating the calls' outputs in order gives the batch's outputs
packed as its inputs were. Pure planning: no gRPC, no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

STEP_OVERHEAD_BYTES = 256  # a step's session id (<= 128), secret (<= 64) and numbers
MESSAGE_HEADROOM_BYTES = 1 << 16  # tensor headers, branch lists, request ids


@dataclass(frozen=True)
class CallLimits:
    """What one Forward to a node may carry (from its ``Describe``; 0 there: no limit)."""

    max_steps: int = 1 << 30
    max_positions: int = 1 << 30
    max_message_bytes: int = 1 << 62

    def __post_init__(self) -> None:
        if min(self.max_steps, self.max_positions, self.max_message_bytes) <= 0:
            raise ValueError(f"call limits must be positive, got {self}")

    @classmethod
    def reported(cls, steps: int, positions: int, message_bytes: int) -> CallLimits:
        """The limits a node reported, a 0 read as "none given"."""
        default = cls()
        return cls(
            steps or default.max_steps,
            positions or default.max_positions,
            message_bytes or default.max_message_bytes,
        )

    def positions(self, width: int, itemsize: int, branches: int) -> int:
        """Positions one call may carry: the node's limit, and what fits its message size
        with the reply's ``branches`` outputs of ``width`` values of ``itemsize`` bytes."""
        room = (
            self.max_message_bytes
            - MESSAGE_HEADROOM_BYTES
            - STEP_OVERHEAD_BYTES * min(self.max_steps, 1 << 16)
        )
        by_bytes = room // (width * itemsize * max(1, branches))
        return max(1, min(self.max_positions, by_bytes))


class Piece(NamedTuple):
    step: int  # index of the step in the batch
    offset: int  # first position of the piece, counted from the step's start
    length: int


def plan_calls(lengths: list[int], max_steps: int, max_positions: int) -> list[list[Piece]]:
    """Cut steps of ``lengths`` positions into calls of at most ``max_steps`` pieces and
    ``max_positions`` positions, in order. A step is cut only where a call is full, so its
    chunks land in consecutive calls (one session appears at most once per call)."""
    if max_steps <= 0 or max_positions <= 0:
        raise ValueError("max_steps and max_positions must be positive")
    calls: list[list[Piece]] = []
    current: list[Piece] = []
    used = 0
    for i, n in enumerate(lengths):
        offset = 0
        while offset < n:
            if len(current) == max_steps or used == max_positions:
                calls.append(current)
                current, used = [], 0
            take = min(n - offset, max_positions - used)
            current.append(Piece(i, offset, take))
            used += take
            offset += take
    if current:
        calls.append(current)
    return calls


def fits(lengths: list[int], max_steps: int, max_positions: int) -> bool:
    """Whether the steps travel in one call (the usual case: checked before any planning)."""
    return len(lengths) <= max_steps and sum(lengths) <= max_positions
