"""Server lifecycle shared by the TCP services: listen, serve, drain on a signal, exit.

A service hands :func:`run` its listeners (name, address, protocol factory). :func:`run` starts
the metrics endpoint, binds every listener, marks the service ready and waits for SIGTERM or
SIGINT. Then, as uvicorn does: stop accepting, mark not ready, ask every open connection to
finish (:meth:`Connection.begin_drain`), wait up to ``timeout_drain_s`` (TCP) for them to go,
and close the rest. A second signal during the drain closes everything at once.

Exit status: 0 after a drain (every connection finished, or the rest closed at the deadline), 1
when a second signal forced the exit, 2 for invalid settings (see ``settings``).

:class:`ConnectionHub` is what the protocols talk to: it admits connections under
``limit_connections`` and ``limit_connections_per_source`` (one more is closed at once and
counted), closes connections that stay idle for ``timeout_idle_s`` or leave a frame incomplete
for ``timeout_frame_s`` (one timer for all of them, no per-read timer work), and drains them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import ipaddress
import logging
import signal
import socket
import ssl
import struct
import sys
import termios
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .metrics import ConnectionMetrics, MetricsServer
from .reload import RELOAD_SIGNAL, release, restore
from .settings import ServiceSettings, TcpServiceSettings
from .workers import announce
from .workers import current as current_worker

__all__ = [
    "REJECT_REASONS",
    "Background",
    "CloseReason",
    "Connection",
    "ConnectionHub",
    "ConnectionLimits",
    "DatagramListener",
    "Listener",
    "Reload",
    "drain",
    "event_loop_factory",
    "reset",
    "reset_when_delivered",
    "run",
    "source_key",
    "undelivered_bytes",
    "unread_bytes",
]

log = logging.getLogger(__name__)

#: Sweeps per timeout: a silent peer is closed after between 1 and 1.25 idle timeouts, a frame
#: left incomplete after between 1 and 1.125 frame timeouts (sweeps see activity, not its time).
_SWEEPS = 8
#: After the drain deadline, how long closed connections get to finish their cleanup.
_AFTER_CLOSE_S = 5.0
#: Why the hub refuses a connection: the ``reason`` label of ``*_connections_rejected_total``.
REJECT_REASONS = ("limit", "per_source", "draining")


class CloseReason(enum.StrEnum):
    """Why the hub closes a connection: also the ``kind`` label a service counts it under, so
    a service's label set is built from this enum and cannot miss one."""

    IDLE_TIMEOUT = "idle_timeout"
    FRAME_TIMEOUT = "frame_timeout"
    SHUTDOWN = "shutdown"  # the drain deadline


