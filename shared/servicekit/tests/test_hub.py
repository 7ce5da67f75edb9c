"""The connection hub, sans-I/O: admission under limits (and its counters), the idle and frame
deadlines at their exact boundaries (``sweep(now)`` with chosen times), the drain, and the
sweeper task the hub owns."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from wirekit_servicekit.hub import (
    REJECT_REASONS,
    CloseReason,
    ConnectionHub,
    ConnectionLimits,
    drain,
    source_key,
)
from wirekit_servicekit.metrics import ConnectionMetrics
from wirekit_servicekit.testing import until

IDLE = CloseReason.IDLE_TIMEOUT
FRAME = CloseReason.FRAME_TIMEOUT
SHUTDOWN = CloseReason.SHUTDOWN

#: Deadlines long enough that the hub's own sweeper (every min(idle, frame)/8 = 5 s) never runs
#: during a test that calls ``sweep`` itself.
SLOW = ConnectionLimits(connections=100, per_source=100, idle_s=80.0, frame_s=40.0)
#: The times given to ``sweep``: a power of two, so that ``BASE + x`` and ``BASE + x - EPS``
#: are exact for the offsets used here, and ``EPS`` is the smallest step that still shows.
BASE = 2.0**20
EPS = 2.0**-30


@dataclass(eq=False)  # hashable by identity, as protocol instances are
class FakeConnection:
    """Records what the hub asks. With ``hub`` set, it leaves the hub on the next loop iteration
    after ``close_now`` (as ``connection_lost`` would), and after ``begin_drain`` too when
    ``finishes_on_drain``."""

    activity: int = 0
    frame_started: float = 0.0
    hub: ConnectionHub | None = None
    finishes_on_drain: bool = False
    drains: int = 0
    closes: list[CloseReason] = field(default_factory=list)

    def begin_drain(self) -> None:
        self.drains += 1
        if self.finishes_on_drain:
            self._leave()

    def close_now(self, reason: CloseReason) -> None:
        self.closes.append(reason)
        self._leave()

    def _leave(self) -> None:
        if self.hub is not None:
            asyncio.get_running_loop().call_soon(self.hub.release, self)


@dataclass
class Hubs:
    """Makes hubs on fresh registries; the fixture closes every one at the end."""

    made: list[ConnectionHub] = field(default_factory=list)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __call__(self, limits: ConnectionLimits = SLOW, *labels: str) -> ConnectionHub:
        self.registry = CollectorRegistry()
        names = ["listener"] if labels else []
        hub = ConnectionHub(limits, ConnectionMetrics("demo", self.registry, names), *labels)
        self.made.append(hub)
        return hub

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(f"demo_connections_{name}", labels)


@pytest.fixture
async def hubs() -> AsyncIterator[Hubs]:
    made = Hubs()
    yield made
    for hub in made.made:
        await hub.aclose()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == [], f"left running: {others}"


@pytest.mark.parametrize(
    ("peername", "key"),
    [
        pytest.param(("192.0.2.7", 4000), "192.0.2.7", id="ipv4"),
        pytest.param(("2001:db8::1", 4000, 0, 0), "2001:db8::/64", id="ipv6-to-its-64"),
        pytest.param(("2001:db8:1:2:3:4:5:6", 1, 0, 0), "2001:db8:1:2::/64", id="ipv6-full"),
        pytest.param(("fe80::1%eth0", 1, 0, 2), "fe80::/64", id="ipv6-scoped"),
        pytest.param(("::1", 1, 0, 0), "::/64", id="ipv6-loopback"),
        pytest.param(("::ffff:192.0.2.7", 1, 0, 0), "192.0.2.7", id="ipv4-mapped"),
        pytest.param(("not:an:address", 1), "not:an:address", id="unparsable-kept"),
        pytest.param("/run/demo.sock", "", id="unix-socket"),
        pytest.param(None, "", id="none"),
        pytest.param((), "", id="empty-tuple"),
        pytest.param(["192.0.2.7", 4000], "", id="not-a-tuple"),
    ],
)
def test_source_key(peername: object, key: str) -> None:
    assert source_key(peername) == key


@pytest.mark.parametrize("labels", [(), ("main",)], ids=["unlabelled", "labelled"])
def test_every_reject_reason_is_exported_at_zero(hubs: Hubs, labels: tuple[str, ...]) -> None:
    hubs(SLOW, *labels)
    extra = {"listener": "main"} if labels else {}
    got = {r: hubs.value("rejected_total", **extra, reason=r) for r in REJECT_REASONS}
    assert got == {"limit": 0.0, "per_source": 0.0, "draining": 0.0}
    assert (hubs.value("opened_total", **extra), hubs.value("active", **extra)) == (0.0, 0.0)


#: (peer address, the connection's name, expected: None = admitted, else the reject reason)
AdmitStep = tuple[str, str, str | None]


@pytest.mark.parametrize(
    ("connections", "per_source", "steps", "open_after"),
    [
        pytest.param(
            3, 2,
            [
                ("10.0.0.1", "a1", None), ("10.0.0.1", "a2", None),
                ("10.0.0.1", "a3", "per_source"),
                ("10.0.0.2", "b1", None),
                ("10.0.0.3", "c1", "limit"),
                ("10.0.0.1", "a4", "limit"),  # over both: the total limit is reported
            ],
            3, id="total-and-per-source",
        ),
        pytest.param(
            10, 1,
            [
                ("2001:db8::1", "v6a", None),
                ("2001:db8::ffff", "v6b", "per_source"),  # same /64
                ("2001:db8:0:1::1", "v6c", None),  # the next /64
                ("::ffff:10.0.0.1", "mapped", None),
                ("10.0.0.1", "v4", "per_source"),  # the mapped one counted as this IPv4
            ],
            3, id="sources-by-64-and-mapped",
        ),
    ],
)  # fmt: skip
async def test_admission(
    hubs: Hubs, connections: int, per_source: int, steps: list[AdmitStep], open_after: int
) -> None:
    hub = hubs(ConnectionLimits(connections, per_source, 80.0, 40.0), "main")
    expected = dict.fromkeys(REJECT_REASONS, 0.0)
    for peer, name, reason in steps:
        conn = FakeConnection()
        assert (hub.admit(conn, (peer, 1234)) is not None) is (reason is None), name
        if reason is not None:
            expected[reason] += 1
    got = {r: hubs.value("rejected_total", listener="main", reason=r) for r in REJECT_REASONS}
    assert got == expected
    assert len(hub) == open_after
    assert hubs.value("opened_total", listener="main") == open_after
    assert hubs.value("active", listener="main") == open_after


async def test_release_frees_the_slots(hubs: Hubs) -> None:
    hub = hubs(ConnectionLimits(connections=2, per_source=1, idle_s=80.0, frame_s=40.0))
    a, b, c, d, e = (FakeConnection() for _ in range(5))
    assert hub.admit(a, ("10.0.0.1", 1))
    assert hub.admit(b, ("10.0.0.2", 1))
    assert not hub.admit(c, ("10.0.0.3", 1))  # limit
    hub.release(a)
    assert (len(hub), hubs.value("active"), hubs.value("opened_total")) == (1, 1.0, 2.0)
    assert hub.admit(c, ("10.0.0.1", 1))  # a's slot, and its source's
    hub.release(b)
    assert not hub.admit(d, ("10.0.0.1", 2))  # per source: the slot is c's now
    assert hub.admit(e, ("10.0.0.2", 2))  # b's source is free again
    hub.release(a)  # twice: nothing
    hub.release(d)  # never admitted: nothing
    assert (len(hub), hubs.value("active"), hubs.value("opened_total")) == (2, 2.0, 4.0)
    assert hubs.value("rejected_total", reason="limit") == 1.0
    assert hubs.value("rejected_total", reason="per_source") == 1.0


async def test_wait_empty(hubs: Hubs) -> None:
    hub = hubs()
    await asyncio.wait_for(hub.wait_empty(), 1)  # empty from the start
    a, b = FakeConnection(), FakeConnection()
    assert hub.admit(a, ("10.0.0.1", 1))
    assert hub.admit(b, ("10.0.0.2", 1))
    waiter = asyncio.create_task(hub.wait_empty())
    try:
        for _ in range(5):
            await asyncio.sleep(0)
        hub.release(a)
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiter.done()
        hub.release(b)
        await asyncio.wait_for(waiter, 1)
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)


async def test_begin_drain_asks_every_open_connection_and_refuses_new_ones(hubs: Hubs) -> None:
    hub = hubs()
    conns = [FakeConnection() for _ in range(3)]
    for i, conn in enumerate(conns):
        assert hub.admit(conn, (f"10.0.0.{i}", 1))
    hub.release(conns[1])
    hub.begin_drain()
    assert [c.drains for c in conns] == [1, 0, 1]
    assert [c.closes for c in conns] == [[], [], []]
    assert not hub.admit(FakeConnection(), ("10.0.0.9", 1))
    assert hubs.value("rejected_total", reason="draining") == 1.0
    assert hubs.value("rejected_total", reason="limit") == 0.0
    assert len(hub) == 2


async def test_close_all(hubs: Hubs) -> None:
    hub = hubs()
    assert hub.close_all() == 0
    conns = [FakeConnection() for _ in range(3)]
    for i, conn in enumerate(conns):
        assert hub.admit(conn, (f"10.0.0.{i}", 1))
    hub.release(conns[0])
    assert hub.close_all() == 2
    assert [c.closes for c in conns] == [[], [SHUTDOWN], [SHUTDOWN]]


#: (now - BASE, the connection's activity then, its frame_started - BASE or None for 0.0,
#: the reasons it has been closed for after that sweep)
SweepStep = tuple[float, int, float | None, list[CloseReason]]


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param([(0.0, 1, None, []), (80.0 - EPS, 1, None, [])], id="idle-just-before"),
        pytest.param([(0.0, 1, None, []), (80.0, 1, None, [IDLE])], id="idle-at-deadline"),
        pytest.param(
            [(0.0, 1, None, []), (79.0, 2, None, []), (80.0, 2, None, []),
             (159.0 - EPS, 2, None, []), (159.0, 2, None, [IDLE])],
            id="activity-restarts-the-idle-time",
        ),
        pytest.param([(0.0, 1, 0.0, []), (40.0 - EPS, 2, 0.0, [])], id="frame-just-before"),
        pytest.param([(0.0, 1, 0.0, []), (40.0, 2, 0.0, [FRAME])], id="frame-at-deadline"),
        pytest.param(
            [(0.0, 1, 0.0, []), (20.0, 2, 0.0, []), (39.0, 3, 0.0, []), (40.0, 4, 0.0, [FRAME])],
            id="frame-deadline-despite-activity",
        ),
        pytest.param(
            [(0.0, 1, 0.0, []), (30.0, 2, 10.0, []), (50.0 - EPS, 3, 10.0, []),
             (50.0, 4, 10.0, [FRAME])],
            id="a-new-frame-has-its-own-deadline",
        ),
        pytest.param(
            [(0.0, 1, None, []), (1000.0, 2, None, [])], id="no-frame-no-frame-deadline"
        ),
        pytest.param(
            [(0.0, 1, 0.0, []), (80.0, 1, 0.0, [IDLE])], id="idle-and-frame-late-closed-once"
        ),
    ],
)  # fmt: skip
async def test_sweep_deadlines(hubs: Hubs, steps: list[SweepStep]) -> None:
    """The first step moves the activity at ``BASE``: from then on the idle time counts from
    exactly ``BASE``, whatever the time of the admission."""
    hub = hubs()
    conn = FakeConnection()
    assert hub.admit(conn, ("10.0.0.1", 1))
    for i, (at, activity, frame, closes) in enumerate(steps):
        conn.activity = activity
        conn.frame_started = 0.0 if frame is None else BASE + frame
        hub.sweep(BASE + at)
        assert conn.closes == closes, f"step {i}: at BASE + {at}"


async def test_idle_counts_from_the_admission(hubs: Hubs) -> None:
    hub = hubs()
    conn = FakeConnection(activity=7)  # unchanged from its admission on
    before = time.perf_counter()
    assert hub.admit(conn, ("10.0.0.1", 1))
    after = time.perf_counter()
    hub.sweep(before + 80.0 - 1e-6)
    assert conn.closes == []
    hub.sweep(after + 80.0 + 1e-6)
    assert conn.closes == [IDLE]


async def test_sweep_closes_only_the_late_ones(hubs: Hubs) -> None:
    hub = hubs()
    quiet, busy, stuck, between = (FakeConnection() for _ in range(4))
    for i, conn in enumerate((quiet, busy, stuck, between)):
        assert hub.admit(conn, (f"10.0.0.{i}", 1))
        conn.activity = 1
    hub.sweep(BASE)
    busy.activity = stuck.activity = between.activity = 2
    stuck.frame_started = BASE - 1.0
    hub.sweep(BASE + 39.0)
    assert [c.closes for c in (quiet, busy, stuck, between)] == [[], [], [FRAME], []]
    hub.release(stuck)  # its connection_lost
    busy.activity = 3
    hub.sweep(BASE + 80.0)
    assert [c.closes for c in (quiet, busy, stuck, between)] == [[IDLE], [], [FRAME], []]


async def test_the_sweeper_closes_idle_connections(hubs: Hubs) -> None:
    hub = hubs(ConnectionLimits(connections=10, per_source=10, idle_s=0.05, frame_s=60.0))
    conn = FakeConnection()
    conn.hub = hub
    assert hub.admit(conn, ("10.0.0.1", 1))
    await until(lambda: len(hub) == 0, 5.0)
    assert conn.closes == [IDLE]
    assert hubs.value("active") == 0.0


async def test_the_sweeper_survives_a_failing_sweep(
    hubs: Hubs, caplog: pytest.LogCaptureFixture
) -> None:
    hub = hubs(ConnectionLimits(connections=10, per_source=10, idle_s=0.05, frame_s=60.0))

    class FailsOnce(FakeConnection):
        attempts: int = 0

        def close_now(self, reason: CloseReason) -> None:
            self.attempts += 1
            if self.attempts == 1:
                raise RuntimeError("close failed")
            super().close_now(reason)

    conn = FailsOnce()
    conn.hub = hub
    with caplog.at_level(logging.ERROR, logger="wirekit_servicekit.hub"):
        assert hub.admit(conn, ("10.0.0.1", 1))
        await until(lambda: len(hub) == 0, 5.0)
    assert (conn.attempts, conn.closes) == (2, [IDLE])
    failed = [r for r in caplog.records if r.getMessage() == "connection sweep failed"]
    assert len(failed) == 1
    assert failed[0].exc_info is not None
    assert failed[0].exc_info[0] is RuntimeError


async def test_aclose_stops_the_sweeper(hubs: Hubs) -> None:
    hub = hubs()
    await hub.aclose()  # nothing started yet: nothing to do
    assert hub.admit(FakeConnection(), ("10.0.0.1", 1))
    assert len(asyncio.all_tasks()) == 2  # this test and the sweeper
    await hub.aclose()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    await hub.aclose()  # twice: nothing


def _fill(hub: ConnectionHub, count: int, finish: bool) -> list[FakeConnection]:
    conns = [FakeConnection(hub=hub, finishes_on_drain=finish) for _ in range(count)]
    for i, conn in enumerate(conns):
        assert hub.admit(conn, (f"10.0.{id(hub) % 200}.{i}", 1))
    return conns


async def _timed_drain(
    hubs: Sequence[ConnectionHub], grace_s: float, force: asyncio.Event
) -> tuple[int, float]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    closed = await asyncio.wait_for(drain(hubs, grace_s, force), 15)
    return closed, loop.time() - start


async def test_drain_when_every_connection_finishes(hubs: Hubs) -> None:
    first, second = hubs(), hubs()
    conns = _fill(first, 2, finish=True) + _fill(second, 3, finish=True)
    closed, took = await _timed_drain([first, second], 10.0, asyncio.Event())
    assert (closed, len(first), len(second)) == (0, 0, 0)
    assert took < 5.0  # not the grace time
    assert [(c.drains, c.closes) for c in conns] == [(1, [])] * 5


async def test_drain_closes_the_rest_at_the_deadline(hubs: Hubs) -> None:
    first, second = hubs(), hubs()
    finishing = _fill(first, 2, finish=True)
    stubborn = _fill(first, 1, finish=False) + _fill(second, 2, finish=False)
    closed, took = await _timed_drain([first, second], 0.2, asyncio.Event())
    assert (closed, len(first), len(second)) == (3, 0, 0)
    assert 0.15 <= took < 5.0
    assert [(c.drains, c.closes) for c in finishing] == [(1, [])] * 2
    assert [(c.drains, c.closes) for c in stubborn] == [(1, [SHUTDOWN])] * 3


@pytest.mark.parametrize("already", [True, False], ids=["set-before", "set-during"])
async def test_drain_forced(hubs: Hubs, already: bool) -> None:
    hub = hubs()
    conns = _fill(hub, 2, finish=False)
    force = asyncio.Event()
    if already:
        force.set()
    else:
        asyncio.get_running_loop().call_later(0.05, force.set)
    closed, took = await _timed_drain([hub], 60.0, force)
    assert (closed, len(hub)) == (2, 0)
    assert took < 5.0
    assert [(c.drains, c.closes) for c in conns] == [(1, [SHUTDOWN])] * 2


@pytest.mark.parametrize(
    "make",
    [lambda hubs: [], lambda hubs: [hubs(), hubs()]],
    ids=["no-hubs", "empty-hubs"],
)
async def test_drain_with_nothing_open(
    hubs: Hubs, make: Callable[[Hubs], list[ConnectionHub]]
) -> None:
    made = make(hubs)
    closed, took = await _timed_drain(made, 10.0, asyncio.Event())
    assert closed == 0
    assert took < 5.0
    for hub in made:
        assert not hub.admit(FakeConnection(), ("10.0.0.1", 1))  # draining now
