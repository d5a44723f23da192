#!/usr/bin/env python3
"""mbt-healthcheck [HOST:PORT] [SERVICE] [--tls-cert C --tls-key K --tls-ca CA]: exit 0 when
the gRPC health service says SERVING.

Both mbt-node and mbt-aggregator implement grpc.health.v1.Health ("" and their own service);
a node reports NOT_SERVING while it loads and while it drains. They speak mutual TLS by default,
so the probe presents a certificate of the cluster (any role passes the health check; a
cluster's client.crt will do) and checks the server's against the CA. For Docker HEALTHCHECK,
compose and Kubernetes exec probes (Kubernetes' built-in `grpc:` probe speaks plaintext only).
"""

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca is None:
        return grpc.insecure_channel(args.address)
    key = args.tls_key.read_bytes() if args.tls_key else None
    cert = args.tls_cert.read_bytes() if args.tls_cert else None
    creds = grpc.ssl_channel_credentials(args.tls_ca.read_bytes(), key, cert)
    return grpc.secure_channel(args.address, creds)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mbt-healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("address", nargs="?", default="127.0.0.1:7001")
    p.add_argument("service", nargs="?", default="")
    p.add_argument("--tls-cert", type=Path, default=None, help="a cluster certificate (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, help="its private key")
    p.add_argument("--tls-ca", type=Path, default=None, help="the cluster CA certificate")
    args = p.parse_args(argv[1:])
    try:
        with channel(args) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=3.0
            )
    except OSError as exc:
        print(f"mbt-healthcheck: cannot read TLS files: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"mbt-healthcheck: {args.address}: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"mbt-healthcheck: {args.address}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
