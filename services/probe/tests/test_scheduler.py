"""The udp runners' scheduler: probes whose windows overlap share one wake-up, none goes
before its window opens or is left behind, a cancelled one never runs."""

from __future__ import annotations

import asyncio
import time
from functools import partial

from hypothesis import given, settings
from hypothesis import strategies as st

from wirekit_probe.runners import SLACK_S, Pacer, Scheduler
from wirekit_probe.series import Series
from wirekit_probe.targets import Endpoint
from wirekit_probe.tracker import Tracker


async def test_overlapping_windows_share_one_wake_up() -> None:
    scheduler = Scheduler(asyncio.get_running_loop())
    ran: list[tuple[str, float]] = []
    done = asyncio.Event()

    def record(name: str) -> None:
        ran.append((name, time.monotonic()))

    for name, delay in (("a", 0.050), ("b", 0.052), ("c", 0.055)):
        scheduler.call_later(delay, 0.01, partial(record, name))
    scheduler.call_later(0.2, 0.01, done.set)
    async with asyncio.timeout(5):
        await done.wait()
    assert [n for n, _ in ran] == ["a", "b", "c"]
    # One wake-up: c went early, with a, at most its slack before its time.
    assert ran[2][1] - ran[0][1] < 0.005


async def test_without_slack_nothing_runs_before_its_time_and_cancelled_never_runs() -> None:
    scheduler = Scheduler(asyncio.get_running_loop())
    late: list[float] = []
    ran: list[str] = []
    started = time.monotonic()
    for i in range(20):
        due = started + 0.005 * i

        def check(due: float = due) -> None:
            late.append(time.monotonic() - due)

        scheduler.call_later(0.005 * i, 0.0, check)
    scheduler.call_later(0.01, 0.01, lambda: ran.append("cancelled")).cancel()
    done = asyncio.Event()
    scheduler.call_later(0.2, 0.0, done.set)
    async with asyncio.timeout(5):
        await done.wait()
    assert len(late) == 20
    assert min(late) >= -1e-3  # the timer's own rounding (a millisecond), never a slack
    assert ran == []


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.03), st.floats(0, 2 * SLACK_S)), min_size=1, max_size=30))
def test_every_callback_runs_once_within_its_window(entries: list[tuple[float, float]]) -> None:
    """A model: each runs exactly once, not before its time minus its slack (and the timer's
    millisecond), and callbacks scheduled by callbacks run too."""

    async def main() -> None:
        scheduler = Scheduler(asyncio.get_running_loop())
        runs: dict[int, list[float]] = {}
        earliest: dict[int, float] = {}
        for i, (delay, slack) in enumerate(entries):
            earliest[i] = time.monotonic() + delay - min(slack, delay)

            def run(i: int = i) -> None:
                runs.setdefault(i, []).append(time.monotonic())
                if i == 0 and len(runs[0]) == 1:  # a callback that schedules again (a runner)
                    earliest[-1] = time.monotonic() + 0.002 - SLACK_S / 4
                    scheduler.call_later(0.002, SLACK_S / 4, lambda: runs.setdefault(-1, [])
                                         .append(time.monotonic()))  # fmt: skip

            scheduler.call_later(delay, slack, run)
        async with asyncio.timeout(5):
            while len(runs) < len(entries) + 1:  # noqa: ASYNC110 -- polls a plain dict
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        assert all(len(times) == 1 for times in runs.values()), runs
        assert all(runs[i][0] >= earliest[i] - 1e-3 for i in runs)

    asyncio.run(main())


def test_the_pacer_slack_is_at_most_a_quarter_of_the_interval() -> None:
    s = Series(Endpoint("udp", "x", "127.0.0.1", 7), Tracker(1.0))
    assert Pacer(lambda: 10.0, None, s).slack() == SLACK_S
    assert Pacer(lambda: 500.0, None, s).slack() == 0.25 / 500
