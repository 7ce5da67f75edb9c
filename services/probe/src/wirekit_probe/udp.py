"""The ``udp`` module: sequenced, timestamped datagrams to one RFC 862 echo target.

One unconnected socket per target, so that a reply from any other address or port is seen --
and counted as ``wrong_source`` and ignored -- rather than filtered by the kernel unseen. The
kernel is asked for each reply's TTL (IPv4 ``IP_RECVTTL``) or hop limit (IPv6
``IPV6_RECVHOPLIMIT``) and the time it received it (``SO_TIMESTAMPNS``): a round trip ends when
the reply reached this host, not when a busy loop got round to it. Replies are read with
``recvmsg`` from the loop's reader callback, one per call (the loop calls it again while more
are queued, so a flood of junk cannot hold the loop, and no call ends in a failed read).
Nothing here blocks or waits without a deadline: a probe without an answer is declared lost by
``Tracker.expire``.
"""

from __future__ import annotations

import asyncio
import math
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from .tracker import Outcome, Tracker
from .wire import MAX_SIZE, NotAReply, decode, encode

#: Linux's values where Python does not name them.
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)
IP_TTL = socket.IP_TTL
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # SCM_TIMESTAMPNS is the same number
_INT = struct.Struct("@i")
_TIMESPEC = struct.Struct("@ll")
_ANCILLARY = socket.CMSG_SPACE(_INT.size) + socket.CMSG_SPACE(_TIMESPEC.size)


class _Clock:
    """The real-time clock's lead over the monotonic one, read again every second (so that a
    step of the real-time clock is followed within a second): a kernel receive timestamp is
    moved to the monotonic clock with one subtraction instead of two clock reads a reply."""

    __slots__ = ("lead", "until")

    def __init__(self) -> None:
        self.lead, self.until = 0.0, -math.inf


_CLOCK = _Clock()


def _ttl_and_arrival(ancillary: list[tuple[int, int, bytes]]) -> tuple[int | None, float]:
    """The reply's TTL (or hop limit), and when the kernel received it on the monotonic clock:
    its receive timestamp (``SO_TIMESTAMPNS``, on the real-time clock) moved to the monotonic
    one -- so that a busy prober's late wake-up is not counted in the round trip. Now, when the
    kernel gave no timestamp."""
    ttl, arrival = None, None
    now = time.monotonic()
    for level, kind, data in ancillary:
        if kind == SO_TIMESTAMPNS and level == socket.SOL_SOCKET and len(data) >= _TIMESPEC.size:
            clock = _CLOCK
            if now >= clock.until:
                clock.lead, clock.until = time.time() - time.monotonic(), now + 1.0
            sec, nsec = _TIMESPEC.unpack_from(data)
            arrival = sec + nsec * 1e-9 - clock.lead
        elif len(data) >= _INT.size and (
            (level == socket.IPPROTO_IP and kind == IP_TTL)
            or (level == socket.IPPROTO_IPV6 and kind == socket.IPV6_HOPLIMIT)
        ):
            ttl = _INT.unpack_from(data)[0]
    # Never later than now, never before a clock step could make it absurd (a second back).
    return ttl, now if arrival is None or not now - 1.0 < arrival <= now else arrival


class UdpTarget:
    """Probes to one resolved address; replies classified into ``tracker`` and ``invalid``
    (the caller's, or new ones). ``on_rtt`` is called with every on-time round trip (seconds):
    the one-shot tool keeps them for percentiles, the service observes a histogram."""

    def __init__(
        self,
        address: tuple[Any, ...],
        family: socket.AddressFamily,
        *,
        size: int,
        timeout_s: float,
        nonce: int,
        on_rtt: Callable[[float], object] | None = None,
        tracker: Tracker | None = None,
        invalid: Counter[str] | None = None,
    ) -> None:
        self.address = address
        self.size = size
        self.nonce = nonce
        self.tracker = tracker if tracker is not None else Tracker(timeout_s)
        self.invalid: Counter[str] = invalid if invalid is not None else Counter()
        self.send_errors = 0
        self.on_rtt = on_rtt
        self._seq = 0
        self._key = (address[0], address[1])
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            if family == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
            else:
                self.sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
        except BaseException:
            self.sock.close()
            raise
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop = None
        self.sock.close()

    def send(self) -> None:
        """One probe, the next sequence number."""
        seq = self._seq
        self._seq += 1
        now = time.monotonic()
        data = encode(self.nonce, seq, time.monotonic_ns(), self.size)
        self.tracker.on_send(seq, now)
        try:
            self.sock.sendto(data, self.address)
        except OSError:  # a full send buffer, no route, an ICMP error reported late: lost
            self.send_errors += 1

    def _readable(self) -> None:
        try:
            data, ancillary, _flags, addr = self.sock.recvmsg(MAX_SIZE + 1, _ANCILLARY)
        except OSError:  # an ICMP error for an earlier probe (port unreachable), or nothing
            return
        ttl, arrival = _ttl_and_arrival(ancillary)
        self.on_datagram(data, addr, arrival, ttl)

    def on_datagram(self, data: bytes, addr: tuple[Any, ...], now: float, ttl: int | None) -> None:
        if (addr[0], addr[1]) != self._key:
            self.invalid["wrong_source"] += 1
            return
        try:
            probe = decode(data, self.nonce, self.size)
        except NotAReply as e:
            self.invalid[e.reason] += 1
            return
        outcome, rtt = self.tracker.on_reply(probe.seq, now, ttl)
        if outcome is Outcome.UNKNOWN:
            self.invalid["unknown"] += 1
        elif outcome is Outcome.RECEIVED and self.on_rtt is not None:
            self.on_rtt(rtt)
