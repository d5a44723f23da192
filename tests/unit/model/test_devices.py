"""Devices: one spelling and availability check everywhere, and the CUDA paths where a GPU is
(marked ``gpu``: skipped on machines without one, such as CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mbt_core.cli.main import main
from mbt_core.devices import check_device, open_device
from mbt_core.errors import MbtError
from mbt_core.model.hf_import import ImportOptions, import_decoder
from mbt_core.model.kv import KVSlots
from mbt_core.model.sampling import SamplingConfig, generate
from mbt_core.model.tokenizer import Tokenizer
from tests.hf_models import save_hf


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", "cpu:0", ""])
def test_bad_device_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        check_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_a_missing_gpu_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(MbtError, match="no CUDA device"):
        open_device("cuda")
    assert main(["generate", "ROMEO:", "--device", "cuda", "--max-new-tokens", "2"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.fixture
def llama(tmp_path: Path, tiny_tokenizer: Tokenizer):
    save_hf("llama", tmp_path, tiny_tokenizer)
    return import_decoder(tmp_path, ImportOptions(branches=2))


@pytest.mark.gpu
def test_an_imported_model_generates_the_same_tokens_on_cuda(llama) -> None:
    cfg = SamplingConfig(max_new_tokens=12, temperature=0, stop_at_eos=False)
    prompt = llama.tokenizer.encode("Shall I compare thee")
    on_cpu = [t for t, _ in generate(llama.model, prompt, cfg)]
    on_gpu = [t for t, _ in generate(llama.model.to("cuda"), prompt, cfg)]
    assert on_gpu == on_cpu


@pytest.mark.gpu
def test_a_node_branch_batches_sessions_on_cuda_as_on_the_cpu(llama) -> None:
    """The node's path: a branch and its slot pool on the GPU, a ragged batch of sessions."""
    branch = llama.model.layers[0].branches[1]  # an attention slice: rotary, grouped-query
    lengths = [5, 2, 7]
    packed = torch.randn(sum(lengths), branch.cfg.d_model)
    outs = []
    for device in ("cpu", "cuda"):
        moved = branch.to(device)
        pool = KVSlots(branch.cfg, torch.float32, device, moved.kv_heads())
        caches = [pool.new_cache() for _ in lengths]
        with torch.no_grad():
            outs.append(moved.forward_ragged(packed.to(device), caches, lengths).cpu())
    assert torch.allclose(outs[0], outs[1], atol=1e-4)
