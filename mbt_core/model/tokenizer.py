"""Byte-level BPE tokenizer (the ``tokenizers`` library), stored inside every checkpoint.

Trained models use this module's BPE, whose end-of-text token is ``<|endoftext|>`` (id 0);
imported decoders bring their own ``tokenizer.json`` and name their end token by id.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from mbt_core.errors import TokenizerError

EOS = "<|endoftext|>"


class Tokenizer:
    """Encode and decode text; ``eos_id`` is the end-of-text token (``<|endoftext|>`` unless
    given: an imported decoder's config names its own)."""

    def __init__(self, backend: _Backend, eos_id: int | None = None) -> None:
        eos = backend.token_to_id(EOS) if eos_id is None else eos_id
        if eos is None:
            raise TokenizerError(f"tokenizer has no {EOS} token")
        self._backend = backend
        self.eos_id: int = eos

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE on ``texts``; the same texts give the same vocabulary."""
        if vocab_size < 257:
            raise ValueError(f"vocab_size must leave room for 256 bytes + {EOS}, got {vocab_size}")
        backend = _Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def from_json(cls, data: str, eos_id: int | None = None) -> Tokenizer:
        try:
            return cls(_Backend.from_str(data), eos_id)
        except Exception as exc:  # the backend raises plain Exception subclasses
            raise TokenizerError(f"cannot read tokenizer: {exc}") from exc

    def to_json(self) -> str:
        return self._backend.to_str()

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode(list(ids))


def vocabulary_problem(tokenizer: Tokenizer, vocab_size: int, padded: bool = False) -> str | None:
    """Why ``tokenizer`` cannot drive a model of ``vocab_size`` logits, or None.

    A trained model's vocabulary is its tokenizer's. A ``padded`` one (an imported decoder:
    pretrained vocabularies are padded to a round size) may have more rows than tokens, but a
    token beyond its rows could never be embedded.
    """
    n = tokenizer.vocab_size
    if n > vocab_size or (n != vocab_size and not padded):
        return f"tokenizer has {n} tokens, config says {vocab_size}"
    return None
