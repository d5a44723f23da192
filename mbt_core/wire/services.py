"""The standard gRPC services node and gateway serve beside their own: health and reflection.

- :class:`Health`: ``grpc.health.v1.Health`` with ``List`` too. grpcio-health-checking (1.85)
  implements only ``Check`` and ``Watch``, so a ``List`` (in the service's descriptor, which
  reflection shows to every client) ended UNIMPLEMENTED with a traceback in the server log at
  every call.
- :class:`ReflectionV1`: ``grpc.reflection.v1``, which current clients ask for first;
  grpcio-reflection (1.85) ships only ``v1alpha``. The two protocols are the same messages
  under two package names, so v1 is answered by the v1alpha servicer, each message crossing
  as its bytes (``proto/grpc/reflection/v1/reflection.proto``).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection as reflection_v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

from mbt_core.wire.protocol.grpc.reflection.v1 import reflection_pb2 as v1_pb2
from mbt_core.wire.protocol.grpc.reflection.v1 import reflection_pb2_grpc as v1_grpc

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_V1 = v1_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
REFLECTION_V1ALPHA = reflection_v1alpha.SERVICE_NAME


class Health(health_aio.HealthServicer):
    """The asyncio health servicer, with ``List``: every service's status."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        statuses = dict(self._server_status)  # the library keeps them there (no accessor)
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in statuses.items()
            }
        )


class ReflectionV1(v1_grpc.ServerReflectionServicer):
    """``grpc.reflection.v1`` answered by the v1alpha servicer (see the module's docstring)."""

    def __init__(self, service_names: Iterable[str]) -> None:
        self._v1alpha = reflection_v1alpha.aio.ReflectionServicer(tuple(service_names))

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterable[v1_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[v1_pb2.ServerReflectionResponse]:
        async def as_v1alpha() -> AsyncIterator[v1alpha_pb2.ServerReflectionRequest]:
            async for request in request_iterator:
                yield v1alpha_pb2.ServerReflectionRequest.FromString(request.SerializeToString())

        async for response in self._v1alpha.ServerReflectionInfo(as_v1alpha(), context):
            yield v1_pb2.ServerReflectionResponse.FromString(response.SerializeToString())


def add_standard_services(server: grpc.aio.Server, *service_names: str) -> Health:
    """Health and reflection (v1 and v1alpha) on ``server``, which also serves
    ``service_names``; returns the health servicer, to set statuses on."""
    health = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (*service_names, HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA)
    reflection_v1alpha.enable_server_reflection(names, server)
    v1_grpc.add_ServerReflectionServicer_to_server(ReflectionV1(names), server)
    return health
