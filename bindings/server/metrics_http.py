"""``forvalue serve --metrics-port P``: Prometheus ``/metrics`` over HTTP (prometheus_client,
as vLLM and Triton serve theirs), for a cluster's scraper.

The figures have one source: the server's Prometheus text (``ValuationServer.prometheus_text``,
from the engine's EngineMetrics, the same text GetStats returns), read on the server's event
loop at each scrape and handed to prometheus_client as metric families.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import ValuationServer

INSTALL_HINT = "pip install 'forvalue[metrics]'"
SCRAPE_TIMEOUT_S = 5.0


class _ServerCollector:
    """A prometheus_client collector reading the server's figures on its event loop."""

    def __init__(self, server: ValuationServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server, self.loop = server, loop

    def collect(self) -> Iterator[Any]:
        from prometheus_client.parser import text_string_to_metric_families

        text = asyncio.run_coroutine_threadsafe(self._text(), self.loop).result(SCRAPE_TIMEOUT_S)
        yield from text_string_to_metric_families(text)

    async def _text(self) -> str:
        return self.server.prometheus_text()


class MetricsServer:
    """The HTTP endpoint; ``close()`` stops it."""

    def __init__(self, server: ValuationServer, port: int, host: str = "127.0.0.1") -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise ValueError(f"--metrics-port needs prometheus_client: {INSTALL_HINT}") from None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_ServerCollector(server, asyncio.get_running_loop()))
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._httpd.server_port

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
