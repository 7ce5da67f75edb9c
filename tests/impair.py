"""A seeded userspace impairment relay for UDP (this kernel has no netem).

Stands between a prober and an echo target on loopback: what the prober sends goes to the target
at once, unchanged; what the target answers is impaired on its way back -- dropped, held for a
delay (constant + uniform random jitter, which reorders when one answer's hold ends before an
earlier one's), sometimes held far longer (a ``late`` answer), duplicated -- by a generator
seeded per relay, and every decision is recorded with what it actually did (the hold measured
on this relay's clock). The prober's estimates are checked against this record.

The return path is the impaired one because an echo may itself refuse duplicates (wirekit-udp's
loop defence does not answer the same bytes from the same source twice within its window):
impairing answers tests the prober, not the target.

One thread, one socket pair, ``select`` with microsecond timeouts and a heap of due sends;
arrivals timed by the kernel (``SO_TIMESTAMPNS``), holds counted from them;
``stop()`` ends it within one tick. Answers are keyed by the probe's sequence number (bytes
12..20 of wirekit-probe's header); anything else is passed through and counted.
"""

from __future__ import annotations

import heapq
import itertools
import random
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

_SEQ = struct.Struct(">Q")
SO_TIMESTAMPNS = 35  # Linux; SCM_TIMESTAMPNS is the same number
_TIMESPEC = struct.Struct("@ll")


def _receive(sock: socket.socket) -> tuple[bytes, tuple[str, int], float]:
    """A datagram, its source, and when the kernel received it (monotonic clock): the
    relay's own wake-up delay is then not mistaken for the path's."""
    data, ancillary, _, addr = sock.recvmsg(65536, socket.CMSG_SPACE(_TIMESPEC.size))
    now = time.monotonic()
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            sec, nsec = _TIMESPEC.unpack_from(payload)
            return data, addr, min(now, sec + nsec * 1e-9 - time.time() + now)
    return data, addr, now


@dataclass(frozen=True)
class Impairment:
    loss: float = 0.0
    delay_s: float = 0.0
    jitter_s: float = 0.0  # uniform in [0, jitter_s) on top of delay_s
    duplicate: float = 0.0
    late: float = 0.0  # held late_s instead of delay_s + jitter
    late_s: float = 0.0
    #: Only probes below this sequence number are held late or duplicated (so that every
    #: late or second copy reaches the prober before it has its last answer and stops).
    extra_before: int = 0
    seed: int = 0


@dataclass
class Record:
    dropped: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)
    held_late: list[int] = field(default_factory=list)
    #: The first copy of each answer, in the order sent: (seq, hold, round trip), seconds, as
    #: measured here: the hold from the answer's arrival, the round trip from the probe's.
    forwarded: list[tuple[int, float, float]] = field(default_factory=list)
    other: int = 0


class UdpImpairmentRelay:
    def __init__(self, target: tuple[str, int], impairment: Impairment) -> None:
        self.target = target
        self.impairment = impairment
        self.rng = random.Random(impairment.seed)
        self.record = Record()
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.bind(("127.0.0.1", 0))
        for sock in (self.front, self.back):  # arrivals as the kernel saw them, not this thread
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.port = self.front.getsockname()[1]
        self.client: tuple[str, int] | None = None
        self._due: list[tuple[float, int, bytes, int, float, bool]] = []
        self._probed: dict[int, float] = {}  # seq -> when its probe came in
        self._order = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="impairment relay", daemon=True)

    def __enter__(self) -> UdpImpairmentRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive(), "the relay did not stop"
        self.front.close()
        self.back.close()

    def _schedule(self, at: float, data: bytes, seq: int, arrived: float, first: bool) -> None:
        self._order += 1
        heapq.heappush(self._due, (at, self._order, data, seq, arrived, first))

    def _answer(self, data: bytes, now: float) -> None:
        if len(data) < 20:
            self.record.other += 1
            self._schedule(now, data, -1, now, False)
            return
        seq = _SEQ.unpack_from(data, 12)[0]
        imp, rng = self.impairment, self.rng
        # Always the same draws in the same order: one seed, one story.
        lose, dup, late, jitter = rng.random(), rng.random(), rng.random(), rng.random()
        if lose < imp.loss:
            self.record.dropped.append(seq)
            return
        if late < imp.late and seq < imp.extra_before:
            hold = imp.late_s
            self.record.held_late.append(seq)
        else:
            hold = imp.delay_s + jitter * imp.jitter_s
        self._schedule(now + hold, data, seq, now, True)
        if dup < imp.duplicate and seq < imp.extra_before:
            self.record.duplicated.append(seq)
            self._schedule(now + hold + 0.0002, data, seq, now, False)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            while self._due and self._due[0][0] <= now:
                _, _, data, seq, arrived, first = heapq.heappop(self._due)
                if self.client is not None:
                    self.front.sendto(data, self.client)
                if first:
                    sent = time.monotonic()
                    probed = self._probed.pop(seq, arrived)
                    self.record.forwarded.append((seq, sent - arrived, sent - probed))
            timeout = 0.05 if not self._due else max(0.0, self._due[0][0] - time.monotonic())
            readable, _, _ = select.select([self.front, self.back], [], [], min(timeout, 0.05))
            for sock in readable:
                try:
                    data, addr, arrived = _receive(sock)
                except OSError:
                    continue
                if sock is self.front:
                    self.client = addr
                    if len(data) >= 20:
                        self._probed[_SEQ.unpack_from(data, 12)[0]] = arrived
                    self.back.sendto(data, self.target)
                elif addr == self.target:
                    self._answer(data, arrived)
                else:
                    self.record.other += 1


def rfc4737_reordered(sequence: list[int]) -> int:
    """How many of ``sequence`` (arrival order, no duplicates) arrived below the next
    expected number."""
    next_expected, count = 0, 0
    for seq in sequence:
        if seq < next_expected:
            count += 1
        else:
            next_expected = seq + 1
    return count


def rfc3550_jitter(transits: list[float]) -> float:
    jitter = 0.0
    for before, after in itertools.pairwise(transits):
        jitter += (abs(after - before) - jitter) / 16
    return jitter
