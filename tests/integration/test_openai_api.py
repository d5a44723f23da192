"""The gateway's OpenAI-compatible HTTP API, used by real clients against real processes.

One cluster for the whole module (the shipped model on two TLS nodes, a gateway with bearer
tokens and HTTPS on 127.0.0.1): the official ``openai`` package completes and streams,
``curl -N`` reads the event stream, bad requests get OpenAI's errors; then the gateway restarts
in client-certificate mode, and last the nodes are killed (no quorum). The greedy text is
compared with what ``mbt generate --greedy`` prints in this process for the same model and
prompt.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import openai
import pytest

from mbt_aggregator.chat import ChatTemplate, Message
from mbt_core.artifacts.export import DEFAULT_MODEL_ID, export_artifacts
from mbt_core.artifacts.signatures import sign_manifest
from mbt_core.cli.main import main as mbt_main
from mbt_core.cluster.process import ManagedProcess, start_process
from mbt_core.model.checkpoint import Checkpoint, load_checkpoint
from mbt_core.model.tokenizer import Tokenizer
from mbt_core.trust.certs import Issued, init_ca, issue_cert
from mbt_core.trust.keys import generate_key, load_private_key
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc
from mbt_core.wire.swarm import swarm
from tests.integration.conftest import SignedModel

pytestmark = [pytest.mark.integration]
TOKEN = "openai-api-test-token-0123456789abcdef"
PROMPT = "ROMEO:"
TOKENS = 24
# Stored with the model (checkpoint info), so the chat route must use it, not the default.
TEMPLATE = ChatTemplate(system="[sys] ", user="Q: ", assistant="A: ", generation="A:", stop=("Q:",))
CHAT = [Message("system", "Answer in verse."), Message("user", "Shall I compare thee")]


@dataclass
class Api:
    model: SignedModel
    tokenizer: Tokenizer
    branches: tuple[int, ...]
    root: Path
    certs: dict[str, Issued]
    nodes: list[ManagedProcess]
    gateway: ManagedProcess
    gateway_args: list[str]
    expected: dict[str, str] = field(default_factory=dict)  # mbt generate's text per prompt

    @property
    def url(self) -> str:
        return self.gateway.ready_line.split("OpenAI API on ")[1].split(",")[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    @property
    def ca(self) -> Path:
        return self.root / "ca" / "ca.crt"

    def tls(self, cert: str | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            context.load_cert_chain(self.certs[cert].cert_path, self.certs[cert].key_path)
        return context

    def client(self, token: str | None = TOKEN, cert: str | None = None) -> openai.OpenAI:
        """The official client; no retries, so a 429 or 503 shows as it came."""
        factory = getattr(openai, "DefaultHttpx2Client", None) or openai.DefaultHttpxClient
        return openai.OpenAI(
            base_url=self.url,
            api_key=token or "none",
            max_retries=0,
            timeout=60,
            http_client=factory(verify=self.tls(cert)),
        )

    def raw(
        self, path: str, body: bytes | None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        status, _, data = self.call("POST", path, body, headers)
        return status, data

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """Status, headers and body of one request (with the token unless ``headers`` say)."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.tls(), timeout=30)
        try:
            conn.request(
                method, path, body, {"Authorization": f"Bearer {TOKEN}", **(headers or {})}
            )
            reply = conn.getresponse()
            return reply.status, reply.headers, reply.read()
        finally:
            conn.close()

    def grpc_stub(self) -> tuple[grpc.Channel, gw_grpc.GatewayServiceStub]:
        creds = grpc.ssl_channel_credentials(self.ca.read_bytes())
        channel = grpc.secure_channel(self.gateway.address, creds)
        return channel, gw_grpc.GatewayServiceStub(channel)

    def restart_gateway(self, *args: str) -> None:
        self.gateway.terminate(timeout_s=10)
        self.gateway = start_process("mbt_aggregator.cli", [*self.gateway_args, *args])


