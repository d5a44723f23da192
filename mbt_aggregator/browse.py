"""mDNS/DNS-SD browsing for ``_mbt._tcp.local.`` (python-zeroconf) on one interface.

Found services become admission candidates with the node id their TXT record claims (only a
claim: admission makes the node prove it); removed services are forgotten. Resolution runs in
tasks so the zeroconf callback never blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mbt_core.wire.contract import SERVICE_TYPE

log = logging.getLogger("mbt_aggregator")
Found = Callable[[str, str, str], Awaitable[None]]  # address, source, claimed node id
Lost = Callable[[str, str], Awaitable[None]]


class MdnsBrowser:
    def __init__(self, interface: str, on_found: Found, on_lost: Lost) -> None:
        self._interface = interface
        self._on_found = on_found
        self._on_lost = on_lost
        self._addresses: dict[str, str] = {}  # service name -> host:port
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._zc = AsyncZeroconf(interfaces=[self._interface], ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )

    async def stop(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()
        for task in self._tasks:
            task.cancel()

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            address = self._addresses.pop(name, None)
            if address is not None:
                self._spawn(self._on_lost(address, "mDNS goodbye"))
        else:
            self._spawn(self._resolve(name))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            log.info("could not resolve %s", name)
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or info.port is None:
            return
        address = f"{addresses[0]}:{info.port}"
        claimed = (info.properties or {}).get(b"id") or b""
        self._addresses[name] = address
        await self._on_found(address, "mdns", claimed.decode("utf-8", "replace"))
