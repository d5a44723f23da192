import dataclasses

import pytest
import torch

from mbt_core.errors import MbtError
from mbt_core.model.blocks import Branch
from mbt_core.model.config import AggregationConfig, ModelConfig
from mbt_core.model.lm import MBTLanguageModel, StepInfo


def test_branch_prefill_then_steps_equals_full_forward(tiny_config: ModelConfig) -> None:
    torch.manual_seed(0)
    branch = Branch(tiny_config).eval()
    h = torch.randn(2, 20, tiny_config.d_model)
    full = branch(h)
    cache = branch.new_cache()
    parts = [branch(h[:, :7], cache)] + [branch(h[:, t : t + 1], cache) for t in range(7, 20)]
    incremental = torch.cat(parts, dim=1)
    assert cache.length == 20
    assert (incremental - full).abs().max().item() < 1e-5


def test_branch_cache_truncate_recomputes_identically(tiny_config: ModelConfig) -> None:
    torch.manual_seed(0)
    branch = Branch(tiny_config).eval()
    h = torch.randn(1, 12, tiny_config.d_model)
    cache = branch.new_cache()
    first = branch(h, cache)
    cache.truncate(5)
    again = branch(h[:, 5:], cache)
    assert (again - first[:, 5:]).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(99)


def test_model_incremental_decoding_equals_full_forward(tiny_model: MBTLanguageModel) -> None:
    idx = torch.randint(0, tiny_model.cfg.vocab_size, (2, 30))
    with torch.no_grad():
        full = tiny_model(idx)
        cache = tiny_model.new_cache()
        steps = [tiny_model(idx[:, :10], cache=cache)]
        steps += [tiny_model(idx[:, t : t + 1], cache=cache) for t in range(10, 30)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_layer_mask_equals_model_without_that_branch(tiny_model: MBTLanguageModel) -> None:
    """Masking branch b must equal a model whose layer never had b, with alpha renormalized."""
    idx = torch.randint(0, tiny_model.cfg.vocab_size, (1, 16))
    masks = [torch.tensor([True, True]), torch.tensor([True, False, True])]
    with torch.no_grad():
        masked = tiny_model(idx, masks=masks)
        cfg2 = dataclasses.replace(tiny_model.cfg, branches=(2, 2))
        smaller = MBTLanguageModel(cfg2).eval()
        state = {
            k: v for k, v in tiny_model.state_dict().items() if "layers.1.branches.1." not in k
        }
        state = {
            k.replace("layers.1.branches.2.", "layers.1.branches.1."): v for k, v in state.items()
        }
        state["layers.1.alpha_logits"] = tiny_model.layers[1].alpha_logits[[0, 2]]
        smaller.load_state_dict(state)
        reference = smaller(idx)
    assert (masked - reference).abs().max().item() < 1e-5


def test_masked_branch_is_not_computed(tiny_model: MBTLanguageModel) -> None:
    calls: list[int] = []
    for i, b in enumerate(tiny_model.layers[0].branches):
        b.register_forward_hook(lambda *_, i=i: calls.append(i))
    info = StepInfo()
    tiny_model(
        torch.zeros(1, 4, dtype=torch.long),
        masks=[torch.tensor([False, True]), None],
        aggregation=AggregationConfig(),
        info=info,
    )
    assert calls == [1]
    assert info.layers[0].accepted[:, 0, 0].tolist() == [False, True]


def test_context_overflow_is_a_clear_error(tiny_model: MBTLanguageModel) -> None:
    too_long = torch.zeros(1, tiny_model.cfg.context_length + 1, dtype=torch.long)
    with pytest.raises(MbtError, match="exceed the context length"):
        tiny_model(too_long)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"d_model": 30, "n_heads": 4}, "divisible"),
        ({"n_layers": 3}, "branches lists 4 layers"),
        ({"branches": (4, 0, 4, 4)}, "at least one branch"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_config_validation(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(ModelConfig(), **changes)


def test_config_round_trips_through_dict() -> None:
    cfg = ModelConfig(n_layers=3, branches=(2, 4, 3))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys: bogus"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_ragged_batch_equals_each_session_alone(tiny_config: ModelConfig) -> None:
    """Sessions at different positions with different step lengths, run as one batch."""
    torch.manual_seed(0)
    branch = Branch(tiny_config).eval()
    seqs = [torch.randn(n, tiny_config.d_model) for n in (6, 11, 2, 17)]
    with torch.no_grad():
        alone = [branch(s[None])[0] for s in seqs]
        caches = [branch.new_cache() for _ in seqs]
        cuts = [3, 8, 1, 9]  # first call: a ragged prefill; second: the rest, also ragged
        first = branch.forward_ragged(
            torch.cat([s[:c] for s, c in zip(seqs, cuts, strict=True)]), caches, cuts
        )
        rest = [len(s) - c for s, c in zip(seqs, cuts, strict=True)]
        second = branch.forward_ragged(
            torch.cat([s[c:] for s, c in zip(seqs, cuts, strict=True)]), caches, rest
        )
    got = [torch.cat(p) for p in zip(first.split(cuts), second.split(rest), strict=True)]
    for a, g in zip(alone, got, strict=True):
        assert (a - g).abs().max().item() < 1e-6
    assert [c.length for c in caches] == [6, 11, 2, 17]


def test_ragged_single_session_is_bit_identical_to_cached_forward(tiny_config: ModelConfig) -> None:
    torch.manual_seed(0)
    branch = Branch(tiny_config).eval()
    h = torch.randn(1, 10, tiny_config.d_model)
    c1, c2 = branch.new_cache(), branch.new_cache()
    with torch.no_grad():
        a = torch.cat([branch(h[:, :7], c1)[0], branch(h[:, 7:], c1)[0]])
        b = torch.cat(
            [branch.forward_ragged(h[0, :7], [c2], [7]), branch.forward_ragged(h[0, 7:], [c2], [3])]
        )
    assert torch.equal(a, b)


def test_ragged_input_validation(tiny_config: ModelConfig) -> None:
    branch = Branch(tiny_config)
    cache = branch.new_cache()
    with pytest.raises(ValueError, match="do not pack"):
        branch.forward_ragged(torch.zeros(3, tiny_config.d_model), [cache], [2])
    with pytest.raises(ValueError, match="C=32"):
        branch.forward_ragged(torch.zeros(3, 7), [cache], [3])
    with pytest.raises(MbtError, match="exceed the context length"):
        branch.forward_ragged(torch.zeros(49, tiny_config.d_model), [cache], [49])


def test_per_sequence_mask_equals_each_sequence_with_its_own_mask(
    tiny_model: MBTLanguageModel,
) -> None:
    idx = torch.randint(0, tiny_model.cfg.vocab_size, (2, 9))
    row_masks = [
        torch.tensor([[True, False], [True, True]]),
        torch.tensor([[False, True], [True, True], [True, False]]),
    ]
    with torch.no_grad():
        both = tiny_model(idx, masks=row_masks)
        for s in range(2):
            alone = tiny_model(idx[s : s + 1], masks=[m[:, s] for m in row_masks])
            assert (both[s] - alone[0]).abs().max().item() < 1e-5


def test_a_block_sees_its_parameters_after_they_are_replaced() -> None:
    """Blocks gather their parameters once for speed: a conversion (``to``) or a load that
    assigns new tensors must still be what the next forward computes with."""
    cfg = ModelConfig(
        vocab_size=64, d_model=16, n_heads=2, context_length=16, n_layers=1, branches=(2,)
    )
    torch.manual_seed(0)
    model, other = MBTLanguageModel(cfg).eval(), MBTLanguageModel(cfg).eval()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        before = model(ids)
        model.load_state_dict(other.state_dict(), assign=True)
        assert torch.equal(model(ids), other(ids)) and not torch.equal(before, other(ids))
        model.to(torch.float64)
        assert model(ids).dtype == torch.float64
