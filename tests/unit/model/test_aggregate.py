import pytest
import torch

from mbt_core.errors import NoBranchAvailable
from mbt_core.model.aggregate import aggregate


def _outputs(k: int = 4, rows: tuple[int, ...] = (3, 5), c: int = 8) -> torch.Tensor:
    torch.manual_seed(1)
    return 1.0 + torch.randn(k, *rows, c)  # shared offset: norms of similar size, like residuals


def test_healthy_mean_is_weighted_sum() -> None:
    z = _outputs()
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = aggregate(z, alpha).output
    expected = sum(alpha[i] * z[i] for i in range(4))
    torch.testing.assert_close(out, expected)


def test_masked_renormalization_matches_formula() -> None:
    z = _outputs()
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4])
    mask = torch.tensor([True, False, True, False])
    z[1] = float("nan")  # a masked output is never read, even if it is garbage
    result = aggregate(z, alpha, mask)
    denom = alpha[0] + alpha[2]
    expected = (alpha[0] / denom) * z[0] + (alpha[2] / denom) * z[2]
    torch.testing.assert_close(result.output, expected)
    torch.testing.assert_close(result.weights[:, 0, 0], torch.tensor([0.25, 0.0, 0.75, 0.0]))
    assert not result.rejected.any()
    torch.testing.assert_close(
        result.lost_mass(alpha), torch.full((3, 5), 0.6)
    )  # alpha_1 + alpha_3


def test_per_row_mask_renormalizes_each_row() -> None:
    z = _outputs(k=2, rows=(2,))
    alpha = torch.tensor([0.5, 0.5])
    mask = torch.tensor([[True, True], [True, False]])  # row 1 lost branch 1
    out = aggregate(z, alpha, mask).output
    torch.testing.assert_close(out[0], 0.5 * z[0, 0] + 0.5 * z[1, 0])
    torch.testing.assert_close(out[1], z[0, 1])


@pytest.mark.parametrize("mode", ["mean", "trimmed", "median"])
@pytest.mark.parametrize("bad", ["nan", "inf", "huge"])
def test_bad_branch_is_rejected_and_ignored(mode: str, bad: str) -> None:
    z = _outputs()
    alpha = torch.full((4,), 0.25)
    clean = aggregate(z[[0, 1, 3]], alpha[[0, 1, 3]], mode=mode).output
    z[2] = {"nan": float("nan"), "inf": float("inf"), "huge": 1e6}[bad]
    result = aggregate(z, alpha, mode=mode)
    assert result.rejected[2].all() and not result.rejected[[0, 1, 3]].any()
    assert torch.isfinite(result.output).all()
    torch.testing.assert_close(result.output, clean)


def test_median_is_coordinatewise_weighted_median() -> None:
    z = torch.tensor([[[1.0, 10.0]], [[2.0, 20.0]], [[9.0, -5.0]]])  # (K=3, 1, C=2)
    alpha = torch.tensor([0.2, 0.35, 0.45])
    out = aggregate(z, alpha, mode="median", norm_factor=None).output
    # coordinate 0: 1 (.2), 2 (.35), 9 (.45): half the mass is reached inside 2
    # coordinate 1: -5 (.45), 10 (.2), 20 (.35): half the mass is reached inside 10
    assert out[0].tolist() == pytest.approx([2.0, 10.0])
    out2 = aggregate(z, torch.tensor([0.2, 0.2, 0.6]), mode="median", norm_factor=None).output
    assert out2[0].tolist() == pytest.approx([9.0, -5.0])
    # equal weights, an even count of branches: the two middle values share the median
    even = aggregate(z[:2], torch.tensor([0.5, 0.5]), mode="median", norm_factor=None).output
    assert even[0].tolist() == pytest.approx([1.5, 15.0])


def test_trimmed_mean_cuts_weight_mass_from_both_tails() -> None:
    z = torch.tensor([[[0.0]], [[1.0]], [[2.0]], [[100.0]]])
    alpha = torch.full((4,), 0.25)
    out = aggregate(z, alpha, mode="trimmed", trim_fraction=0.25, norm_factor=None).output
    assert out.item() == pytest.approx(1.5)  # 0 and 100 trimmed, mean of 1 and 2
    full = aggregate(z, alpha, mode="trimmed", trim_fraction=0.0, norm_factor=None).output
    assert full.item() == pytest.approx(25.75)


def test_no_branch_left_raises_clear_error() -> None:
    z = _outputs()
    with pytest.raises(NoBranchAvailable, match="no branch left"):
        aggregate(z, torch.full((4,), 0.25), torch.zeros(4, dtype=torch.bool))
    z[:] = float("nan")
    with pytest.raises(NoBranchAvailable):
        aggregate(z, torch.full((4,), 0.25))


def test_shape_errors_are_value_errors() -> None:
    z = _outputs()
    with pytest.raises(ValueError, match="weights must have shape"):
        aggregate(z, torch.ones(3))
    with pytest.raises(ValueError, match="mask must have shape"):
        aggregate(z, torch.full((4,), 0.25), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregate(z, torch.full((4,), 0.25), mode="max")


@pytest.mark.parametrize("mode", ["mean", "trimmed", "median"])
@pytest.mark.parametrize("k", [2, 4, 5, 8])
def test_a_row_fuses_to_the_same_bits_alone_or_in_a_batch(mode: str, k: int) -> None:
    """The gateway fuses a batch of sessions' rows at once, the in-process model one
    sequence at a time: each row must come out bit for bit the same either way (a fused
    ``sum(0)`` over more than 4 branches does not promise that), healthy or masked."""
    torch.manual_seed(k)
    alpha = torch.softmax(torch.randn(k), 0)
    for n, c in ((37, 3), (64, 128), (5, 300)):
        z = torch.randn(k, n, c) * 10
        mask = torch.rand(k, n) < 0.8
        mask[0] = True  # every row keeps a branch
        for m in (None, mask):
            batch = aggregate(z, alpha, m, mode, norm_factor=None)
            for row in (0, n // 2, n - 1):
                alone_mask = None if m is None else m[:, row : row + 1]
                alone = aggregate(z[:, row : row + 1], alpha, alone_mask, mode, norm_factor=None)
                assert torch.equal(alone.output[0], batch.output[row])
                assert torch.equal(alone.weights[:, 0], batch.weights[:, row])


def test_the_healthy_path_gives_the_bits_of_the_masked_path() -> None:
    """A step with every branch in skips the mask work; a row that keeps every branch in a
    masked step (where some other row lost one) must still be fused to the same bits."""
    z, alpha = _outputs(k=6, rows=(7,), c=64), torch.softmax(torch.randn(6), 0)
    mask = torch.ones(6, 7, dtype=torch.bool)
    mask[2, 3] = False  # row 3 lost a branch; the others keep all six
    healthy, masked = aggregate(z, alpha), aggregate(z, alpha, mask)
    assert healthy.complete and not masked.complete
    keep = [r for r in range(7) if r != 3]
    assert torch.equal(healthy.output[keep], masked.output[keep])
    assert torch.equal(healthy.weights[:, keep], masked.weights[:, keep])
