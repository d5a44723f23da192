#!/usr/bin/env python3
"""mbt-healthcheck [HOST:PORT] [SERVICE]: exit 0 when the gRPC health service says SERVING.

Both mbt-node and mbt-aggregator implement grpc.health.v1.Health ("" and their own service);
a node reports NOT_SERVING while it loads and while it drains. For Docker HEALTHCHECK and
compose; Kubernetes uses its built-in `grpc:` probe instead.
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else "127.0.0.1:7001"
    service = argv[2] if len(argv) > 2 else ""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3.0
            )
    except grpc.RpcError as exc:
        print(f"mbt-healthcheck: {address}: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"mbt-healthcheck: {address}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
