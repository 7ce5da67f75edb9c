"""The pacer: Poisson intervals around the asked rate, and the budget behind every probe."""

from __future__ import annotations

import statistics
import time

from wirekit_probe.runners import Pacer
from wirekit_probe.series import Series
from wirekit_probe.targets import Endpoint
from wirekit_probe.tracker import Tracker
from wirekit_servicekit.ratelimit import TokenBucket


def series() -> Series:
    return Series(Endpoint("udp", "x", "127.0.0.1", 7), Tracker(1.0))


async def test_the_budget_is_never_exceeded_and_skips_are_counted() -> None:
    s = series()
    budget = TokenBucket(20.0, 1, time.monotonic())
    pacer = Pacer(lambda: 1000.0, budget, s)  # asks 50 x the budget
    started = time.monotonic()
    went = 0
    for _ in range(300):
        went += await pacer.next()
    elapsed = time.monotonic() - started
    assert went <= 20 * elapsed + 1
    assert s.skipped == 300 - went
    assert s.skipped > 0


async def test_intervals_are_exponential_around_the_rate() -> None:
    pacer = Pacer(lambda: 2000.0, TokenBucket(1e9, 10**9, time.monotonic()), series())
    gaps = [pacer.rng.expovariate(pacer.rate()) for _ in range(20_000)]
    mean = statistics.fmean(gaps)
    assert abs(mean - 1 / 2000) < 0.05 / 2000
    # Exponential: the standard deviation equals the mean (a fixed interval would have 0).
    assert abs(statistics.pstdev(gaps) - mean) < 0.05 * mean
