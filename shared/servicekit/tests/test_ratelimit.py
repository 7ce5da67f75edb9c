"""Token buckets alone and per source (sans-I/O): every step at an explicit time, every value
exact (times and rates are chosen so that the arithmetic is exact in binary floating point)."""

from __future__ import annotations

from typing import Literal

import pytest

from wirekit_servicekit.ratelimit import SourceLimiter, TokenBucket

BucketCall = Literal["take", "level", "ready", "wait_s"]
#: (call, now, expected result)
BucketStep = tuple[BucketCall, float, float | bool]


def _call_bucket(bucket: TokenBucket, call: BucketCall, now: float) -> float | bool:
    if call == "take":
        return bucket.take(now)
    if call == "level":
        return bucket.level(now)
    if call == "ready":
        return bucket.ready(now)
    return bucket.wait_s(now)


@pytest.mark.parametrize(
    ("rate", "burst", "steps"),
    [
        pytest.param(
            4.0, 2,
            [
                ("level", 0.0, 2.0), ("ready", 0.0, True), ("wait_s", 0.0, 0.0),
                ("take", 0.0, True), ("level", 0.0, 1.0),
                ("take", 0.0, True), ("level", 0.0, 0.0),
                ("ready", 0.0, False), ("wait_s", 0.0, 0.25),
                ("take", 0.0, False), ("level", 0.0, 0.0),
                ("level", 0.125, 0.5), ("ready", 0.125, False), ("wait_s", 0.125, 0.125),
                ("level", 0.25, 1.0), ("ready", 0.25, True), ("wait_s", 0.25, 0.0),
                ("take", 0.25, True), ("level", 0.25, 0.0), ("take", 0.25, False),
            ],
            id="drains-then-refills-at-rate",
        ),
        pytest.param(
            1.0, 1,
            [
                ("ready", 0.0, True), ("ready", 0.0, True), ("level", 0.0, 1.0),
                ("wait_s", 0.0, 0.0), ("take", 0.0, True), ("take", 0.0, False),
            ],
            id="peeking-takes-nothing",
        ),
        pytest.param(
            1.0, 1,
            [
                ("take", 0.0, True),
                ("take", 0.5, False),  # refused: the half token earned so far is kept
                ("level", 0.5, 0.5), ("wait_s", 0.5, 0.5),
                ("take", 1.0, True), ("level", 1.0, 0.0),
            ],
            id="a-refused-take-keeps-what-was-earned",
        ),
        pytest.param(
            2.0, 3,
            [
                ("take", 0.0, True), ("level", 100.0, 3.0),
                ("take", 100.0, True), ("take", 100.0, True), ("take", 100.0, True),
                ("take", 100.0, False), ("wait_s", 100.0, 0.5),
            ],
            id="capped-at-burst",
        ),
    ],
)  # fmt: skip
def test_token_bucket(rate: float, burst: int, steps: list[BucketStep]) -> None:
    bucket = TokenBucket(rate, burst, 0.0)
    for i, (call, now, expected) in enumerate(steps):
        got = _call_bucket(bucket, call, now)
        assert (type(got), got) == (type(expected), expected), f"step {i}: {call}({now})"


LimiterCall = Literal["allow", "ready", "wait_s"]
#: (call, source, now, expected result, ``limited`` after, ``len`` after)
LimiterStep = tuple[LimiterCall, str, float, float | bool, int, int]


def _call_limiter(limiter: SourceLimiter, call: LimiterCall, source: str, now: float) -> object:
    if call == "allow":
        return limiter.allow(source, now)
    if call == "ready":
        return limiter.ready(source, now)
    return limiter.wait_s(source, now)


