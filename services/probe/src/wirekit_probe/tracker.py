"""What the replies to one target's probes say about the path, sans-I/O: each probe sent and
each reply received goes in with its time, and out come the counts and estimates.

The rules (what the metrics and the summary mean):

- **lost**: a probe with no reply within ``timeout_s`` of its sending (``expire`` declares it).
- **late**: a reply to a probe already declared lost -- counted here, not as received; lost
  stays lost (a loss rate does not change after the fact).
- **duplicate**: a second (third, ...) reply to the same probe; never counted as received.
- **reordered** (RFC 4737 section 3.3): a reply on time whose sequence number is lower than
  the next one expected (one more than the highest received so far). Duplicates and late
  replies take no part.
- **rtt**: from this prober's own record of the send to the reply's arrival, on-time replies
  only.
- **jitter** (RFC 3550 section 6.4.1 interarrival jitter, applied to round trips): for each
  on-time reply after the first, ``J += (|rtt - previous rtt| - J) / 16``, replies in arrival
  order. Smoothed over about 16 replies; it follows changes in delay, not the absolute delay.
- **hops**: from the TTL (IPv4) or hop limit (IPv6) the reply arrived with: the smallest of the
  usual initial values (64, 128, 255) not below it, minus it. An echo that sets its own TTL
  shows the path back from it; wirekit-udp and most hosts start at 64.

Memory: the probes in flight (at most ``limit``; beyond it the oldest are declared lost) and a
ring of the last ``window`` sequence numbers answered or lost (36 KiB), to recognise duplicates
and late replies -- a reply to a probe older than that is ``unknown``.
"""

from __future__ import annotations

import enum
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

INITIAL_TTLS = (64, 128, 255)
_NONE, _ANSWERED, _LOST = 0, 1, 2


class Outcome(enum.Enum):
    RECEIVED = "received"
    LATE = "late"
    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"  # a sequence number never sent, or forgotten long ago


def hops_from_ttl(ttl: int) -> int:
    """Hops a reply crossed, from the TTL it arrived with (see the module's rules)."""
    for initial in INITIAL_TTLS:
        if ttl <= initial:
            return initial - ttl
    return 0


@dataclass
class Tracker:
    timeout_s: float
    limit: int = 65_536
    #: How many of the latest sequence numbers are remembered as answered or lost.
    window: int = 4096
    sent: int = 0
    received: int = 0
    lost: int = 0
    late: int = 0
    duplicate: int = 0
    reordered: int = 0
    jitter_s: float = 0.0
    last_rtt_s: float | None = None
    last_ttl: int | None = None
    _next_expected: int = 0
    _in_flight: OrderedDict[int, float] = field(default_factory=OrderedDict)
    #: A ring of the last ``window`` sequence numbers answered or lost (slot seq % window):
    #: which number holds the slot, and its state -- 9 bytes a slot, nothing that grows.
    _seqs: array[int] = field(init=False)
    _states: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self._seqs = array("q", [-1]) * self.window
        self._states = bytearray(self.window)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def on_send(self, seq: int, now: float) -> None:
        self.sent += 1
        self._in_flight[seq] = now
        if len(self._in_flight) > self.limit:
            oldest, _ = self._in_flight.popitem(last=False)
            self._lose(oldest)

    def expire(self, now: float) -> int:
        """Declare lost every probe sent ``timeout_s`` or longer ago; how many were."""
        count = 0
        in_flight = self._in_flight
        while in_flight:
            seq, sent_at = next(iter(in_flight.items()))
            if now - sent_at < self.timeout_s:
                break
            del in_flight[seq]
            self._lose(seq)
            count += 1
        return count

    def expire_all(self) -> int:
        """At the end of a run: every probe still in flight is lost."""
        return self.expire(float("inf"))

    def on_reply(self, seq: int, now: float, ttl: int | None = None) -> tuple[Outcome, float]:
        """Classify a reply to probe ``seq`` arriving at ``now``; with its RTT when RECEIVED
        (0.0 otherwise)."""
        sent_at = self._in_flight.pop(seq, None)
        if sent_at is None:
            state = self._state(seq)
            if state == _ANSWERED:
                self.duplicate += 1
                return Outcome.DUPLICATE, 0.0
            if state == _LOST:
                self._remember(seq, _ANSWERED)  # a second copy is a duplicate
                self.late += 1
                return Outcome.LATE, 0.0
            return Outcome.UNKNOWN, 0.0
        rtt = max(0.0, now - sent_at)
        self.received += 1
        self._remember(seq, _ANSWERED)
        if seq < self._next_expected:
            self.reordered += 1
        else:
            self._next_expected = seq + 1
        if self.last_rtt_s is not None:
            self.jitter_s += (abs(rtt - self.last_rtt_s) - self.jitter_s) / 16
        self.last_rtt_s = rtt
        if ttl is not None:
            self.last_ttl = ttl
        return Outcome.RECEIVED, rtt

    @property
    def hops(self) -> int | None:
        return None if self.last_ttl is None else hops_from_ttl(self.last_ttl)

    def _lose(self, seq: int) -> None:
        self.lost += 1
        self._remember(seq, _LOST)

    def _state(self, seq: int) -> int:
        slot = seq % self.window
        return self._states[slot] if self._seqs[slot] == seq else _NONE

    def _remember(self, seq: int, state: int) -> None:
        slot = seq % self.window
        self._seqs[slot] = seq
        self._states[slot] = state
