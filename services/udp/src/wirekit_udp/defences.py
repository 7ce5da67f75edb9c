"""Reflection and loop defences, sans-I/O: classify a source, key it for the rate limits
(which are servicekit's), and recognise our own answers coming back."""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


@functools.lru_cache(maxsize=4096)
def source_key(host: str) -> str:
    """What a per-source rate limit counts for an IPv6 source: its /64 (one host usually holds
    a whole /64), or the IPv4 address an IPv4-mapped one carries. (IPv4 sources are their own
    key: the caller does not ask.)"""
    try:
        addr = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((addr, 64), strict=False))


@functools.lru_cache(maxsize=4096)
def is_broadcast_or_multicast(host: str) -> bool:
    """True for sources no echo should ever answer: broadcast, multicast, unspecified, reserved
    (IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry)."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address) and (addr.is_reserved or addr == _BROADCAST):
        return True  # 240.0.0.0/4 and the limited broadcast address
    return addr.is_multicast or addr.is_unspecified


class LoopGuard:
    """Our own answers coming back: the "Loop DoS" (CERT VU#417980) between two echo services.

    One datagram with a spoofed source (echo service A) sent to echo service B starts a loop: B
    answers A, A answers B, and so on. The rule that ends it: a datagram from the address and
    port we answered within the last ``window_s``, holding exactly the bytes of one of our
    answers to it then, is that answer reflected back -- it is dropped (``loop``). Between two
    wirekit-udp the spoofed datagram costs 2 datagrams on the wire (B's answer and A's); with a
    plain echo at the other end, 2 as well (ours and its reflection), when the round trip is
    under ``window_s`` -- however many different spoofed datagrams are in flight at once.

    What is still answered: a client that sends the same bytes again after ``window_s`` (a
    person typing the same line twice, a prober with a constant payload at up to 1/window_s per
    second) -- every time; different bytes at any rate. What is not: the same bytes from the
    same address and port again within ``window_s`` of our answer to them (at most one answer
    per window to such a client). A loop whose round trip is longer than ``window_s`` is not
    seen here; its rate is one datagram per round trip, bounded by the per-source rate limits.

    Memory: one timestamp per hash of (address, port, bytes) answered in the current and the
    previous window, at most ``limit`` each window (beyond ``limit`` answers in one window the
    rest are not remembered until the next); no datagram is kept. The hash is Python's
    (SipHash, seeded per process: a sender cannot aim collisions at it; a collision within one
    window would only drop one datagram).
    """

    __slots__ = ("_current", "_previous", "_swap_at", "limit", "window_s")

    def __init__(self, window_s: float, limit: int) -> None:
        self.window_s = window_s
        self.limit = limit
        # hash of (address tuple as the socket gives it, bytes) -> when we answered it: ints
        # and floats only, nothing for the garbage collector to walk at 20,000 answers/s.
        self._current: dict[int, float] = {}
        self._previous: dict[int, float] = {}
        self._swap_at = 0.0

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    @staticmethod
    def key(data: bytes, addr: tuple[Any, ...]) -> int:
        """What is remembered of an answer of ``data`` to ``addr`` (computed once per datagram:
        the same key asks whether it came back and records the answer)."""
        return hash((addr, data))

    def reflected(self, key: int, now: float) -> bool:
        """Whether the datagram ``key`` stands for is one of our answers coming back."""
        if now >= self._swap_at:
            self._previous, self._current = self._current, {}
            self._swap_at = now + self.window_s
        when = self._current.get(key)
        if when is None:
            when = self._previous.get(key)
        return when is not None and now - when < self.window_s

    def answered(self, key: int, now: float) -> None:
        current = self._current
        if len(current) < self.limit:
            current[key] = now