class Connection(Protocol):
    """What the hub needs of a protocol instance."""

    #: Moves whenever the peer sends something (a byte count, say). Read by the sweeper.
    activity: int
    #: ``time.perf_counter()`` when the first byte of the frame being received arrived; 0.0
    #: between frames (and always, for protocols without frames).
    frame_started: float

    def begin_drain(self) -> None:
        """Finish what is in flight, then close. Called once, when shutdown starts."""

    def close_now(self, reason: CloseReason) -> None:
        """Close at once."""


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds a hub enforces; every one is a setting (see :class:`TcpServiceSettings`)."""

    connections: int
    per_source: int
    idle_s: float
    frame_s: float

    @classmethod
    def from_settings(cls, settings: TcpServiceSettings) -> ConnectionLimits:
        return cls(
            connections=settings.limit_connections,
            per_source=settings.limit_connections_per_source,
            idle_s=settings.timeout_idle_s,
            frame_s=settings.timeout_frame_s,
        )


def source_key(peername: object) -> str:
    """The address a per-source limit counts: the IPv4 address, or the /64 of an IPv6 one
    (one host usually holds a whole /64), IPv4-mapped IPv6 counted as IPv4."""
    if not isinstance(peername, tuple) or not peername:
        return ""
    host = str(peername[0])
    if ":" not in host:
        return host
    try:
        addr = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((addr, 64), strict=False))


class _Entry:
    __slots__ = ("activity", "seen", "source")

    def __init__(self, source: str, activity: int, seen: float) -> None:
        self.source = source
        self.activity = activity  # the connection's activity when last looked at
        self.seen = seen  # when it was last seen to move (a sweep's time, or the admission)


class ConnectionHub:
    """Admission, idle and frame deadlines, and drain for one listener's connections.

    Admission: at most ``limits.connections`` open connections and ``limits.per_source`` from
    one source; one more is closed at once and counted with its reason. One sweeper task for
    all connections (no per-read timer work) closes those that sent nothing for ``idle_s`` and
    those whose frame in progress is older than ``frame_s``. The hub owns that task:
    :meth:`aclose` cancels and awaits it.
    """

    def __init__(self, limits: ConnectionLimits, metrics: ConnectionMetrics, *labels: str) -> None:
        self.limits = limits
        # Children bound once (an unlabelled family is its own child).
        self._opened = metrics.opened.labels(*labels) if labels else metrics.opened
        self._active = metrics.active.labels(*labels) if labels else metrics.active
        self._rejected = {r: metrics.rejected.labels(*labels, r) for r in REJECT_REASONS}
        self._connections: dict[Connection, _Entry] = {}
        self._sources: dict[str, int] = {}
        self._draining = False
        self._empty = asyncio.Event()
        self._empty.set()
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._connections)

    def admit(self, conn: Connection, peername: object) -> bool:
        """Register a new connection; False (counted by reason) when it must be refused."""
        source = source_key(peername)
        from_source = self._sources.get(source, 0)
        if self._draining:
            reason = "draining"
        elif len(self._connections) >= self.limits.connections:
            reason = "limit"
        elif from_source >= self.limits.per_source:
            reason = "per_source"
        else:
            self._sources[source] = from_source + 1
            self._connections[conn] = _Entry(source, conn.activity, time.perf_counter())
            self._opened.inc()
            self._active.inc()
            self._empty.clear()
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
            return True
        self._rejected[reason].inc()
        return False

    def release(self, conn: Connection) -> None:
        entry = self._connections.pop(conn, None)
        if entry is None:
            return
        left = self._sources[entry.source] - 1
        if left:
            self._sources[entry.source] = left
        else:
            del self._sources[entry.source]
        self._active.dec()
        if not self._connections:
            self._empty.set()

    async def _sweep(self) -> None:
        limits = self.limits
        tick = min(limits.idle_s, limits.frame_s) / _SWEEPS
        while True:
            await asyncio.sleep(tick)
            try:
                self.sweep(time.perf_counter())
            except Exception:  # a bug here must not silently end every deadline
                log.exception("connection sweep failed")

    def sweep(self, now: float) -> None:
        """Close the connections past a deadline at ``now`` (a ``perf_counter`` time)."""
        idle_s, frame_s = self.limits.idle_s, self.limits.frame_s
        late: list[tuple[Connection, CloseReason]] = []
        for conn, entry in self._connections.items():
            if conn.activity != entry.activity:
                entry.activity, entry.seen = conn.activity, now
            elif now - entry.seen >= idle_s:
                late.append((conn, CloseReason.IDLE_TIMEOUT))
                continue
            started = conn.frame_started
            if started and now - started >= frame_s:
                late.append((conn, CloseReason.FRAME_TIMEOUT))
        for conn, reason in late:
            conn.close_now(reason)

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
            conn.close_now(CloseReason.SHUTDOWN)
        return len(left)

    async def aclose(self) -> None:
        """Stop the sweeper and wait for it."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None


_TIOCOUTQ: int = getattr(termios, "TIOCOUTQ", 0x5411)  # Linux; absent from typeshed


def _queue_bytes(transport: asyncio.BaseTransport, request: int) -> int:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        got = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(got, sys.byteorder, signed=True)


def unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes waiting in the socket's receive queue, not yet read (``FIONREAD``)."""
    return _queue_bytes(transport, termios.FIONREAD)


def undelivered_bytes(transport: asyncio.WriteTransport) -> int:
    """Bytes written to the socket that the peer has not acknowledged yet (``TIOCOUTQ``: unsent
    plus unacknowledged), plus what the transport still buffers."""
    return transport.get_write_buffer_size() + _queue_bytes(transport, _TIOCOUTQ)


