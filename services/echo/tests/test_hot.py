"""``wirekit_echo._hot`` in whichever build runs (``make test-compiled`` runs this file against
the C build): its histogram and counters against a model, and its checks of what it is given.
The protocols over real sockets are the other test files' work (test_model's hypothesis streams
split at every boundary, frames at the limit and over it)."""

from __future__ import annotations

import math
from bisect import bisect_left

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.utils import floatToGoString

from wirekit_echo import _hot
from wirekit_echo.protocol import LATENCY_BUCKETS

values = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(LATENCY_BUCKETS)


@given(st.lists(values, max_size=200))
def test_buckets_count_as_prometheus_does(observed: list[float]) -> None:
    buckets = _hot.Buckets(reversed(LATENCY_BUCKETS))  # given in any order
    for value in observed:
        buckets.observe(value)
    bounds = sorted(LATENCY_BUCKETS)
    counts = [0] * (len(bounds) + 1)
    for value in observed:
        counts[bisect_left(bounds, value)] += 1  # le: a value equal to a bound is in it
    cumulative, total = buckets.cumulative()
    assert [label for label, _ in cumulative] == [*map(floatToGoString, bounds), "+Inf"]
    assert [count for _, count in cumulative] == [float(sum(counts[: i + 1])) for i in range(14)]
    assert buckets.counts == counts
    assert buckets.bounds == bounds
    want = 0.0
    for value in observed:
        want += value  # in order, as observe() adds: the same float, bit for bit
    assert total == want or (math.isnan(total) and math.isnan(want))


def test_a_cell_counts_what_it_is_given() -> None:
    cell = _hot.Cell()
    assert cell.n == 0
    cell.n += 2**40
    cell.n += 3
    assert cell.n == 2**40 + 3


def test_the_build_is_named() -> None:
    expected = "compiled" if _hot.__file__.endswith(".so") else "pure"
    assert expected == _hot.BUILD


def test_a_core_never_initialised_refuses_reads() -> None:
    """A subclass that skips Core.__init__ gets an error from a read, never a crash."""
    core = _hot.Core.__new__(_hot.Core)
    for read in (core.raw_data_received, core.framed_data_received):
        with pytest.raises((RuntimeError, AttributeError)):
            read(b"\x00\x00\x00\x01x")


def test_the_c_core_refuses_a_context_without_its_counters() -> None:
    """The C build reads the counters through their C structures, so it checks their types;
    the pure build takes any object with their interface."""

    class Handling:
        buckets = _hot.Buckets([1.0])

    class Context:
        received = sent = frames = _hot.Cell()
        max_frame_size = 100
        handling = Handling()

    core = _hot.Core(Context())  # type: ignore[arg-type]
    assert (core.activity, core.frame_started, core.finished, core.pending) == (0, 0.0, False, 0)
    Handling.buckets = [0]  # type: ignore[assignment]
    if _hot.BUILD == "compiled":
        with pytest.raises(TypeError, match=r"buckets must be a wirekit_echo\._hot\.Buckets"):
            _hot.Core(Context())  # type: ignore[arg-type]
    else:
        assert _hot.Core(Context()).ctx is not None  # type: ignore[arg-type]