@pytest.mark.parametrize(
    ("rate", "burst", "limit", "steps"),
    [
        pytest.param(
            1.0, 3, 8,
            [
                ("allow", "a", 0.0, True, 0, 1), ("allow", "a", 0.0, True, 0, 1),
                ("allow", "a", 0.0, True, 0, 1), ("allow", "a", 0.0, False, 1, 1),
                ("allow", "b", 0.0, True, 1, 2),  # a new source gets a full bucket
            ],
            id="a-bucket-per-source",
        ),
        pytest.param(
            1.0, 1, 8,
            [
                ("ready", "x", 0.0, True, 0, 0), ("wait_s", "x", 0.0, 0.0, 0, 0),
                ("allow", "x", 0.0, True, 0, 1),
                ("ready", "x", 0.0, False, 0, 1), ("wait_s", "x", 0.0, 1.0, 0, 1),
                ("ready", "y", 0.0, True, 0, 1), ("wait_s", "y", 0.0, 0.0, 0, 1),
            ],
            id="unknown-sources-are-ready-and-not-added",
        ),
        pytest.param(
            1.0, 1, 8,
            [
                ("allow", "a", 0.0, True, 0, 1),
                ("allow", "a", 0.0, False, 1, 1),
                ("allow", "a", 0.25, False, 1, 1),  # still limited: counted once
                ("allow", "b", 0.25, True, 1, 2),
                ("allow", "b", 0.5, False, 2, 2),
                ("allow", "a", 1.0, True, 1, 2),  # a regained a token: no longer limited
                ("allow", "a", 1.0, False, 2, 2),  # limited again
                ("allow", "b", 1.5, True, 1, 2),
            ],
            id="limited-counts-sources-whose-last-event-was-refused",
        ),
        pytest.param(
            1.0, 1, 2,
            [
                ("allow", "a", 0.0, True, 0, 1),
                ("allow", "b", 0.0, True, 0, 2),
                ("allow", "a", 0.0, False, 1, 2),  # a seen again: b is now the oldest
                ("allow", "c", 0.0, True, 1, 2),  # b forgotten
                ("ready", "b", 0.0, True, 1, 2), ("wait_s", "b", 0.0, 0.0, 1, 2),
                ("ready", "a", 0.0, False, 1, 2), ("wait_s", "a", 0.0, 1.0, 1, 2),
                ("ready", "c", 0.0, False, 1, 2),
                ("allow", "b", 0.0, True, 0, 2),  # b new again (full bucket); limited a forgotten
                ("ready", "a", 0.0, True, 0, 2), ("wait_s", "a", 0.0, 0.0, 0, 2),
                ("ready", "c", 0.0, False, 0, 2),
            ],
            id="least-recently-seen-forgotten-first",
        ),
        pytest.param(
            1.0, 1, 2,
            [
                ("allow", "a", 0.0, True, 0, 1), ("allow", "a", 0.0, False, 1, 1),
                ("allow", "b", 0.0, True, 1, 2), ("allow", "b", 0.0, False, 2, 2),
                ("allow", "c", 0.0, True, 1, 2),  # evicts limited a
                ("allow", "d", 0.0, True, 0, 2),  # evicts limited b
                ("allow", "d", 0.0, False, 1, 2),
                ("allow", "e", 0.0, True, 1, 2),  # evicts c, not limited: count unchanged
                ("allow", "f", 0.0, True, 0, 2),  # evicts limited d
            ],
            id="evicting-a-limited-source-uncounts-it",
        ),
        pytest.param(
            1.0, 1, 1,
            [
                ("allow", "a", 0.0, True, 0, 1), ("allow", "a", 0.0, False, 1, 1),
                ("allow", "b", 0.0, True, 0, 1), ("allow", "b", 0.0, False, 1, 1),
                ("allow", "a", 0.0, True, 0, 1),  # forgotten: a full bucket again
            ],
            id="table-of-one",
        ),
    ],
)  # fmt: skip
def test_source_limiter(rate: float, burst: int, limit: int, steps: list[LimiterStep]) -> None:
    limiter = SourceLimiter(rate, burst, limit)
    for i, (call, source, now, expected, limited, size) in enumerate(steps):
        got = _call_limiter(limiter, call, source, now)
        state = (type(got), got, limiter.limited, len(limiter))
        assert state == (type(expected), expected, limited, size), (
            f"step {i}: {call}({source!r}, {now})"
        )
