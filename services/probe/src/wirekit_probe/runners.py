"""The three modules as coroutines, one per endpoint: ``count`` probes (a /probe burst) or
forever (the service), at Poisson intervals around ``1 / rate()``, each probe first taking a
token of the shared packet budget (none left: the probe is skipped and counted). Every wait
has a deadline; a runner owns its socket or connection and closes it however it ends."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import random
import secrets
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from wirekit_framing import FramingError, read_frame, write_frame
from wirekit_servicekit.ratelimit import TokenBucket

from .series import Series
from .tracker import Outcome
from .udp import UdpTarget
from .wire import MAX_SIZE, NotAReply, decode, encode

Rate = Callable[[], float]

#: How much earlier than its time a udp probe may go so that it shares a wake-up with others
#: (never more than a quarter of its target's mean interval): see :class:`Scheduler`.
SLACK_S = 0.02


class _Entry:
    __slots__ = ("callback", "due", "earliest")

    def __init__(self, due: float, earliest: float, callback: Callable[[], None]) -> None:
        self.due, self.earliest = due, earliest
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.callback = None


class Scheduler:
    """One timer for every udp runner of a loop. Each probe has a time (``due``, on the
    Poisson schedule) and may go up to ``slack`` before it; one wake-up sends every probe whose
    window is open. At 1,000 probes/s over 100 targets a wake-up costs more than the probe
    itself (about 60 us here, with an empty callback), and twenty probes share one instead of
    each having its own -- and their replies come back together. The round trip is timed from
    the real send, so the estimates are unchanged; a target's own probes still go one by one
    (the slack is at most a quarter of its mean interval), and the intervals stay exponential
    at scales above the slack (RFC 2330 11.1.1 allows for the clock's granularity)."""

    _of: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Scheduler]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, _Entry]] = []  # (due, order, entry): compared in C
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._when = math.inf
        self._ticking = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Scheduler:
        """The loop's scheduler (one per loop, made when first asked)."""
        found = cls._of.get(loop)
        if found is None:
            found = cls._of[loop] = cls(loop)
        return found

    def call_later(self, delay: float, slack: float, callback: Callable[[], None]) -> _Entry:
        due = time.monotonic() + delay
        entry = _Entry(due, due - min(slack, delay), callback)
        heapq.heappush(self._heap, (due, next(self._order), entry))
        if not self._ticking and due < self._when:
            self._arm()
        return entry

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        heap = self._heap
        while heap and heap[0][2].callback is None:
            heapq.heappop(heap)
        if not heap:
            self._when = math.inf
            return
        self._when = heap[0][0]
        self._timer = self.loop.call_later(max(0.0, self._when - time.monotonic()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = time.monotonic()
        heap, ready, later = self._heap, [], []
        while heap and heap[0][0] - SLACK_S <= now:
            item = heapq.heappop(heap)
            entry = item[2]
            if entry.callback is not None:
                if entry.earliest <= now:
                    ready.append(entry)
                else:
                    later.append(item)
        for item in later:
            heapq.heappush(heap, item)
        self._ticking = True
        try:
            for entry in ready:  # what they schedule goes in the heap for the next wake-up
                callback, entry.callback = entry.callback, None
                if callback is not None:
                    callback()
        finally:
            self._ticking = False
            self._arm()


class Pacer:
    """Poisson intervals (RFC 2330 11.1.1) -- or fixed ones -- on an absolute schedule (a
    probe sent late does not push the next ones back; after a stall of over a second the
    schedule starts again from now rather than catching up in a burst), and the budget."""

    def __init__(
        self,
        rate: Rate,
        budget: TokenBucket | None,
        series: Series,
        *,
        seed: int | None = None,
        poisson: bool = True,
    ) -> None:
        self.rate = rate
        self.budget = budget
        self.series = series
        self.poisson = poisson
        seed = seed if seed is not None else secrets.randbits(64)
        self.rng = random.Random(seed)  # noqa: S311 -- intervals, not secrets
        self.due: float | None = None  # the first probe goes at once
        self._rate = 0.0  # rate() when the schedule was last advanced

    def delay(self) -> float:
        """Seconds until the next probe's time (0 for the first), the schedule advanced."""
        now = time.monotonic()
        if self.due is None:
            self.due = now
            return 0.0
        rate = self._rate = self.rate()
        gap = self.rng.expovariate(rate) if self.poisson else 1.0 / rate
        self.due = max(self.due + gap, now - 1.0)
        return max(0.0, self.due - now)

    def slack(self) -> float:
        """How early a probe may go to share a wake-up: SLACK_S, at most a quarter of the
        mean interval."""
        return min(SLACK_S, 0.25 / (self._rate or self.rate()))

    def allowed(self) -> bool:
        """Whether the budget lets a probe go now (a refusal is counted as skipped)."""
        if self.budget is None or self.budget.take(time.monotonic()):
            return True
        self.series.skipped += 1
        return False

    async def next(self) -> bool:
        """Wait for the next probe's time; whether the budget lets it go."""
        delay = self.delay()
        if delay > 0:
            await asyncio.sleep(delay)
        return self.allowed()


async def _settle(series: Series, timeout_s: float) -> None:
    """After the last probe of a burst: until every reply is in or has had its timeout."""
    deadline = time.monotonic() + timeout_s
    while series.tracker.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
    series.tracker.expire_all()


async def run_udp(
    series: Series, pacer: Pacer, *, size: int, timeout_s: float, count: int | None = None
) -> None:
    """Driven by the loop's :class:`Scheduler`, not a task that sleeps: at a thousand probes a
    second, a callback costs a fraction of a sleep's future and task switch, and probes of
    several targets share a wake-up."""
    e = series.endpoint
    address = (e.address, e.port, 0, 0) if ":" in e.address else (e.address, e.port)
    target = UdpTarget(address, e.family, size=size, timeout_s=timeout_s,
                       nonce=secrets.randbits(64), on_rtt=series.on_rtt, tracker=series.tracker,
                       invalid=series.invalid)  # fmt: skip
    loop = asyncio.get_running_loop()
    scheduler = Scheduler.of(loop)
    finished: asyncio.Future[None] = loop.create_future()
    left = count
    handle: _Entry | None = None

    def fire() -> None:
        nonlocal left, handle
        series.tracker.expire(time.monotonic())
        if pacer.allowed():
            target.send()
        if left is not None:
            left -= 1
            if left <= 0:
                if not finished.done():
                    finished.set_result(None)
                return
        handle = scheduler.call_later(pacer.delay(), pacer.slack(), fire)

    target.start(loop)
    try:
        handle = scheduler.call_later(pacer.delay(), pacer.slack(), fire)
        await finished
        await _settle(series, timeout_s)
    finally:
        if handle is not None:
            handle.cancel()
        target.close()


async def _connect(
    series: Series, timeout_s: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A handshake, counted by result and timed; None when it failed."""
    e = series.endpoint
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            streams = await asyncio.open_connection(e.address, e.port)
    except ConnectionRefusedError:
        series.on_connect("refused")
        return None
    except TimeoutError:
        series.on_connect("timeout")
        return None
    except OSError:
        series.on_connect("error")
        return None
    series.on_connect("ok", time.monotonic() - started)
    return streams


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()


async def run_tcp_connect(
    series: Series, pacer: Pacer, *, connect_timeout_s: float, count: int | None = None
) -> None:
    """Each probe a handshake: sent = attempts, received = handshakes, rtt = its time."""
    tracker = series.tracker
    for seq in itertools.count() if count is None else range(count):
        if not await pacer.next():
            continue
        tracker.on_send(seq, time.monotonic())
        streams = await _connect(series, connect_timeout_s)
        if streams is None:
            tracker.expire_all()
        else:
            _, rtt = tracker.on_reply(seq, time.monotonic())
            series.on_rtt(rtt)
            await _close(streams[1])


async def run_tcp_framed(
    series: Series,
    pacer: Pacer,
    *,
    size: int,
    timeout_s: float,
    connect_timeout_s: float,
    count: int | None = None,
) -> None:
    """One persistent connection to echo framed, one frame in flight. A frame not back
    within ``timeout_s``, a broken connection, or a reply that is not ours: the probe is lost
    and the connection closed; the next probe connects again (probe_connects_total). A probe
    that cannot connect is lost too: a dead target is 100 % loss. A connection the echo ended
    cleanly between probes (its drain half-closes quiet connections) costs no probe: the next
    one goes on a new connection."""
    tracker, nonce = series.tracker, secrets.randbits(64)
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        for seq in itertools.count() if count is None else range(count):
            if not await pacer.next():
                continue
            if streams is not None and streams[0].at_eof():
                # The echo ended the connection cleanly between two probes (a drain, a
                # restart): nothing was owed, so nothing is lost -- connect again.
                await _close(streams[1])
                streams = None
            tracker.on_send(seq, time.monotonic())
            if streams is None:
                streams = await _connect(series, connect_timeout_s)
                if streams is None:
                    tracker.expire_all()
                    continue
            reader, writer = streams
            try:
                async with asyncio.timeout(timeout_s):  # the round trip's deadline
                    await write_frame(writer, encode(nonce, seq, time.monotonic_ns(), size))
                    reply = await read_frame(reader, MAX_SIZE)
                if reply is None:
                    raise ConnectionResetError("the echo closed the connection")
                outcome, rtt = tracker.on_reply(decode(reply, nonce, size).seq, time.monotonic())
                if outcome is not Outcome.RECEIVED:
                    raise NotAReply("unknown")
                series.on_rtt(rtt)
                continue
            except NotAReply as exc:
                series.invalid[exc.reason] += 1
            except FramingError:  # a length over MAX_SIZE, a frame cut short
                series.invalid["frame"] += 1
            except (TimeoutError, OSError):
                pass
            tracker.expire_all()
            streams = None
            await _close(writer)
    finally:
        if streams is not None:
            await _close(streams[1])


def run_module(
    series: Series,
    pacer: Pacer,
    *,
    size: int,
    timeout_s: float,
    connect_timeout_s: float,
    count: int | None = None,
) -> Coroutine[Any, Any, None]:
    """The runner of ``series``' module."""
    module = series.endpoint.module
    if module == "udp":
        return run_udp(series, pacer, size=size, timeout_s=timeout_s, count=count)
    if module == "tcp-framed":
        return run_tcp_framed(series, pacer, size=size, timeout_s=timeout_s,
                              connect_timeout_s=connect_timeout_s, count=count)  # fmt: skip
    return run_tcp_connect(series, pacer, connect_timeout_s=connect_timeout_s, count=count)
