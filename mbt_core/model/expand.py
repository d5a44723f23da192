"""Grow layers of a trained model by new branches, every old weight left as it was (issue 18).

The grown model keeps the old model's trunk, branches and alpha logits bit for bit and adds
``add`` branches to each grown layer. A sliced layer keeps its slice count (the config's
``split``), so the new branches have the old ones' shape and every old branch computes exactly
what it did: its artifact file, and hash, stay the same, which lets a serving gateway take the
new branches in while nodes keep the old ones. Only the new branches and the new alpha logits
then train (:func:`freeze_for_growth`); the old logits stay frozen too, so the base model's
weights are recoverable from the grown one (see ``mbt_core.artifacts.manifest.Expansion``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from mbt_core.model.blocks import Branch
from mbt_core.model.config import ModelConfig
from mbt_core.model.lm import MBTLanguageModel, init_weights

INITS = ("copy", "fresh")
DEFAULT_NOISE = 0.05  # of each tensor's std: breaks a copy's symmetry, keeps what it learned


def grown_branches(branches: Sequence[int], layers: Sequence[int], add: int) -> tuple[int, ...]:
    """``branches`` with ``add`` more on each of ``layers``; refuses what cannot be grown."""
    if add <= 0:
        raise ValueError(f"--add must be a positive number of branches, got {add}")
    if not layers:
        raise ValueError("name at least one layer to grow")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {list(layers)} name a layer twice")
    for li in layers:
        if not 0 <= li < len(branches):
            raise ValueError(
                f"layer {li} does not exist (the model has layers 0..{len(branches) - 1})"
            )
    return tuple(k + add if li in layers else k for li, k in enumerate(branches))


def expand_model(
    model: MBTLanguageModel,
    layers: Sequence[int],
    add: int,
    *,
    init: str = "copy",
    noise: float = DEFAULT_NOISE,
    seed: int = 0,
) -> MBTLanguageModel:
    """A new model: ``model`` with ``add`` new branches on each of ``layers``.

    ``init="copy"``: new branch j of a layer copies the layer's old branch of j-th largest
    alpha (cycling when ``add`` exceeds K), plus Gaussian noise of ``noise`` times each
    tensor's std. Distinct sources keep the new branches as different from each other as the
    old ones are (two copies of one branch would start as one path of double weight), and the
    most-weighted first because they carry most of what the layer does. ``init="fresh"``: as
    :func:`~mbt_core.model.lm.init_weights` initializes a new model. Either way a new branch's
    alpha logit starts at the mean old logit of its layer: each new branch weighs what an
    average old one does, so the new mass B starts at about ``add / (K + add)``.
    """
    if init not in INITS:
        raise ValueError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    base = model.cfg
    split = tuple(base.slices(li) for li in range(base.n_layers))
    cfg = replace(base, branches=grown_branches(base.branches, layers, add), split=split)
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for li in sorted(set(layers)):
        old = model.layers[li]
        logits = old.alpha_logits.detach()
        order = torch.argsort(logits.float(), descending=True, stable=True).tolist()
        for j in range(add):
            b = base.branches[li] + j
            if init == "copy":
                new = _noisy_copy(old.branches[order[j % len(order)]], noise, gen)
            else:
                new = _fresh(cfg, li, gen)
            state.update({f"layers.{li}.branches.{b}.{k}": v for k, v in new.items()})
        start = logits.float().mean().to(logits.dtype).expand(add)
        state[f"layers.{li}.alpha_logits"] = torch.cat([logits.clone(), start])
    with torch.device("meta"):
        grown = MBTLanguageModel(cfg)
    grown.load_state_dict(state, strict=True, assign=True)
    grown.train(model.training)
    return grown


def _noisy_copy(branch: Branch, noise: float, gen: torch.Generator) -> dict[str, Tensor]:
    out = {}
    for name, p in branch.state_dict().items():
        wide = p.detach().float()
        std = float(wide.std()) if wide.numel() > 1 else 0.0
        jitter = torch.randn(wide.shape, generator=gen) * (noise * std)
        out[name] = (wide + jitter).to(p.dtype)
    return out


def _fresh(cfg: ModelConfig, layer: int, gen: torch.Generator) -> dict[str, Tensor]:
    branch = Branch(cfg, layer)
    init_weights(branch, cfg, gen)
    return {k: v.detach() for k, v in branch.state_dict().items()}


def new_branch_mass(model: MBTLanguageModel, base_branches: Sequence[int]) -> list[float]:
    """B per layer: the alpha mass of the branches beyond ``base_branches`` (0 if none)."""
    return [
        float(layer.weights().detach()[b:].sum())
        for layer, b in zip(model.layers, base_branches, strict=True)
    ]


def freeze_for_growth(model: MBTLanguageModel, base_branches: Sequence[int]) -> int:
    """Freeze all but the branches beyond ``base_branches[l]`` and those layers' new alpha
    logits; returns how many values still train.

    A layer's logits are one tensor, so the old entries are held by a gradient hook that zeroes
    their gradient: with no weight decay on the logits (the training loop decays only matrices)
    the optimizer then leaves them bit for bit as they were.
    """
    if len(base_branches) != len(model.layers):
        raise ValueError(f"base_branches {list(base_branches)} do not list every layer")
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    for layer, base in zip(model.layers, base_branches, strict=True):
        k = len(layer.branches)
        if not 1 <= base <= k:
            raise ValueError(f"a layer of {k} branches cannot have grown from {base}")
        if base == k:
            continue
        for branch in layer.branches[base:]:
            for p in branch.parameters():
                p.requires_grad_(True)
                count += p.numel()
        keep = torch.arange(k) >= base
        layer.alpha_logits.requires_grad_(True)
        layer.alpha_logits.register_hook(_zero_outside(keep))  # type: ignore[no-untyped-call]
        count += k - base
    return count


def _zero_outside(keep: Tensor) -> Callable[[Tensor], Tensor]:
    """A gradient hook: the gradient where ``keep``, zero elsewhere."""
    return lambda grad: torch.where(keep.to(grad.device), grad, 0.0)


def changed_parameters(base: MBTLanguageModel, grown: MBTLanguageModel) -> list[str]:
    """The names of ``base``'s tensors that ``grown`` does not hold bit for bit (the old alpha
    logits compared entry by entry): empty after a correct expansion and training."""
    grown_state = grown.state_dict()
    changed = []
    for name, old in base.state_dict().items():
        new = grown_state.get(name)
        if new is not None and name.endswith("alpha_logits"):
            new = new[: old.numel()]
        if new is None or not _same_bits(old, new):
            changed.append(name)
    return changed


def _same_bits(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return torch.equal(bits[0], bits[1])
