"""Server lifecycle shared by the TCP services: listen, serve, drain on a signal, exit.

A service hands :func:`run` its listeners (name, address, protocol factory). :func:`run` starts
the metrics endpoint, binds every listener, marks the service ready and waits for SIGTERM or
SIGINT. Then, as uvicorn does: stop accepting, mark not ready, ask every open connection to
finish (:meth:`Connection.begin_drain`), wait up to ``timeout_drain_s`` for them to go, and close
the rest. A second signal during the drain closes everything at once.

Exit status: 0 after a drain (every connection finished, or the rest closed at the deadline), 1
when a second signal forced the exit, 2 for invalid settings (see ``settings``).

:class:`ConnectionHub` is what the protocols talk to: it admits connections under
``limit_connections`` (one more is closed at once and counted), closes connections that stay idle
for ``timeout_idle_s`` (one timer for all of them, no per-read timer work), and drains them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Gauge

from .metrics import MetricsServer
from .settings import ServiceSettings

__all__ = [
    "Connection",
    "ConnectionHub",
    "DatagramListener",
    "Listener",
    "drain",
    "install_event_loop_policy",
    "run",
]

log = logging.getLogger(__name__)

#: Idle checks per idle timeout: a silent peer is closed after between 1 and 1.25 timeouts.
_IDLE_TICKS = 4


class Connection(Protocol):
    """What the hub needs of a protocol instance."""

    #: Moves whenever the peer sends something (a byte count, say). Read by the idle sweeper.
    activity: int

    def begin_drain(self) -> None:
        """Finish what is in flight, then close. Called once, when shutdown starts."""

    def close_now(self, reason: str) -> None:
        """Close at once (idle timeout, drain deadline)."""


class ConnectionHub:
    """Admission, idle timeout and drain for one listener's connections.

    The metrics are children already bound to their labels (no label lookup per connection).
    """

    def __init__(
        self,
        *,
        limit: int,
        idle_timeout: float,
        opened: Counter,
        active: Gauge,
        rejected: Counter,
    ) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._opened = opened
        self._active = active
        self._rejected = rejected
        self._connections: dict[Connection, tuple[int, int]] = {}  # conn -> (activity, idle ticks)
        self._draining = False
        self._empty = asyncio.Event()
        self._empty.set()
        self._sweeper: asyncio.Task[None] | None = None

    def admit(self, conn: Connection) -> bool:
        """Register a new connection; False (counted) when over the limit or draining."""
        if self._draining or len(self._connections) >= self.limit:
            self._rejected.inc()
            return False
        self._connections[conn] = (conn.activity, 0)
        self._opened.inc()
        self._active.inc()
        self._empty.clear()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return True

    def release(self, conn: Connection) -> None:
        if self._connections.pop(conn, None) is not None:
            self._active.dec()
            if not self._connections:
                self._empty.set()

    async def _sweep(self) -> None:
        tick = self.idle_timeout / _IDLE_TICKS
        while True:
            await asyncio.sleep(tick)
            stale: list[Connection] = []
            for conn, (seen, ticks) in self._connections.items():
                if conn.activity != seen:
                    self._connections[conn] = (conn.activity, 0)
                elif ticks + 1 >= _IDLE_TICKS:
                    stale.append(conn)
                else:
                    self._connections[conn] = (seen, ticks + 1)
            for conn in stale:
                conn.close_now("idle_timeout")

    def begin_drain(self) -> None:
        """Refuse new connections; ask every open one to finish."""
        self._draining = True
        for conn in list(self._connections):
            conn.begin_drain()

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def close_all(self) -> int:
        """Close whatever is left (drain deadline or forced exit); return how many."""
        left = list(self._connections)
        for conn in left:
            conn.close_now("shutdown")
        if self._sweeper is not None:
            self._sweeper.cancel()
        return len(left)


async def drain(hubs: Sequence[ConnectionHub], grace_s: float, force: asyncio.Event) -> int:
    """Drain every hub at once; close what is left after ``grace_s`` or when ``force`` is set."""
    for hub in hubs:
        hub.begin_drain()
    waiters: set[asyncio.Future[object]] = {
        asyncio.ensure_future(force.wait()),
        asyncio.ensure_future(asyncio.gather(*(hub.wait_empty() for hub in hubs))),
    }
    await asyncio.wait(waiters, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    return sum(hub.close_all() for hub in hubs)


@dataclass(frozen=True)
class Listener:
    """One TCP listener: ``factory`` builds a protocol for each connection accepted."""

    name: str
    host: str
    port: int
    factory: Callable[[], asyncio.BaseProtocol]
    hub: ConnectionHub
    ssl: ssl.SSLContext | None = None


@dataclass(frozen=True)
class DatagramListener:
    """One UDP endpoint: ``factory`` builds its DatagramProtocol. Stateless: nothing to drain."""

    name: str
    host: str
    port: int
    factory: Callable[[], asyncio.DatagramProtocol]


def install_event_loop_policy(choice: str) -> str:
    """Use uvloop when asked (or on ``auto`` when installed). Returns the loop actually used."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            return "uvloop"
    asyncio.set_event_loop_policy(None)
    return "asyncio"


async def run(
    settings: ServiceSettings,
    listeners: Sequence[Listener | DatagramListener],
    metrics: MetricsServer,
    on_ready: Callable[[dict[str, int]], None] | None = None,
    cleanup: Callable[[], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Serve ``listeners`` until a signal (or ``stop`` is set); drain; return the exit status."""
    loop = asyncio.get_running_loop()
    stop = stop if stop is not None else asyncio.Event()
    force = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: closing every connection now", extra={"signal": signum})
            force.set()
        else:
            log.info("signal received: draining", extra={"signal": signum})
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    servers: list[asyncio.Server] = []
    endpoints: list[asyncio.BaseTransport] = []
    hubs = [lst.hub for lst in listeners if isinstance(lst, Listener)]
    metrics.start()
    try:
        bound: dict[str, int] = {}
        for lst in listeners:
            if isinstance(lst, DatagramListener):
                transport, _ = await loop.create_datagram_endpoint(
                    lst.factory, local_addr=(lst.host, lst.port)
                )
                endpoints.append(transport)
                bound[lst.name] = transport.get_extra_info("sockname")[1]
                continue
            server = await loop.create_server(
                lst.factory, lst.host, lst.port, reuse_address=True, backlog=1024, ssl=lst.ssl
            )
            servers.append(server)
            bound[lst.name] = server.sockets[0].getsockname()[1]
        bound["metrics"] = metrics.port
        metrics.ready = True
        log.info(
            "listening",
            extra={"host": settings.host, "metrics_host": settings.metrics_bind, "ports": bound},
        )
        if on_ready is not None:
            on_ready(bound)
        await stop.wait()

        metrics.ready = False
        for server in servers:
            server.close()  # stop accepting; open connections are left to the hubs
        for endpoint in endpoints:
            endpoint.close()  # datagrams already received have been answered
        closed = await drain(hubs, settings.timeout_drain_s, force)
        if force.is_set():
            return 1
        if closed:
            log.warning("drain deadline reached: closed the rest", extra={"closed": closed})
        else:
            log.info("drained: every connection finished")
        return 0
    finally:
        for endpoint in endpoints:
            endpoint.close()
        for server in servers:
            server.close()
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        metrics.stop()
        if cleanup is not None:
            result = cleanup()
            if result is not None:
                await result
