"""mDNS/DNS-SD advertisement of a node (python-zeroconf), bound to one interface address."""

from __future__ import annotations

import socket

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from mbt_core.wire.contract import SERVICE_TYPE
from mbt_core.wire.discovery import NodeRecord


class Advertiser:
    """Registers ``_mbt._tcp.local.`` for a node; unregisters on :meth:`stop`."""

    def __init__(self, record: NodeRecord, interface: str, port: int) -> None:
        instance = f"mbt-{record.node_id[:16]}-{port}"
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{instance}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(interface)],
            port=port,
            properties=record.to_txt(),
            server=f"{instance}.local.",
        )
        self._interface = interface
        self._zc: AsyncZeroconf | None = None

    @property
    def name(self) -> str:
        return self._info.name

    async def start(self) -> None:
        self._zc = AsyncZeroconf(interfaces=[self._interface], ip_version=IPVersion.V4Only)
        # Both calls return a task that does the announcing: await it too, or nothing is sent.
        await (await self._zc.async_register_service(self._info))

    async def stop(self) -> None:
        if self._zc is None:
            return
        zc, self._zc = self._zc, None
        try:
            await (await zc.async_unregister_service(self._info))
        finally:
            await zc.async_close()