def reset(transport: asyncio.Transport) -> None:
    """Close with a TCP reset (RST), not a FIN: the peer learns that what it sent was not all
    answered. Whatever is still queued for it is discarded."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


#: How long replies already written get to reach the peer before a reset that would discard
#: them (:func:`reset_when_delivered`); a peer that does not read is reset after this.
DELIVERY_GRACE_S = 2.0
_DELIVERY_POLL_S = 0.01


def reset_when_delivered(transport: asyncio.Transport, grace_s: float = DELIVERY_GRACE_S) -> None:
    """Stop reading, let what was written reach the peer (acknowledged by its TCP), then reset.
    The peer reads every reply sent before the error, then gets the reset; one that does not
    read gets it after ``grace_s``."""
    transport.pause_reading()
    loop = asyncio.get_running_loop()
    end = loop.time() + grace_s

    def check() -> None:
        if transport.is_closing():
            return
        if not undelivered_bytes(transport) or loop.time() >= end:
            reset(transport)
        else:
            loop.call_later(_DELIVERY_POLL_S, check)

    check()


_LINGER_RESET = struct.pack("ii", 1, 0)


async def drain(hubs: Sequence[ConnectionHub], grace_s: float, force: asyncio.Event) -> int:
    """Drain every hub at once; close what is left after ``grace_s`` or when ``force`` is set.
    Returns how many connections were closed at the deadline."""
    for hub in hubs:
        hub.begin_drain()

    async def all_gone() -> None:
        for hub in hubs:
            await hub.wait_empty()

    waiters = [asyncio.ensure_future(all_gone()), asyncio.ensure_future(force.wait())]
    try:
        await asyncio.wait(waiters, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    closed = sum(hub.close_all() for hub in hubs)
    if closed:
        # Closed connections finish on the next loop iterations (connection_lost; a cmdexec
        # handler kills its command first): let them, so that no handler is cancelled by the
        # loop's end, spans end and gauges read 0 before the process exits.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_gone(), _AFTER_CLOSE_S)
    return closed


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
class Background:
    """A task the service runs beside its listeners (a periodic sweep, a reporter): started
    once the listeners are bound, cancelled and awaited at shutdown. Its failure is logged."""

    name: str
    factory: Callable[[], Coroutine[Any, Any, None]]


async def _supervised(part: Background) -> None:
    try:
        await part.factory()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("background task failed", extra={"task": part.name})


@dataclass(frozen=True)
class DatagramListener:
    """One UDP endpoint: ``factory`` builds its DatagramProtocol. Stateless: nothing to drain."""

    name: str
    host: str
    port: int
    factory: Callable[[], asyncio.DatagramProtocol]


def event_loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The loop to run on: uvloop when asked (or on ``auto`` when installed), else the standard
    one (``None``: asyncio's default). For ``asyncio.Runner(loop_factory=...)``, as uvicorn does:
    no process-wide event loop policy (deprecated from Python 3.14)."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.new_event_loop, "uvloop"
    return None, "asyncio"


@dataclass(frozen=True)
class Reload:
    """What a service that reloads does on SIGHUP. Installed before the listeners are bound; a
    SIGHUP that came earlier (held from the process's start, see :mod:`.reload`) is taken
    then, so the service is ready with the newest configuration."""

    callback: Callable[[], object]


Part = Listener | DatagramListener | Background | Reload


def _install(loop: asyncio.AbstractEventLoop, signum: int, callback: Callable[[], object]) -> bool:
    """``callback`` on ``signum``; False where signals cannot be handled (not the main thread)."""
    try:
        loop.add_signal_handler(signum, callback)
    except (RuntimeError, ValueError):
        return False
    return True


async def run(
    settings: ServiceSettings,
    listeners: Sequence[Part],
    metrics: MetricsServer,
    on_ready: Callable[[dict[str, int]], None] | None = None,
    cleanup: Callable[[], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Serve ``listeners`` (and run the ``Background`` tasks among them) until a signal (or
    ``stop`` is set); drain; return the exit status."""
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
    on_reload = next((p.callback for p in listeners if isinstance(p, Reload)), None)
    reload_held = RELOAD_SIGNAL in signal.pthread_sigmask(signal.SIG_BLOCK, ())
    if on_reload is not None and _install(loop, RELOAD_SIGNAL, on_reload) and release():
        on_reload()  # a SIGHUP came while the service started

    servers: list[asyncio.Server] = []
    endpoints: list[asyncio.BaseTransport] = []
    tasks: list[asyncio.Task[None]] = []
    hubs = [lst.hub for lst in listeners if isinstance(lst, Listener)]
    # A worker (--workers) shares its ports with the others: SO_REUSEPORT, and the ports the
    # first worker bound (port 0 resolved).
    worker = current_worker()
    shared = worker is not None
    metrics.start()
    try:
        bound: dict[str, int] = {}
        for lst in listeners:
            if isinstance(lst, Background | Reload):
                continue
            port = worker.ports.get(lst.name, lst.port) if worker is not None else lst.port
            if isinstance(lst, DatagramListener):
                transport, _ = await loop.create_datagram_endpoint(
                    lst.factory, local_addr=(lst.host, port), reuse_port=shared
                )
                endpoints.append(transport)
                bound[lst.name] = transport.get_extra_info("sockname")[1]
                continue
            server = await loop.create_server(
                lst.factory, lst.host, port, reuse_address=True, reuse_port=shared,
                backlog=1024, ssl=lst.ssl,
            )  # fmt: skip
            servers.append(server)
            bound[lst.name] = server.sockets[0].getsockname()[1]
        bound["metrics"] = metrics.port
        tasks = [loop.create_task(_supervised(p)) for p in listeners if isinstance(p, Background)]
        metrics.ready = True
        log.info(
            "listening",
            extra={"host": settings.host, "metrics_host": settings.metrics_bind, "ports": bound},
        )
        if on_ready is not None:
            on_ready(bound)
        announce(bound)  # to the supervisor, in a worker
        await stop.wait()

        metrics.ready = False
        for server in servers:
            server.close()  # stop accepting; open connections are left to the hubs
        for endpoint in endpoints:
            endpoint.close()  # datagrams already received have been answered
        closed = await drain(hubs, settings.drain_grace_s, force)
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
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for hub in hubs:
            await hub.aclose()
        for signum in (signal.SIGTERM, signal.SIGINT, RELOAD_SIGNAL):
            loop.remove_signal_handler(signum)
        restore(reload_held)
        metrics.stop()
        if cleanup is not None:
            result = cleanup()
            if result is not None:
                await result
