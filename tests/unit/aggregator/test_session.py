"""A session's kept layer inputs, from which a node that missed positions is replayed."""

from __future__ import annotations

import pytest
import torch

from mbt_aggregator.session import LayerInputs


def test_layer_inputs_keep_every_position_for_replays() -> None:
    """Recorded steps read back exactly; a step from an earlier position (a rollback)
    replaces what followed it; growing past the first buffer keeps everything."""
    inputs = LayerInputs()
    h = torch.randn(40, 8)
    inputs.record(0, h[:5])
    for t in range(5, 30):  # one position per step, past the first buffer of 16
        inputs.record(t, h[t : t + 1])
    assert inputs.length == 30 and torch.equal(inputs[0:30], h[:30])
    redo = torch.randn(3, 8)
    inputs.record(10, redo)  # a rollback to 10: 13 positions kept
    assert inputs.length == 13
    assert torch.equal(inputs[:], torch.cat([h[:10], redo]))
    assert torch.equal(inputs[8:12], torch.cat([h[8:10], redo[:2]]))
    with pytest.raises(ValueError, match="start at 14"):
        inputs.record(14, redo)  # a hole: nothing to replay it from
