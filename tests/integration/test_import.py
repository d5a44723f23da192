"""An imported pretrained decoder served by node processes and the gateway: the tokens are the
in-process model's, for a sequential (Llama: GQA, rotary, untied head) and a parallel-residual
(GPT-NeoX) family, and a missing branch is masked, not an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbt_core.cluster.local import Layout, LocalCluster
from mbt_core.model.checkpoint import load_checkpoint, save_checkpoint
from mbt_core.model.hf_import import ImportOptions, import_decoder
from mbt_core.model.sampling import SamplingConfig, generate
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.wire.gateway_client import generate_remote
from tests.hf_models import save_hf

pytestmark = pytest.mark.integration
PROMPT = "Shall I compare thee"
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0, stop_at_eos=False)


def _imported(
    tmp_path: Path, tokenizer: Tokenizer, family: str, k: int, dtype: str | None = None
) -> Path:
    folder = tmp_path / family
    folder.mkdir()
    save_hf(family, folder, tokenizer)
    ckpt = import_decoder(folder, ImportOptions(branches=k, dtype=dtype))
    out = tmp_path / f"{family}-k{k}.safetensors"
    save_checkpoint(out, ckpt.model, ckpt.tokenizer, ckpt.info)
    return out


@pytest.mark.parametrize(
    ("family", "k", "dtype"), [("llama", 2, None), ("gpt_neox", 4, None), ("qwen2", 2, "bfloat16")]
)
def test_greedy_tokens_through_nodes_equal_in_process(
    tmp_path: Path, tiny_tokenizer: Tokenizer, family: str, k: int, dtype: str | None
) -> None:
    """bfloat16 too: nodes compute in it (``--dtype auto``), the gateway fuses in float32 and
    rounds as the in-process model does, so the tokens stay exactly equal."""
    path = _imported(tmp_path, tiny_tokenizer, family, k, dtype)
    ckpt = load_checkpoint(path)
    prompt = ckpt.tokenizer.encode(PROMPT)
    local = [token for token, _ in generate(ckpt.model, prompt, GREEDY)]
    with LocalCluster(checkpoint=path, layout=Layout(nodes=2)) as cluster:
        events = list(
            generate_remote(cluster.address, PROMPT, GREEDY, credentials=cluster.credentials)
        )
        assert [e.token_id for e in events] == local
        cluster.kill_node(1)  # half the branches of every layer gone: masked, renormalized
        degraded = list(
            generate_remote(cluster.address, PROMPT, GREEDY, credentials=cluster.credentials)
        )
    assert len(degraded) == GREEDY.max_new_tokens
    # Every step renormalized the lost half away in every layer, and still produced a token.
    assert all(layer.lost_weight > 0 for e in degraded for layer in e.layers)


@pytest.mark.gpu
def test_a_gateway_and_nodes_on_cuda_give_the_in_process_tokens(
    tmp_path: Path, tiny_tokenizer: Tokenizer
) -> None:
    """``mbt-aggregator --device cuda`` (trunk, head and sampling on the GPU) and nodes on
    the GPU: greedy tokens equal the in-process model's on the GPU."""
    path = _imported(tmp_path, tiny_tokenizer, "llama", 2)
    ckpt = load_checkpoint(path)
    prompt = ckpt.tokenizer.encode(PROMPT)
    local = [token for token, _ in generate(ckpt.model.to("cuda"), prompt, GREEDY)]
    cuda = ("--device", "cuda")
    with LocalCluster(
        checkpoint=path, layout=Layout(nodes=2), node_args=cuda, gateway_args=cuda
    ) as cluster:
        events = list(
            generate_remote(cluster.address, PROMPT, GREEDY, credentials=cluster.credentials)
        )
    assert [e.token_id for e in events] == local


def test_a_restarted_node_of_an_imported_model_is_replayed(
    tmp_path: Path, tiny_tokenizer: Tokenizer
) -> None:
    """A node killed mid-generation and started again holds no keys of the session: the
    gateway replays the session's stored inputs into its rotary, grouped-query slices, and the
    branches come back unmasked."""
    path = _imported(tmp_path, tiny_tokenizer, "llama", 2)
    cfg = SamplingConfig(max_new_tokens=150, temperature=0, stop_at_eos=False)
    slow = ("--delay-ms", "20")  # a generation long enough to restart a node inside it
    with LocalCluster(checkpoint=path, layout=Layout(nodes=2), node_args=slow) as cluster:
        events = []
        for event in generate_remote(cluster.address, PROMPT, cfg, credentials=cluster.credentials):
            events.append(event)
            if event.index == 3:
                cluster.kill_node(1)
            if event.index == 6:
                cluster.restart_node(1)
        metrics = cluster.gateway_metrics()
    assert len(events) == cfg.max_new_tokens
    lost = [max(layer.lost_weight for layer in e.layers) for e in events]
    assert any(w > 0 for w in lost[4:]), "the killed node's branches were never masked"
    assert lost[-1] == 0, "the restarted node's branches did not come back"
    replays = sum(v for (name, _), v in metrics.items() if name == "mbt_cache_replays_total")
    assert replays >= 1  # its empty caches were filled from the session's stored inputs
