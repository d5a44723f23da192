"""Real node processes on 127.0.0.1 with free ports, always cleaned up by pid.

Each test session exports one small signed model into a tmp folder (keys made there too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from mbt_core.artifacts.export import export_artifacts
from mbt_core.artifacts.signatures import sign_manifest
from mbt_core.model.checkpoint import Checkpoint
from mbt_core.model.config import ModelConfig
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.trust.keys import GeneratedKey, generate_key, load_private_key
from mbt_core.wire.protocol.mbt.v1 import branch_pb2_grpc as pb_grpc
from mbt_node.launcher import ManagedProcess, start_node


@dataclass(frozen=True)
class SignedModel:
    directory: Path
    key: GeneratedKey
    model: MBTLanguageModel
    state_dir: Path

    def artifact_args(self, state: str) -> list[str]:
        return [
            "--artifacts",
            str(self.directory),
            "--trusted-key",
            str(self.key.public_path),
            "--state-file",
            str(self.state_dir / state),
        ]

    def node_args(self, serve: str, *extra: str) -> list[str]:
        """A node of ``serve``; plaintext (``--insecure``) unless ``extra`` gives TLS files."""
        return [*self.artifact_args("state.json"), "--serve", serve, *_transport(extra)]

    def gateway_args(self, *extra: str, state: str = "gateway.json") -> list[str]:
        """A gateway on a free port with metrics on another; ``extra`` adds or overrides;
        plaintext (``--insecure``) unless ``extra`` gives TLS files."""
        listen = ["--listen", "127.0.0.1:0", "--metrics-port", "0"]
        return [*self.artifact_args(state), *listen, *_transport(extra)]


def _transport(extra: tuple[str, ...]) -> list[str]:
    """Most integration tests exercise other things than TLS on loopback: they ask for
    plaintext explicitly, as an operator must (TLS is the default)."""
    return [*extra] if "--tls-ca" in extra or "--insecure" in extra else [*extra, "--insecure"]


def make_signed_model(root: Path, cfg: ModelConfig, tokenizer: Tokenizer) -> SignedModel:
    torch.manual_seed(0)
    model = MBTLanguageModel(cfg).eval()
    key = generate_key(root / "keys", "owner")
    manifest = export_artifacts(Checkpoint(model, tokenizer), root / "artifacts")
    sign_manifest(root / "artifacts", manifest, load_private_key(key.private_path))
    (root / "state").mkdir()
    return SignedModel(root / "artifacts", key, model, root / "state")


@pytest.fixture(scope="session")
def signed_model(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer, tiny_config: ModelConfig
) -> SignedModel:
    cfg = dataclasses.replace(tiny_config, context_length=64)
    return make_signed_model(tmp_path_factory.mktemp("signed"), cfg, tiny_tokenizer)


@pytest.fixture()
def node_factory() -> Iterator[Callable[..., ManagedProcess]]:
    """Start nodes with ``node_factory(args)``; every one is killed at the end of the test."""
    started: list[ManagedProcess] = []

    def start(args: list[str], **kw: object) -> ManagedProcess:
        node = start_node(args, **kw)  # type: ignore[arg-type]
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()


@pytest.fixture()
def stub_for() -> Iterator[Callable[[ManagedProcess], pb_grpc.BranchServiceStub]]:
    channels: list[grpc.Channel] = []

    def make(node: ManagedProcess) -> pb_grpc.BranchServiceStub:
        channel = grpc.insecure_channel(node.address)
        channels.append(channel)
        return pb_grpc.BranchServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()
