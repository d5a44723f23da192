"""The node process: serve gRPC (with health and reflection), load, advertise, drain.

Order of events: the server starts answering at once with health NOT_SERVING; the manifest is
verified and the served branches are loaded (a failure stops the process with a clear
message); health turns SERVING and the node is advertised. On SIGTERM or SIGINT: health
NOT_SERVING, mDNS unregistered, in-flight calls finished within the grace period, exit 0.

With TLS (the default: without it the node starts only with ``--insecure``) the port speaks
mutual TLS only (:mod:`mbt_node.tls`): callers need a certificate from the cluster CA, and only
the gateway's (role aggregator) may call ``BranchService``; health checks accept any cluster
certificate. With ``--insecure`` one warning line at start says what that gives up.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import start_http_server

from mbt_core.cli.service import say, settle_heap, stop_on_signals, warn_plaintext
from mbt_core.wire.contract import format_branches
from mbt_core.wire.protocol.mbt.v1 import branch_pb2 as pb
from mbt_core.wire.protocol.mbt.v1 import branch_pb2_grpc as pb_grpc
from mbt_core.wire.server import MalformedRequests
from mbt_core.wire.services import Health, add_standard_services
from mbt_node.advertise import Advertiser
from mbt_node.config import NodeConfig
from mbt_node.metrics import NodeMetrics
from mbt_node.runtime import NodeRuntime, load_runtime, verify_manifest
from mbt_node.servicer import STATUS_OF, BranchServicer
from mbt_node.tls import caller_guard, server_credentials

log = logging.getLogger("mbt_node")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BranchService"].full_name


async def run_node(cfg: NodeConfig, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set or a termination signal arrives."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    stop_on_signals(stop)

    material = cfg.tls.load(role="node") if cfg.tls.enabled else None
    manifest = await loop.run_in_executor(None, verify_manifest, cfg)
    if material is None:  # after the checks that can refuse the start: one line each
        warn_plaintext("mbt-node")
    max_bytes = cfg.limits.message_bytes(manifest.config.d_model, len(cfg.serve))
    server = grpc.aio.server(
        interceptors=[
            *([caller_guard()] if material is not None else []),  # outermost: first
            MalformedRequests(),
        ],
        maximum_concurrent_rpcs=cfg.limits.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
        ],
    )
    metrics = NodeMetrics(STATUS_OF)  # counted always, served with --metrics-port
    servicer = BranchServicer(metrics)
    pb_grpc.add_BranchServiceServicer_to_server(servicer, server)
    health = add_standard_services(server, SERVICE_NAME)
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    if material is not None:
        port = server.add_secure_port(cfg.listen, server_credentials(material))
    else:
        port = server.add_insecure_port(cfg.listen)
    if port == 0:
        raise OSError(f"cannot listen on {cfg.listen}")
    await server.start()
    runtime: NodeRuntime | None = None
    advertiser: Advertiser | None = None
    httpd = None
    try:
        runtime = await loop.run_in_executor(None, load_runtime, cfg, manifest, metrics)
        for batcher in runtime.batchers.values():
            batcher.start()
        servicer.runtime = runtime
        metrics_note = ""
        if cfg.metrics_port >= 0:
            httpd, _ = start_http_server(
                cfg.metrics_port, cfg.metrics_host, registry=metrics.registry
            )
            metrics_note = f", metrics on http://{cfg.metrics_host}:{httpd.server_port}/metrics"
        await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
        if cfg.advertise:
            advertiser = Advertiser(runtime.record(), cfg.interface, port)
            await advertiser.start()
        host = cfg.listen.rsplit(":", 1)[0]
        served = format_branches(tuple(sorted(runtime.branches)))
        advertised = f", advertised as {advertiser.name}" if advertiser else ""
        settle_heap()
        print(
            f"mbt-node ready: listening on {host}:{port}, serving {served}, node id "
            f"{runtime.node_id}, manifest {runtime.manifest_sha256[:16]}, "
            f"{'mutual TLS' if material is not None else 'plaintext (--insecure)'}"
            f"{advertised}{metrics_note}",
            flush=True,
        )
        await stop.wait()
        log.info("draining")
    finally:
        servicer.draining.set()
        await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        if advertiser is not None:
            await advertiser.stop()
        await server.stop(cfg.drain_grace_s)
        if runtime is not None:
            await runtime.close()
        if httpd is not None:
            httpd.shutdown()
    say("mbt-node", "stopped")


async def _set_health(health: Health, status: int) -> None:
    for service in ("", SERVICE_NAME):
        await health.set(service, status)
