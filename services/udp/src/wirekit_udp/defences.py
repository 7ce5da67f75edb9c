"""Reflection and loop defences, sans-I/O: classify a source, rate-limit with token buckets."""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


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


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; each datagram takes one."""

    __slots__ = ("burst", "limited", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now
        self.limited = False  # the last take() was refused

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False


class SourceLimiter:
    """One token bucket per source address, in a table of at most ``limit`` entries.

    The least recently seen source is forgotten first: a spoofed flood from many addresses
    costs a bounded amount of memory (and the global bucket bounds what it gets answered).
    ``limited`` counts sources whose last datagram was refused: the rate-limited sources gauge.
    """

    def __init__(self, rate: float, burst: int, limit: int) -> None:
        self.rate = rate
        self.burst = burst
        self.limit = limit
        self._table: OrderedDict[str, TokenBucket] = OrderedDict()
        self.limited = 0

    def __len__(self) -> int:
        return len(self._table)

    def allow(self, source: str, now: float) -> bool:
        table = self._table
        bucket = table.get(source)
        if bucket is None:
            if len(table) >= self.limit:
                _, evicted = table.popitem(last=False)
                self.limited -= evicted.limited
            bucket = table[source] = TokenBucket(self.rate, self.burst, now)
        else:
            table.move_to_end(source)
        ok = bucket.take(now)
        if ok == bucket.limited:  # the source changed state (limited <-> not limited)
            self.limited += -1 if ok else 1
            bucket.limited = not ok
        return ok
