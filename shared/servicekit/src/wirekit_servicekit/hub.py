"""The connections of one TCP listener: admission under limits, idle and frame deadlines,
and the drain at shutdown.

:class:`ConnectionHub` is what the protocols talk to: it admits connections under
``limit_connections`` and ``limit_connections_per_source`` (one more is closed at once and
counted), closes connections that stay idle for ``timeout_idle_s`` or leave a frame incomplete
for ``timeout_frame_s`` (one timer for all of them, no per-read timer work), and drains them
(:func:`drain`: ask every connection to finish, wait up to a deadline, close the rest).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .memory import Trimmer
from .metrics import ConnectionMetrics
from .proxy import PROXY_OFF, PROXY_RESULTS, GateContext, Peer, ProxyPolicy
from .settings import TcpServiceSettings

__all__ = [
    "REJECT_REASONS",
    "CloseReason",
    "Connection",
    "ConnectionHub",
    "ConnectionLimits",
    "drain",
    "source_key",
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
    #: PROXY protocol in front of the listener (off unless configured).
    proxy: ProxyPolicy = PROXY_OFF

    @classmethod
    def from_settings(cls, settings: TcpServiceSettings) -> ConnectionLimits:
        return cls(
            connections=settings.limit_connections,
            per_source=settings.limit_connections_per_source,
            idle_s=settings.timeout_idle_s,
            frame_s=settings.timeout_frame_s,
            proxy=ProxyPolicy.from_setting(
                settings.proxy_protocol, settings.proxy_trusted, settings.timeout_proxy_header_s
            ),
        )


def source_key(peername: object) -> str:
    """The address a per-source limit counts: the IPv4 address, or the /64 of an IPv6 one
    (one host usually holds a whole /64), IPv4-mapped IPv6 counted as IPv4."""
    if not isinstance(peername, tuple) or not peername:
        return ""
    return Peer.direct(peername).source


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
        # PROXY protocol: connections whose header is still awaited (they hold a slot of
        # limit_connections), and the client each handed-off transport was found to be from.
        self._pending = 0
        self._proxied: dict[object, Peer] = {}
        self.gate: GateContext | None = None
        if limits.proxy.on:
            results = {r: metrics.proxy_headers.labels(*labels, r) for r in PROXY_RESULTS}
            self.gate = GateContext(limits.proxy, self, results)
        self._empty = asyncio.Event()
        self._empty.set()
        self._sweeper: asyncio.Task[None] | None = None
        #: Hands the memory of a burst back once the listener has been empty a while.
        self.trimmer = Trimmer()

    def __len__(self) -> int:
        return len(self._connections)

    def admit(self, conn: Connection, peername: object, transport: object = None) -> Peer | None:
        """Register a new connection; who it is from (the client a PROXY header named for
        ``transport``, else the socket's peer), or None (counted by reason) when it must be
        refused."""
        peer = self._proxied.pop(transport, None) if transport is not None else None
        if peer is None:
            peer = Peer.direct(peername)
        source = peer.source
        from_source = self._sources.get(source, 0)
        if self._draining:
            reason = "draining"
        elif len(self._connections) + self._pending >= self.limits.connections:
            reason = "limit"
        elif from_source >= self.limits.per_source:
            reason = "per_source"
        else:
            self._sources[source] = from_source + 1
            self._connections[conn] = _Entry(source, conn.activity, time.perf_counter())
            self._opened.inc()
            self._active.inc()
            self._empty.clear()
            self.trimmer.busy()
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
            return peer
        self._rejected[reason].inc()
        return None

    # -- PROXY protocol (see .proxy) ------------------------------------------------------
    def wrap(
        self, factory: Callable[[], asyncio.BaseProtocol], paused: bool = False
    ) -> Callable[[], asyncio.BaseProtocol]:
        """The listener's protocol factory: behind the PROXY protocol gate when it is on
        (``paused``: reading stays paused after the header, see ``Listener.tls_later``)."""
        return factory if self.gate is None else self.gate.wrap(factory, paused)

    def hold(self) -> bool:
        """A connection awaits its PROXY header: it takes a slot of ``limit_connections``."""
        if self._draining or len(self._connections) + self._pending >= self.limits.connections:
            self._rejected["draining" if self._draining else "limit"].inc()
            return False
        self._pending += 1
        return True

    def unhold(self) -> None:
        self._pending -= 1

    def expect(self, transport: object, peer: Peer) -> None:
        """The connection about to be admitted on ``transport`` is from ``peer``."""
        self._proxied[transport] = peer

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
            self.trimmer.empty()

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
        self.trimmer.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None


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