def _signed_model(root: Path, ckpt: Checkpoint) -> SignedModel:
    """The shipped model (text worth comparing), exported with a chat template in its info."""
    key = generate_key(root / "keys", "owner")
    info = {**ckpt.info, "chat_template": TEMPLATE.to_info()}
    manifest = export_artifacts(replace(ckpt, info=info), root / "artifacts")
    sign_manifest(root / "artifacts", manifest, load_private_key(key.private_path))
    (root / "state").mkdir()
    return SignedModel(root / "artifacts", key, ckpt.model, root / "state")


def _tls_args(certs: dict[str, Issued], name: str, root: Path) -> list[str]:
    c = certs[name]
    ca = root / "ca" / "ca.crt"
    return ["--tls-cert", str(c.cert_path), "--tls-key", str(c.key_path), "--tls-ca", str(ca)]


def _wait_complete(api: Api, metadata: tuple[tuple[str, str], ...], cert: str | None) -> None:
    ca = api.ca.read_bytes()
    if cert is None:
        creds = grpc.ssl_channel_credentials(ca)
    else:
        c = api.certs[cert]
        creds = grpc.ssl_channel_credentials(ca, c.key_path.read_bytes(), c.cert_path.read_bytes())
    with grpc.secure_channel(api.gateway.address, creds) as channel:
        stub = gw_grpc.GatewayServiceStub(channel)
        deadline = time.monotonic() + 30
        while True:
            status = stub.Status(gw.StatusRequest(), timeout=5, metadata=metadata)
            if status.branches and all(b.live_replicas for b in status.branches):
                return
            assert time.monotonic() < deadline, status
            time.sleep(0.1)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("openai")
    ckpt = load_checkpoint()
    model = _signed_model(root, ckpt)
    branches = ckpt.model.cfg.branches
    halves = [
        [f"{layer}:{b}" for layer, k in enumerate(branches) for b in range(k) if 2 * b // k == i]
        for i in (0, 1)
    ]
    init_ca(root / "ca")
    roles = {"node0": "node", "node1": "node", "gateway": "aggregator", "client": "client"}
    certs = {n: issue_cert(root / "ca", n, root / "certs", role=r) for n, r in roles.items()}
    (root / "token").write_text(TOKEN + "\n")
    started: list[ManagedProcess] = []
    api = None
    try:
        for i, serve in enumerate(",".join(h) for h in halves):
            args = model.node_args(serve, "--no-advertise", *_tls_args(certs, f"node{i}", root))
            started.append(start_process("mbt_node.cli", args))
        gateway_args = [
            *model.gateway_args(*_tls_args(certs, "gateway", root)),
            "--metrics-port",
            "-1",
            "--no-mdns",
            "--peers",
            ",".join(n.address for n in started),
            "--http-listen",
            "127.0.0.1:0",
            "--max-requests-per-client",
            "2",
        ]
        token_args = ["--api-auth", "token", "--api-token-file", str(root / "token")]
        gateway = start_process("mbt_aggregator.cli", [*gateway_args, *token_args])
        api = Api(model, ckpt.tokenizer, branches, root, certs, started[:], gateway, gateway_args)
        _wait_complete(api, (("authorization", f"Bearer {TOKEN}"),), None)
        yield api
    finally:
        for p in [*started, *([api.gateway] if api is not None else [])]:
            p.kill()


def mbt_generate(api: Api, prompt: str, capsys: pytest.CaptureFixture[str]) -> str:
    """What ``mbt generate PROMPT --greedy`` prints after the prompt, in this process (once
    per prompt)."""
    if prompt in api.expected:
        return api.expected[prompt]
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MBT_STATE_DIR", str(api.model.state_dir / "in-process"))
        code = _mbt_generate(api, prompt)
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(prompt) and out.endswith("\n")
    api.expected[prompt] = out[len(prompt) : -1]
    return api.expected[prompt]


def _mbt_generate(api: Api, prompt: str) -> int:
    return mbt_main(
        [
            "generate",
            prompt,
            "--artifacts",
            str(api.model.directory),
            "--trusted-key",
            str(api.model.key.public_path),
            "--greedy",
            "--max-new-tokens",
            str(TOKENS),
        ]
    )


def _check_reports(api: Api, reports: list[dict]) -> None:
    """Every token's branch report: every layer, every branch answered and used."""
    assert reports
    for r in reports:
        assert [layer["layer"] for layer in r["layers"]] == list(range(len(api.branches)))
        for layer in r["layers"]:
            assert len(layer["branches"]) == api.branches[layer["layer"]]
            assert layer["lost_weight"] == 0
            assert all(b["outcome"] == "ok" and len(b["node_id"]) == 64 for b in layer["branches"])


def test_models_lists_the_model_the_grpc_api_reports(api: Api) -> None:
    channel, stub = api.grpc_stub()
    with channel:
        status = stub.Status(
            gw.StatusRequest(), timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
    assert status.model_id == DEFAULT_MODEL_ID
    assert [m.id for m in api.client().models.list().data] == [status.model_id]


def test_greedy_completion_equals_mbt_generate(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = mbt_generate(api, PROMPT, capsys)
    assert len(expected) > 10  # the comparison means something
    client = api.client()
    whole = client.completions.create(
        model=DEFAULT_MODEL_ID, prompt=PROMPT, max_tokens=TOKENS, temperature=0
    )
    assert whole.choices[0].text == expected
    reports = whole.model_extra["mbt"]["tokens"]
    assert [r["index"] for r in reports] == list(range(len(reports)))
    _check_reports(api, reports)
    assert whole.usage.prompt_tokens == len(api.tokenizer.encode(PROMPT))
    assert whole.usage.completion_tokens == len(reports)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + len(reports)
    ended_early = len(reports) < TOKENS  # end of text
    assert whole.choices[0].finish_reason == ("stop" if ended_early else "length")

    chunks = list(
        client.completions.create(
            model=DEFAULT_MODEL_ID,
            prompt=PROMPT,
            max_tokens=TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    token_chunks = [c for c in chunks if c.model_extra.get("mbt")]
    assert [c.model_extra["mbt"]["token_id"] for c in token_chunks] == [
        r["token_id"] for r in reports
    ]
    _check_reports(api, [c.model_extra["mbt"] for c in token_chunks])


def test_greedy_chat_uses_the_stored_template(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = TEMPLATE.render(CHAT)
    assert prompt == "[sys] Answer in verse.\nQ: Shall I compare thee\nA:"
    expected = mbt_generate(api, prompt, capsys).split("Q:")[0]  # the template's stop
    messages = [{"role": m.role, "content": m.content} for m in CHAT]
    client = api.client()
    whole = client.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=messages, max_tokens=TOKENS, temperature=0
    )
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected
    assert whole.usage.prompt_tokens == len(api.tokenizer.encode(prompt))
    _check_reports(api, whole.model_extra["mbt"]["tokens"])
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=messages, max_tokens=TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # not asked for


def test_stop_cuts_the_text_streamed_or_not(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    expected = mbt_generate(api, PROMPT, capsys)
    # Three characters from inside the text, first seen there.
    at = next(i for i in range(6, len(expected)) if expected.find(expected[i : i + 3]) == i)
    stop, cut = expected[at : at + 3], expected[:at]
    client = api.client()
    whole = client.completions.create(
        model=DEFAULT_MODEL_ID, prompt=PROMPT, max_tokens=TOKENS, temperature=0, stop=[stop, "@@"]
    )
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (cut, "stop")
    assert whole.usage.completion_tokens < TOKENS  # the generation stopped there
    chunks = list(
        client.completions.create(
            model=DEFAULT_MODEL_ID,
            prompt=PROMPT,
            max_tokens=TOKENS,
            temperature=0,
            stop=stop,
            stream=True,
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_is_seeded(api: Api) -> None:
    client = api.client()

    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model=DEFAULT_MODEL_ID,
                prompt=PROMPT,
                max_tokens=12,
                temperature=1.0,
                top_p=0.9,
                seed=seed,
            )
            .choices[0]
            .text
        )

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_curl_streams_server_sent_events(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    expected = mbt_generate(api, PROMPT, capsys)
    body = {"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "stream": True}
    result = subprocess.run(
        [
            "curl", "-N", "-sS", "--fail-with-body", "--max-time", "60",
            "--cacert", str(api.ca),
            "-H", f"Authorization: Bearer {TOKEN}",
            "-H", "Content-Type: application/json",
            "-d", json.dumps(body),
            f"{api.url}/completions",
        ],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.endswith("data: [DONE]\n\n")
    events = result.stdout.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert all(c["object"] == "text_completion" and c["model"] == DEFAULT_MODEL_ID for c in chunks)


def _status_error(call: object, kind: type[openai.APIStatusError]) -> dict:
    with pytest.raises(kind) as caught:
        call()  # type: ignore[operator]
    error = caught.value.body
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def test_bad_requests_get_openai_errors(api: Api) -> None:
    client = api.client()
    completions = client.completions.create

    def ask(**kw: object) -> object:
        return lambda: completions(**{"model": DEFAULT_MODEL_ID, "prompt": PROMPT, **kw})

    assert "n=1" in _status_error(ask(n=2), openai.BadRequestError)["message"]
    error = _status_error(ask(max_tokens=-3), openai.BadRequestError)
    assert error["param"] == "max_tokens" and error["type"] == "invalid_request_error"
    # The gateway's own checks and messages (the same as over gRPC):
    over = _status_error(ask(max_tokens=100_000), openai.BadRequestError)["message"]
    assert over == "max_new_tokens 100000 exceeds the limit of 512"
    cold = _status_error(ask(temperature=-1), openai.BadRequestError)["message"]
    assert cold == "temperature must be finite and >= 0, got -1.0"
    assert "prompt is empty" in _status_error(ask(prompt=""), openai.BadRequestError)["message"]
    assert _status_error(ask(stop=[""]), openai.BadRequestError)["param"] == "stop"
    assert _status_error(ask(max_tokens="many"), openai.BadRequestError)["param"] == "max_tokens"
    missing = _status_error(ask(model="gpt-4"), openai.NotFoundError)
    assert missing["code"] == "model_not_found"
    chat = client.chat.completions.create
    bad_role = lambda: chat(model=DEFAULT_MODEL_ID, messages=[{"role": "tool", "content": "x"}])  # noqa: E731
    assert _status_error(bad_role, openai.BadRequestError)["param"] == "messages"
    for token in (None, "wrong-token-0123456789abcdef0123"):
        other = api.client(token=token).completions.create
        error = _status_error(
            lambda o=other: o(model=DEFAULT_MODEL_ID, prompt=PROMPT), openai.AuthenticationError
        )  # type: ignore[misc]
        assert error["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        api.client(token=None).models.list()
    # Raw HTTP: what no SDK sends.
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000):
        status, reply = api.raw("/v1/completions", body, {"Content-Type": "application/json"})
        assert status == 400, reply
        assert json.loads(reply)["error"]["type"] == "invalid_request_error"
    status, reply = api.raw("/v1/nowhere", b"{}")
    assert status == 404 and "error" in json.loads(reply)
    status, reply = api.raw("/v1/models", b"{}")  # a POST
    assert status == 405 and "error" in json.loads(reply)
    # The gateway took none of it badly.
    assert completions(model=DEFAULT_MODEL_ID, prompt=PROMPT, max_tokens=2).usage.completion_tokens


def _open_stream(api: Api) -> http.client.HTTPSConnection:
    """A long stream, read up to its first token: the request is running."""
    conn = http.client.HTTPSConnection("127.0.0.1", api.port, context=api.tls(), timeout=30)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 512, "stream": True})
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {TOKEN}"})
    reply = conn.getresponse()
    assert reply.status == 200
    assert reply.read(6) == b"data: "
    return conn


def test_the_per_client_limit_is_a_429_shared_with_grpc(api: Api) -> None:
    client = api.client()
    streams = [_open_stream(api) for _ in range(2)]  # the gateway's --max-requests-per-client
    try:
        error = _status_error(
            lambda: client.completions.create(model=DEFAULT_MODEL_ID, prompt=PROMPT),
            openai.RateLimitError,
        )
        assert "per-client limit" in error["message"]
        channel, stub = api.grpc_stub()  # the same token over gRPC: the same client
        with channel, pytest.raises(grpc.RpcError) as caught:
            request = gw.GenerateRequest(prompt=PROMPT, max_new_tokens=2)
            list(
                stub.Generate(request, timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),))
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for conn in streams:
            conn.close()
    # Gone clients give their places back (at their next token).
    deadline = time.monotonic() + 10
    while True:
        try:
            client.completions.create(model=DEFAULT_MODEL_ID, prompt=PROMPT, max_tokens=2)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the closed streams kept their places"
            time.sleep(0.2)


def test_web_view_page_is_open_and_the_swarm_behind_the_token(api: Api) -> None:
    """The page (no data in it) loads without the token, so that one can be typed in; the
    swarm it shows needs the token, and is the gRPC Status's (what ``mbt status`` prints)."""
    status, headers, page = api.call("GET", "/", headers={"Authorization": ""})
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<script src="/web/view.js"' in page
    assert "default-src 'self'" in headers["Content-Security-Policy"]  # no inline script
    status, headers, script = api.call("GET", "/web/view.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"/mbt/swarm" in script and b"/v1/completions" in script
    status, _, body = api.call("GET", "/web/index.py")
    assert status == 404 and "no such file" in json.loads(body)["error"]["message"]

    status, _, body = api.call("GET", "/mbt/swarm", headers={"Authorization": ""})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    status, headers, body = api.call("GET", "/mbt/swarm")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    shown = json.loads(body)
    channel, stub = api.grpc_stub()
    with channel:
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        told = swarm(stub.Status(gw.StatusRequest(), timeout=5, metadata=metadata))
    assert shown["model"] == told["model"] and shown["model"]["id"] == DEFAULT_MODEL_ID
    assert {(n["node_id"], n["address"], n["healthy"]) for n in shown["nodes"]} == {
        (n["node_id"], n["address"], n["healthy"]) for n in told["nodes"]
    }
    assert {n["address"] for n in shown["nodes"]} == {n.address for n in api.nodes}
    assert [
        [(b["branch"], b["weight"], b["live_replicas"], b["nodes"]) for b in layer["branches"]]
        for layer in shown["layers"]
    ] == [
        [(b["branch"], b["weight"], b["live_replicas"], b["nodes"]) for b in layer["branches"]]
        for layer in told["layers"]
    ]
    assert [len(layer["branches"]) for layer in shown["layers"]] == list(api.branches)


def test_client_certificate_mode_is_https_with_the_grpc_rules(api: Api) -> None:
    api.restart_gateway("--api-auth", "cert")
    _wait_complete(api, (), "client")
    assert api.url.startswith("https://")
    assert [m.id for m in api.client(cert="client").models.list().data] == [DEFAULT_MODEL_ID]
    reply = api.client(cert="client").completions.create(
        model=DEFAULT_MODEL_ID, prompt=PROMPT, max_tokens=3, temperature=0
    )
    assert reply.usage.completion_tokens == 3
    denied = _status_error(api.client(cert="node0").models.list, openai.PermissionDeniedError)
    assert "node certificate may not" in denied["message"]
    with pytest.raises(openai.APIConnectionError):  # no certificate: the handshake fails
        api.client().models.list()


def test_no_quorum_is_a_503_streamed_or_not(api: Api) -> None:
    """Last: it kills the nodes."""
    for node in api.nodes:
        node.kill()
    client = api.client(cert="client")
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(
                model=DEFAULT_MODEL_ID, prompt=PROMPT, max_tokens=3, stream=stream
            )
        assert caught.value.status_code == 503
        assert caught.value.body["code"] == "no_quorum"
