"""/healthz, /readyz and /metrics: a minimal HTTP/1.1 GET server on asyncio.

Three fixed routes do not justify a web framework; prometheus-client renders
the metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from overlay import __version__
from overlay.errors import ConfigError
from overlay.metrics import REGISTRY

log = logging.getLogger(__name__)

Route = Callable[[], tuple[int, str, bytes]]


def split_hostport(addr: str, flag: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(flag, f"{addr!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def metrics_route() -> tuple[int, str, bytes]:
    return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)


def json_route(fn: Callable[[], tuple[bool, dict[str, object]]]) -> Route:
    def route() -> tuple[int, str, bytes]:
        ok, doc = fn()
        return (200 if ok else 503), "application/json", (json.dumps(doc) + "\n").encode()
    return route


class HttpServer:
    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, flag: str = "listen address") -> None:
        try:
            self._server = await asyncio.start_server(self._handle, host, port)
        except OSError as exc:  # in use, or not an address of this host
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(flag, f"cannot listen on {host}:{port}: {why}") from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            route = self.routes.get(path)
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif route is None:
                status, ctype, body = 404, "text/plain", b"not found\n"
            else:
                try:
                    status, ctype, body = route()
                except Exception:
                    log.exception("serving %s failed", path)
                    status, ctype, body = 500, "text/plain", b"internal error\n"
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                      500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "")
            head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            writer.write(head + (b"" if parts and parts[0] == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()


async def serve_probes(health_addr: str | None, metrics_addr: str | None,
                       ready: Callable[[], tuple[bool, dict[str, object]]],
                       before_scrape: Callable[[], None]) -> list[HttpServer]:
    """/healthz, /readyz and /metrics on --health-addr, and /metrics (with the probes) on
    --metrics-addr if that is another address. The servers started, to close later."""

    def health() -> tuple[bool, dict[str, object]]:
        return True, {"status": "alive", "version": __version__}

    def scrape() -> tuple[int, str, bytes]:
        before_scrape()
        return metrics_route()

    probes = {"/healthz": json_route(health), "/readyz": json_route(ready)}
    servers: list[HttpServer] = []
    try:
        for addr, flag in ((health_addr, "--health-addr"), (metrics_addr, "--metrics-addr")):
            if addr and not (flag == "--metrics-addr" and addr == health_addr):
                srv = HttpServer({**probes, "/metrics": scrape})
                await srv.start(*split_hostport(addr, flag), flag)
                servers.append(srv)
    except BaseException:
        for srv in servers:
            await srv.close()
        raise
    return servers
