"""Reflection and loop defences, sans-I/O: classify a source, key it for the rate limits
(which are servicekit's), and recognise our own answers coming back."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from typing import Any, Protocol

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


class AnswerTable(Protocol):
    """What LoopGuard uses of its table: a dict of int -> float, or the C build's LoopTable
    (which has these and ``__contains__``, ``__getitem__``, ``clear``, not a whole mapping)."""

    def __len__(self) -> int: ...
    def get(self, key: int, /) -> float | None: ...
    def __setitem__(self, key: int, when: float, /) -> None: ...
    def __delitem__(self, key: int, /) -> None: ...
    def items(self) -> Iterable[tuple[int, float]]: ...


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

    Memory: one timestamp per hash of (address, port, bytes) answered, at most ``limit`` of
    them; no datagram is kept. An answer older than ``window_s`` no longer counts; the table
    is pruned of those when it is full (at most once a window: a table full of answers all
    younger than a window stays full, and answers beyond it are not remembered until then --
    the per-source and global rate limits bound how fast that can be). The hash is keyed per
    process, so a sender cannot aim collisions at it (a collision within one window would
    only drop one datagram): Python's own (SipHash) in the pure build; in the C build the
    payload is first compressed by NH, UMAC's universal hash, under a key drawn at start-up,
    then SipHash'd with the address and length (``_hot.c``; ~4x fewer instructions at 1 KiB).

    The protocol runs these steps inline (``answers``, ``window_s``, ``limit``): on its
    per-datagram path a method call costs as much as the check itself.
    """

    __slots__ = ("answers", "limit", "prune_at", "window_s")

    def __init__(self, window_s: float, limit: int, answers: AnswerTable | None = None) -> None:
        self.window_s = window_s
        self.limit = limit
        # key of (address tuple as the socket gives it, bytes) -> when we answered it: ints
        # and floats only, nothing for the garbage collector to walk at 20,000 answers/s (a
        # dict; the C build's _hot.LoopTable, which UdpContext.build gives). One table,
        # changed in place: the protocol keeps a reference to it.
        self.answers: AnswerTable = {} if answers is None else answers
        self.prune_at = 0.0

    def __len__(self) -> int:
        return len(self.answers)

    @staticmethod
    def key(data: bytes, addr: tuple[Any, ...]) -> int:
        """What is remembered of an answer of ``data`` to ``addr`` (computed once per datagram:
        the same key asks whether it came back and records the answer): the running build's
        ``_hot.loop_key``, the key its protocol files answers under."""
        from . import _hot  # here: the C build imports this module as it loads

        return _hot.loop_key(data, addr)

    def prune(self, now: float) -> None:
        """Forget the answers of a window ago or more; the next pruning is a window away."""
        window, answers = self.window_s, self.answers
        for key in [key for key, when in answers.items() if now - when >= window]:
            del answers[key]
        self.prune_at = now + window

    def reflected(self, key: int, now: float) -> bool:
        """Whether the datagram ``key`` stands for is one of our answers coming back."""
        when = self.answers.get(key)
        return when is not None and now - when < self.window_s

    def answered(self, key: int, now: float) -> None:
        answers = self.answers
        if len(answers) >= self.limit and now >= self.prune_at:
            self.prune(now)
        if len(answers) < self.limit:
            answers[key] = now
