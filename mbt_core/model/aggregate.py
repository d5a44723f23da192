"""Fusing a layer's branch outputs: one pure function shared by every caller.

The in-process model and the aggregator gateway both call :func:`aggregate`, so a healthy
distributed step and an in-process step compute bit-for-bit the same thing.

With weights ``alpha`` and a mask ``m`` (a missing branch, or an output rejected as non-finite
or oversized), the fused output is ``sum_i alpha~_i z_i`` with
``alpha~_i = m_i alpha_i / sum_j m_j alpha_j``. Masks and rejection work per row (one token
position of one sequence), so one bad position does not discard a branch's whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from mbt_core.errors import NoBranchAvailable

MODES = ("mean", "trimmed", "median")
_MEDIAN_HALF_WINDOW = 1e-9  # the median is the weighted quantile window [0.5 - w, 0.5 + w]


@dataclass(frozen=True)
class Aggregated:
    """Fused output plus what happened to every branch, for metrics and per-token info.

    ``weights``, ``accepted`` and ``rejected`` have shape ``(K, *rows)`` where ``rows`` are the
    leading dimensions of one branch output (everything but the last). They are built when
    first read: a healthy step of the gateway reads only ``output`` and ``complete``.
    """

    output: Tensor  # (*rows, C)
    complete: bool  # every branch was present and used on every row
    shape: tuple[int, ...]  # (K, *rows)
    _weights: Tensor = field(repr=False)  # (K, N), or (K, 1) when complete
    _valid: Tensor = field(repr=False)  # (K, N) used
    _present: Tensor | None = field(repr=False)  # (K, N); None: all present

    @cached_property
    def weights(self) -> Tensor:
        """Renormalized alpha~, zero where not accepted."""
        return self._weights.expand(self._valid.shape).reshape(self.shape)

    @cached_property
    def accepted(self) -> Tensor:
        """bool: used in the fused output."""
        return self._valid.reshape(self.shape)

    @cached_property
    def rejected(self) -> Tensor:
        """bool: present but refused (non-finite or norm beyond the bound)."""
        refused = ~self._valid if self._present is None else self._present & ~self._valid
        return refused.reshape(self.shape)

    def lost_mass(self, alpha: Tensor) -> Tensor:
        """Weight mass renormalized away per row: ``1 - sum_i m_i alpha_i``."""
        shape = (-1,) + (1,) * (self.accepted.dim() - 1)
        kept = (alpha.reshape(shape).to(self.weights.dtype) * self.accepted).sum(0)
        return 1.0 - kept


def aggregate(
    outputs: Tensor,
    weights: Tensor,
    mask: Tensor | None = None,
    mode: str = "mean",
    *,
    norm_factor: float | None = 8.0,
    trim_fraction: float = 0.25,
) -> Aggregated:
    """Fuse ``outputs`` of shape ``(K, *rows, C)`` with branch weights ``weights`` ``(K,)``.

    ``mask`` is ``(K,)`` or ``(K, *rows)`` booleans, True where the branch answered; masked
    outputs may hold anything (zeros, stale data, NaN) and are never read. Present outputs are
    rejected when they hold NaN/Inf or, with ``norm_factor``, when their norm exceeds
    ``norm_factor`` times the lower median norm of the row's other valid outputs.

    Modes: ``mean`` (weighted mean), ``trimmed`` (coordinate-wise weighted mean after cutting
    ``trim_fraction`` of weight mass from each tail), ``median`` (coordinate-wise weighted
    median). Raises :class:`NoBranchAvailable` when a row has no usable branch left.
    """
    if mode not in MODES:
        raise ValueError(f"aggregation mode must be one of {MODES}, got {mode!r}")
    if outputs.dim() < 2:
        raise ValueError(f"outputs must have shape (K, ..., C), got {tuple(outputs.shape)}")
    k = outputs.shape[0]
    if weights.shape != (k,):
        raise ValueError(f"weights must have shape ({k},), got {tuple(weights.shape)}")
    rows = outputs.shape[1:-1]
    rows = outputs.shape[1:-1]
    z = outputs.reshape(k, -1, outputs.shape[-1])  # (K, N, C)
    n = z.shape[1]
    present = None if mask is None else _row_mask(mask, k, rows, n, z.device)  # (K, N)
    valid, complete = _finite_rows(z)
    if present is not None:
        valid &= present
        complete = complete and bool(present.all())
    if norm_factor is not None:
        norms = torch.linalg.vector_norm(z.float(), dim=-1)  # (K, N)
        valid &= norms <= norm_factor * _lower_median(norms, valid)
        complete = complete and bool(valid.all())
    alpha = weights if weights.dtype == z.dtype else weights.to(z.dtype)
    # Both paths give a row the same bits: the healthy one only skips what changes nothing
    # there (weights times one, zeroing nothing).
    if complete:
        total = _ordered_sum(alpha)
        if not total.item() > 0:
            raise NoBranchAvailable("the branches left to aggregate all carry zero weight")
        w = (alpha / total)[:, None]  # (K, 1): the same for every row
    else:
        w = alpha[:, None] * valid  # (K, N)
        total = _ordered_sum(w)  # (N,)
        if not bool((total > 0).all()):  # one check; the reason only if it fails
            if not bool(valid.any(0).all()):
                count = k if present is None else int(present.sum(0).min())
                raise NoBranchAvailable(
                    f"no branch left to aggregate: {count} present, "
                    "all masked or rejected (non-finite or norm beyond bound)"
                )
            raise NoBranchAvailable("the branches left to aggregate all carry zero weight")
        w = w / total
        z = z.masked_fill(~valid[..., None], 0.0)  # masked outputs may hold anything (NaN)

    if mode == "mean":
        fused = _weighted_sum(w, z)
    elif mode == "trimmed":
        fused = _quantile_mean(z, w.expand(k, n), trim_fraction, 1.0 - trim_fraction)
    else:
        lo, hi = 0.5 - _MEDIAN_HALF_WINDOW, 0.5 + _MEDIAN_HALF_WINDOW
        fused = _quantile_mean(z, w.expand(k, n), lo, hi)
    return Aggregated(
        output=fused.reshape(*rows, z.shape[-1]),
        complete=complete,
        shape=(k, *rows),
        _weights=w,
        _valid=valid,
        _present=present,
    )


def _row_mask(mask: Tensor, k: int, rows: torch.Size, n: int, device: torch.device) -> Tensor:
    mask = mask.to(device=device, dtype=torch.bool)
    if mask.shape == (k,):
        return mask[:, None].expand(k, n)
    if mask.shape == (k, *rows):
        return mask.reshape(k, n)
    raise ValueError(f"mask must have shape ({k},) or {(k, *rows)}, got {tuple(mask.shape)}")


def _ordered_sum(t: Tensor) -> Tensor:
    """The sum over dim 0, added up in order, one slice at a time.

    Each element then comes out the same whatever the other rows are (elementwise ops only).
    A fused reduction does not promise that: beyond 4 branches ``t.sum(0)`` rounds some rows
    differently depending on the batch around them, and the gateway fuses batches of
    sessions that the in-process model fuses one at a time.
    """
    parts = t.unbind(0)
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


def _weighted_sum(w: Tensor, z: Tensor) -> Tensor:
    """``sum_k w[k, n] z[k, n, :]`` (N, C), in the order of :func:`_ordered_sum`. ``einsum``
    gives these very bits, but runs a tiny matrix product per row: over five times slower
    for a batch of 32 rows."""
    return _ordered_sum(z * w[..., None])


def _finite_rows(z: Tensor) -> tuple[Tensor, bool]:
    """(K, N): whether each row of ``z`` (K, N, C) holds only finite values; and whether all
    do. A finite row sum proves its row finite (NaN and Inf propagate into it), so the exact
    check, many times slower, runs only when some sum is not finite (a NaN/Inf, or finite
    values that overflow)."""
    finite = torch.isfinite(z.sum(-1))
    if bool(finite.all()):
        return finite, True
    finite = torch.isfinite(z).all(-1)
    return finite, bool(finite.all())


def _lower_median(values: Tensor, valid: Tensor) -> Tensor:
    """Lower median over K of ``values`` (K, N), counting only ``valid`` entries."""
    ordered = values.masked_fill(~valid, float("inf")).sort(0).values
    index = (valid.sum(0, keepdim=True) - 1).clamp_(min=0) // 2  # (1, N)
    return ordered.gather(0, index)[0]


def _quantile_mean(z: Tensor, w: Tensor, lo: float, hi: float) -> Tensor:
    """Per coordinate, the weighted mean of the values whose weight mass lies in [lo, hi].

    Values are sorted per coordinate; each one owns the interval of cumulative weight it spans,
    and counts with the length of that interval's overlap with [lo, hi]. Zero-weight (masked)
    values own empty intervals and so never count.
    """
    values, order = z.sort(0)  # (K, N, C)
    ws = w[..., None].expand_as(z).gather(0, order).double()
    upper = ws.cumsum(0)
    lower = upper - ws
    share = (upper.clamp(max=hi) - lower.clamp(min=lo)).clamp(min=0.0)
    share = share / _ordered_sum(share)
    return _ordered_sum(share * values.double()).to(z.dtype)
