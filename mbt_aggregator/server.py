"""The gateway process: verify, load the trunk, find and admit nodes, serve, export metrics.

Order: the manifest is verified (signatures, expiry, rollback) and the trunk loaded, or the
process stops with a clear message; membership starts (static peers, mDNS); the gRPC gateway
and the Prometheus endpoint start, and with ``--http-listen`` the OpenAI-compatible HTTP API
(:mod:`mbt_aggregator.http_server`, in this event loop, over the same request layer) with the
live web view at its root (:mod:`mbt_aggregator.webview`); SIGTERM or SIGINT stops in
reverse order.

With TLS, the gateway reaches nodes over mutual TLS with its aggregator certificate and admits
a node only under the id its certificate proves (:mod:`mbt_aggregator.identity`); a signed
roster (``--roster``, verified like the manifest) limits which ids. Its own API is TLS, guarded
by ``--api-auth`` (:mod:`mbt_aggregator.auth`). Without TLS the gateway starts only with
``--insecure``, and one warning line at start says what that gives up.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import torch
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, start_http_server

from mbt_aggregator import webview
from mbt_aggregator.admission import Expectation
from mbt_aggregator.auth import HttpGuard, api_guards, server_credentials
from mbt_aggregator.browse import MdnsBrowser
from mbt_aggregator.chat import ChatTemplate
from mbt_aggregator.config import AggregatorConfig
from mbt_aggregator.defense import Defense
from mbt_aggregator.engine import Engine
from mbt_aggregator.expansion import Expander, Serving
from mbt_aggregator.generation import Gateway
from mbt_aggregator.http_server import HttpServer, PeerCertificates, bind
from mbt_aggregator.identity import ClusterTls
from mbt_aggregator.membership import Membership
from mbt_aggregator.metrics import Metrics
from mbt_aggregator.openai_api import OpenAiApi, ServedModel
from mbt_aggregator.registry import Registry
from mbt_aggregator.servicer import GatewayServicer
from mbt_core.artifacts.load import load_trunk, load_verified_manifest, trunk_model
from mbt_core.artifacts.manifest import manifest_digest
from mbt_core.cli.service import say, settle_heap, stop_on_signals, warn_plaintext
from mbt_core.devices import open_device
from mbt_core.trust.roster import load_roster
from mbt_core.wire.codec import DTYPES
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2 as gw
from mbt_core.wire.protocol.mbt.v1 import gateway_pb2_grpc as gw_grpc
from mbt_core.wire.server import ClientSlots, MalformedRequests, PerClientLimit
from mbt_core.wire.services import add_standard_services
from mbt_core.wire.swarm import swarm

log = logging.getLogger("mbt_aggregator")
SERVICE_NAME = gw.DESCRIPTOR.services_by_name["GatewayService"].full_name


async def run_gateway(cfg: AggregatorConfig, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    torch.set_num_threads(cfg.torch_threads)

    cluster_tls = ClusterTls.load(cfg.tls) if cfg.tls.enabled else None
    guards = api_guards(cfg.api_auth)  # reads the token file: a bad one stops the start
    trust = cfg.trust.resolve(cfg.state_file)
    manifest = load_verified_manifest(cfg.artifacts, trust, cfg.trust.threshold, cfg.state_file)
    roster = None if cfg.roster is None else load_roster(cfg.roster, trust, cfg.trust.threshold)
    if cluster_tls is None:  # after the checks that can refuse the start: one line each
        warn_plaintext("mbt-aggregator")
    trunk_files = load_trunk(cfg.artifacts, manifest)
    trunk = trunk_model(manifest, trunk_files).to(open_device(cfg.device))
    digest = manifest_digest(manifest)

    metrics = Metrics(CollectorRegistry())
    registry = Registry()
    defense = Defense(cfg.defense, manifest.norm_bounds())
    engine = Engine(trunk, registry, cfg.policy, cfg.aggregation, metrics, cfg.gather, defense)
    expectation = Expectation.from_manifest(manifest, cfg.allowed_node_ids, roster)
    membership = Membership(
        registry,
        expectation,
        metrics,
        cfg.peers,
        cfg.admit_timeout_s,
        cfg.health_interval_s,
        tls=cluster_tls,
        wire_dtype=None if cfg.wire_dtype == "auto" else DTYPES[cfg.wire_dtype],
    )
    browser = MdnsBrowser(cfg.interface, membership.offer, membership.lost) if cfg.mdns else None

    slots = ClientSlots(cfg.limits.max_requests_per_client)  # one limit for gRPC and HTTP
    per_client = PerClientLimit(slots, f"/{SERVICE_NAME}/")
    server = grpc.aio.server(
        interceptors=[*guards, MalformedRequests(), per_client],
        maximum_concurrent_rpcs=cfg.limits.max_concurrent_rpcs,
    )
    gateway = Gateway(engine, trunk_files.tokenizer, cfg.limits, metrics)
    servicer = GatewayServicer(gateway, engine, manifest, digest, cfg.policy)
    expander = Expander(
        cfg.expansion,
        cfg.artifacts,
        trust,
        cfg.trust.threshold,
        cfg.state_file,
        Serving(manifest, expectation, servicer.serve),
        engine,
        membership,
        trunk_files.tokenizer,
        metrics.registry,
    )
    servicer.expansion = lambda: expander.state
    gw_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    health = add_standard_services(server, SERVICE_NAME)
    if cluster_tls is not None:
        credentials = server_credentials(cluster_tls.material, cfg.api_auth)
        port = server.add_secure_port(cfg.listen, credentials)
    else:
        port = server.add_insecure_port(cfg.listen)
    if port == 0:
        raise OSError(f"cannot listen on {cfg.listen}")
    http = None
    if cfg.http_listen is not None:  # bound now: a taken port stops the start here
        certs = PeerCertificates()
        api = OpenAiApi(
            gateway,
            ServedModel(manifest.model_id, int(manifest.created_at.timestamp())),
            ChatTemplate.from_info(trunk_files.info),
            HttpGuard(cfg.api_auth),
            slots,
            cfg.limits,
            certs.get,
        )
        tls = cfg.tls if cluster_tls is not None else None
        app = api.app(webview.routes(lambda: swarm(servicer.status()), api.caller))
        http = HttpServer(app, bind(cfg.http_listen), tls, cfg.api_auth.mode == "cert", certs)
    httpd = None
    metrics_note = "metrics off"
    if cfg.metrics_port >= 0:
        httpd, _ = start_http_server(cfg.metrics_port, cfg.metrics_host, registry=metrics.registry)
        metrics_note = f"metrics on http://{cfg.metrics_host}:{httpd.server_port}/metrics"
    await membership.start()
    expander.start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, expander.check_now)
    if browser is not None:
        await browser.start()
    gauge_task = asyncio.create_task(_replica_gauges(engine, metrics))
    await server.start()
    if http is not None:
        await http.start()
        metrics_note += f", OpenAI API on {http.url}, web view on {http.root}"
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    host = cfg.listen.rsplit(":", 1)[0]
    transport = "mutual TLS to nodes" if cluster_tls is not None else "plaintext (--insecure)"
    settle_heap()
    print(
        f"mbt-aggregator ready: listening on {host}:{port}, {metrics_note}, model "
        f"{manifest.model_id} v{manifest.model_version} ({digest[:16]}), {transport}, "
        f"API auth {cfg.api_auth.mode}"
        + ("" if roster is None else f", roster of {len(roster)} node(s)"),
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        for service in ("", SERVICE_NAME):
            await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        gauge_task.cancel()
        await asyncio.gather(server.stop(5.0), *([http.stop()] if http is not None else []))
        await expander.stop()
        await engine.close()
        if browser is not None:
            await browser.stop()
        await membership.stop()
        if httpd is not None:
            httpd.shutdown()
    say("mbt-aggregator", "stopped")


async def _replica_gauges(engine: Engine, metrics: Metrics) -> None:
    while True:
        for s in engine.status().branches:
            metrics.live_replicas.labels(layer=str(s.layer), branch=str(s.branch)).set(
                s.live_replicas
            )
        await asyncio.sleep(1.0)
