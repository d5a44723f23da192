import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from mbt_core.errors import CheckpointError
from mbt_core.model.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer


def test_round_trip_is_bit_exact(tiny_checkpoint: Path, tiny_model: MBTLanguageModel) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    assert ckpt.model.cfg == tiny_model.cfg
    assert ckpt.info == {"origin": "test"}
    original = tiny_model.state_dict()
    for name, tensor in ckpt.model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    idx = torch.randint(0, tiny_model.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(ckpt.model(idx), tiny_model(idx))


def test_save_is_atomic_and_leaves_no_temporary_files(tiny_checkpoint: Path) -> None:
    assert [p.name for p in tiny_checkpoint.parent.iterdir()] == [tiny_checkpoint.name]


@pytest.mark.parametrize("keep", [0, 5, 100, -50])
def test_truncated_checkpoint_gives_clear_error(tiny_checkpoint: Path, keep: int) -> None:
    data = tiny_checkpoint.read_bytes()
    tiny_checkpoint.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=f"{tiny_checkpoint}: not a valid checkpoint"):
        load_checkpoint(tiny_checkpoint)


def test_corrupted_header_gives_clear_error(tiny_checkpoint: Path) -> None:
    data = bytearray(tiny_checkpoint.read_bytes())
    data[10] = ord("#")  # inside the JSON header
    tiny_checkpoint.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(tiny_checkpoint)):
        load_checkpoint(tiny_checkpoint)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: cannot read"):
        load_checkpoint(tmp_path / "nope.safetensors")


def _rewrite(path: Path, tensors: dict[str, torch.Tensor], **meta_changes: str) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    path.write_bytes(st_save(tensors, metadata=meta))


def test_wrong_version_and_format_are_refused(
    tiny_checkpoint: Path, tiny_model: MBTLanguageModel
) -> None:
    tensors = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    _rewrite(tiny_checkpoint, tensors, format_version="99")
    with pytest.raises(CheckpointError, match="format version '99'"):
        load_checkpoint(tiny_checkpoint)
    _rewrite(tiny_checkpoint, tensors, format_version="1", format="other")
    with pytest.raises(CheckpointError, match="not an MBT checkpoint"):
        load_checkpoint(tiny_checkpoint)


def test_shape_mismatch_is_refused_with_tensor_name(
    tiny_checkpoint: Path, tiny_model: MBTLanguageModel
) -> None:
    tensors = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    tensors["layers.0.alpha_logits"] = torch.zeros(5)
    _rewrite(tiny_checkpoint, tensors)
    with pytest.raises(CheckpointError, match=r"layers\.0\.alpha_logits is torch.float32 \(5,\)"):
        load_checkpoint(tiny_checkpoint)
    del tensors["layers.0.alpha_logits"]
    _rewrite(tiny_checkpoint, tensors)
    with pytest.raises(CheckpointError, match=r"missing: layers\.0\.alpha_logits"):
        load_checkpoint(tiny_checkpoint)


def test_config_and_tokenizer_mismatch_is_refused(
    tiny_checkpoint: Path, tiny_model: MBTLanguageModel
) -> None:
    tensors = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    cfg = tiny_model.cfg.to_dict() | {"vocab_size": 999}
    _rewrite(tiny_checkpoint, tensors, config=json.dumps(cfg))
    with pytest.raises(CheckpointError, match="tokenizer has 300 tokens, config says 999"):
        load_checkpoint(tiny_checkpoint)
    assert FORMAT == "mbt-checkpoint"


def test_save_refuses_tokenizer_model_mismatch(
    tmp_path: Path, tiny_model: MBTLanguageModel
) -> None:
    other = Tokenizer.train(["a b c d e f g " * 50], vocab_size=270)
    with pytest.raises(CheckpointError, match="tokenizer has"):
        save_checkpoint(tmp_path / "x.safetensors", tiny_model, other)
    assert not (tmp_path / "x.safetensors").exists()
