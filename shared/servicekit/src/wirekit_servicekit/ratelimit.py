"""Token buckets, alone and one per source address in a bounded table (sans-I/O: the caller
passes the time). Used by udp for datagrams and by cmdexec for failed logins."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["SourceLimiter", "TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; each event takes one."""

    __slots__ = ("burst", "limited", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now
        self.limited = False  # SourceLimiter's bookkeeping: its last allow() was refused

    def level(self, now: float) -> float:
        """The tokens it holds at ``now`` (nothing is taken)."""
        return min(self.burst, self.tokens + (now - self.stamp) * self.rate)

    def ready(self, now: float) -> bool:
        """Whether a ``take()`` now would succeed (nothing is taken)."""
        return self.level(now) >= 1.0

    def wait_s(self, now: float) -> float:
        """Seconds until a ``take()`` would succeed (0 when it would now)."""
        return max(0.0, 1.0 - self.level(now)) / self.rate

    def take(self, now: float) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:  # min(): a builtin's call costs more than the comparison
            tokens = self.burst
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False


class SourceLimiter:
    """One token bucket per source address, in a table of at most ``limit`` entries.

    The least recently seen source is forgotten first: a spoofed flood from many addresses
    costs a bounded amount of memory (and a global bucket bounds what all of them get).
    ``limited`` counts sources whose last event was refused: a rate-limited sources gauge.
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
        # bucket.take(now), inlined: this is udp's per-datagram path, where a call costs as
        # much as the arithmetic
        tokens = bucket.tokens + (now - bucket.stamp) * bucket.rate
        if tokens > bucket.burst:
            tokens = bucket.burst
        bucket.stamp = now
        ok = tokens >= 1.0
        bucket.tokens = tokens - 1.0 if ok else tokens
        if ok == bucket.limited:  # the source changed state (limited <-> not limited)
            self.limited += -1 if ok else 1
            bucket.limited = not ok
        return ok

    def ready(self, source: str, now: float) -> bool:
        """Whether ``source`` has a token now (nothing is taken; unknown sources have one)."""
        bucket = self._table.get(source)
        return bucket is None or bucket.ready(now)

    def wait_s(self, source: str, now: float) -> float:
        """Seconds until ``source`` has a token again (0 when it has one now)."""
        bucket = self._table.get(source)
        return 0.0 if bucket is None else bucket.wait_s(now)
