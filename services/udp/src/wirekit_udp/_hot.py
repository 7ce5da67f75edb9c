"""udp's per-datagram path: the state a datagram touches, and ``datagram_received``.

This is the pure-Python build and the reference. ``_hot.c`` is its C build (the same names and
behaviour; where it is built, ``make wheelhouse``/``make accel``, Python imports the extension
module before this file). ``make test-compiled`` runs udp's tests against the C build.

``Core`` holds what every datagram touches; ``UdpEcho`` (``protocol.py``) subclasses it and
takes ``datagram_received`` from it. What is rare goes to the subclass's Python methods in both
builds: ``_drop`` (every drop), ``_judge`` (a host not yet known as unicast), ``_send_empty``,
and ``LoopGuard.answered`` once the loop guard's table is full. ``TokenBucket`` and
``SourceLimiter`` are servicekit's here, ``LoopTable`` a dict; the C build has its own, with the
same interface and the same results (``UdpContext.build`` makes them from this module).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from wirekit_servicekit.metrics import Cell
from wirekit_servicekit.ratelimit import SourceLimiter, TokenBucket

from .defences import LoopGuard, source_key

if TYPE_CHECKING:
    from .protocol import UdpContext

__all__ = ["Cell", "Core", "LoopTable", "SourceLimiter", "TokenBucket"]

BUILD = "pure"
LOOP_KEY = "hash"  # loop_key's function: Python's hash; the C build's is "nh" (see _hot.c)
#: The loop guard's table, key -> when answered (the C build's is a table of int64 and double).
LoopTable = dict
#: The C build's (on Linux) reads and answers the endpoint's socket (``pktinfo.CTransport``);
#: this build has none: asyncio's transport, or ``pktinfo.PktinfoTransport`` on a wildcard bind.
DatagramIO: Any = None


def _not_connected(data: bytes, addr: tuple[Any, ...]) -> None:
    raise RuntimeError("datagram_received before connection_made")


def loop_key(data: bytes, addr: tuple[Any, ...]) -> int:
    """The loop guard's key of an answer of ``data`` to ``addr`` (``LoopGuard.key`` is this):
    ``hash((addr, data))``, which ``Core`` inlines. The C build's is another keyed hash of the
    same (see _hot.c)."""
    return hash((addr, data))


class Core:
    """Core(ctx): the state of the udp endpoint that its datagrams touch."""

    __slots__ = ("_answers", "_ipv4", "_received", "_received_bytes", "_remember", "_sendto",
                 "_time", "_unicast", "_window", "ctx", "deny_ports", "global_bucket", "limiter",
                 "loop", "max_size", "min_port", "sends_empty", "transport")  # fmt: skip

    def __init__(self, ctx: UdpContext) -> None:
        self.ctx = ctx
        self.limiter: SourceLimiter = ctx.limiter
        self.max_size = ctx.max_size
        self.min_port = ctx.min_port
        self.deny_ports = ctx.deny_ports
        self.global_bucket: TokenBucket = ctx.global_bucket
        self.loop: LoopGuard = ctx.loop
        # the loop guard's table and rule, for its steps inlined in datagram_received
        self._answers, self._window, self._remember = (
            ctx.loop.answers,
            ctx.loop.window_s,
            ctx.loop.limit,
        )
        self._unicast: set[str] = set()  # sources judged not broadcast or multicast
        self.transport: asyncio.DatagramTransport | None = None
        self._sendto: Callable[[bytes, tuple[Any, ...]], None] = _not_connected
        self.sends_empty = False  # asyncio's transport skips empty datagrams
        self._ipv4 = False  # an IPv4 socket: every source is its own rate-limit key
        self._time = ctx.clock
        # the per-datagram cells, one attribute away
        self._received, self._received_bytes = ctx.metrics.received, ctx.metrics.received_bytes

    # UdpEcho implements these (protocol.py).
    def _drop(self, reason: str, addr: tuple[Any, ...], n: int) -> None:
        raise NotImplementedError

    def _judge(self, host: str) -> bool:
        raise NotImplementedError

    def _send_empty(self, addr: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        # Every step here runs for every datagram: calls are inlined where a call would cost as
        # much as the work (LoopGuard's, the global bucket's take), attributes bound once.
        n = len(data)
        port = addr[1]
        if n > self.max_size:
            self._drop("oversize", addr, n)
            return
        if port < self.min_port:
            self._drop("privileged_port", addr, n)
            return
        if port in self.deny_ports:
            self._drop("denied_port", addr, n)
            return
        host = addr[0]
        if host not in self._unicast and self._judge(host):
            self._drop("broadcast_multicast", addr, n)
            return
        now = self._time()
        # LoopGuard.key and .reflected
        key = hash((addr, data))
        answers = self._answers
        when = answers.get(key)
        if when is not None and now - when < self._window:
            self._drop("loop", addr, n)
            return
        # self.global_bucket.take(now)
        bucket = self.global_bucket
        tokens = bucket.tokens + (now - bucket.stamp) * bucket.rate
        if tokens > bucket.burst:
            tokens = bucket.burst
        bucket.stamp = now
        if tokens < 1.0:
            bucket.tokens = tokens
            self._drop("rate_limit_global", addr, n)
            return
        bucket.tokens = tokens - 1.0
        if not self.limiter.allow(host if self._ipv4 else source_key(host), now):
            self._drop("rate_limit_source", addr, n)
            return
        if n or self.sends_empty:
            self._sendto(data, addr)  # the same bytes: never larger
        else:
            self._send_empty(addr)
        # LoopGuard.answered
        if len(answers) < self._remember:
            answers[key] = now
        else:
            self.loop.answered(key, now)  # a full table: pruned, at most once a window
        self._received.n += 1  # after its fate: see Answered
        self._received_bytes.n += n
