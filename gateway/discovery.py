"""Workers from DNS: every address of a name (a Kubernetes headless Service) is an engine.

The name is looked up every `interval` seconds; the callback gets the full set of worker URLs when it
changes. A failed lookup keeps the last known set: a DNS hiccup must not empty the fleet.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Callable

import structlog

from .config import DiscoveryConfig

log = structlog.get_logger(__name__)

FAMILIES = {"any": socket.AF_UNSPEC, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


class DnsDiscovery:
    def __init__(self, config: DiscoveryConfig, on_change: Callable[[set[str]], None]):
        self.config = config
        self.on_change = on_change
        self.urls: set[str] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def lookup(self) -> set[str]:
        c = self.config
        infos = await asyncio.get_running_loop().getaddrinfo(c.dns, c.port, family=FAMILIES[c.family],
                                                             type=socket.SOCK_STREAM)
        hosts = {info[4][0] for info in infos}
        return {f"{c.scheme}://{f'[{h}]' if ':' in h else h}:{c.port}" for h in hosts}

    async def _run(self) -> None:
        while True:
            try:
                urls = await self.lookup()
            except OSError as exc:
                log.warning("gateway.discovery_failed", dns=self.config.dns, error=str(exc))
            else:
                if urls != self.urls:
                    log.info("gateway.discovered", dns=self.config.dns, workers=sorted(urls))
                    self.urls = urls
                    self.on_change(urls)
            await asyncio.sleep(self.config.interval)
