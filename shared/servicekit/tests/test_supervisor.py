"""The supervisor: its back-off, a real worker process (``python -m wirekit_echo``) started,
reported ready, signalled, killed and reaped, and a real :class:`Supervisor` of two echo workers
run in the test's event loop until it is told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wirekit_echo.settings import EchoSettings
from wirekit_servicekit import supervisor as supervisor_module
from wirekit_servicekit.supervisor import Backoff, Supervisor, WorkerProcess

#: Every wait of these tests ends by this (a worker starts in well under a second).
DEADLINE_S = 30.0


def echo_settings(**values: Any) -> EchoSettings:
    return EchoSettings(raw_port=0, framed_port=0, metrics_port=0, host="127.0.0.1", **values)


# -- Backoff (pure) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lives", "waits"),
    [
        pytest.param([1.0], [0.5], id="first-crash"),
        pytest.param(
            [1.0] * 9, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0], id="doubling-capped"
        ),
        pytest.param([0.0, 0.0, 0.0], [0.5, 1.0, 2.0], id="died-at-once"),
        pytest.param([10.0], [0.5], id="exactly-stable-is-not"),
        pytest.param([10.01], [0.0], id="stable"),
        pytest.param([1.0, 1.0, 1.0, 60.0, 1.0, 1.0], [0.5, 1.0, 2.0, 0.0, 0.5, 1.0], id="reset"),
        pytest.param([3600.0, 3600.0], [0.0, 0.0], id="always-stable"),
    ],
)
def test_backoff(lives: list[float], waits: list[float]) -> None:
    backoff = Backoff()
    assert [backoff.after(lived) for lived in lives] == waits


# -- WorkerProcess: a real echo worker ----------------------------------------------------


@pytest.fixture
async def slot() -> AsyncIterator[WorkerProcess]:
    """Slot 0 of 1 for ``python -m wirekit_echo``; whatever it started is killed at the end."""
    worker = WorkerProcess(0, 1, "wirekit_echo", hold_sighup=False)
    try:
        yield worker
    finally:
        worker.kill()
        await asyncio.wait_for(worker.reap(), DEADLINE_S)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port this test holds (listening, no SO_REUSEPORT): a worker cannot bind it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def get(url: str) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, url)


async def test_worker_reports_its_ports_and_serves(slot: WorkerProcess) -> None:
    await slot.spawn(echo_settings(), {})
    assert slot.alive
    report = await slot.ready(DEADLINE_S)
    assert report is not None
    assert sorted(report.ports) == ["framed", "metrics", "raw"]
    assert all(port > 0 for port in report.ports.values()), report.ports
    assert report.gauges == {}  # echo's gauges all add up (the default)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", report.ports["raw"]), DEADLINE_S
    )
    try:
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), DEADLINE_S) == b"ping"
    finally:
        writer.close()
        await writer.wait_closed()
    status, body = await get(f"http://127.0.0.1:{report.ports['metrics']}/readyz")
    assert (status, body) == (200, "ready\n")
    assert await slot.ready(DEADLINE_S) is None  # reported once: nothing more to read


async def test_sigterm_then_reap_is_a_clean_exit(slot: WorkerProcess) -> None:
    await slot.spawn(echo_settings(), {})
    assert await slot.ready(DEADLINE_S) is not None
    slot.signal(signal.SIGTERM)
    assert await asyncio.wait_for(slot.reap(), DEADLINE_S) == 0
    assert (slot.returncode, slot.alive) == (0, False)
    slot.signal(signal.SIGTERM)  # exited: nothing to signal, no error
    slot.kill()
    assert await asyncio.wait_for(slot.reap(), DEADLINE_S) == 0


async def test_kill_before_ready(slot: WorkerProcess) -> None:
    await slot.spawn(echo_settings(), {})
    slot.kill()
    assert await asyncio.wait_for(slot.reap(), DEADLINE_S) == -signal.SIGKILL
    assert await slot.ready(DEADLINE_S) is None  # died without a word
    slot.signal(signal.SIGTERM)


async def test_a_worker_that_cannot_bind_is_not_ready(slot: WorkerProcess, busy_port: int) -> None:
    await slot.spawn(echo_settings().model_copy(update={"raw_port": busy_port}), {})
    assert await slot.ready(DEADLINE_S) is None
    assert await asyncio.wait_for(slot.reap(), DEADLINE_S) == 1


@pytest.fixture
async def reaped_by_the_loop() -> AsyncIterator[None]:
    """Children reaped in the event loop itself (a pidfd watcher, as cmdexec runs), not by a
    thread: while the test holds the loop, a worker that exited stays a zombie, unreaped."""
    before = asyncio.get_child_watcher()
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)
    try:
        yield
    finally:
        asyncio.set_child_watcher(before)
        watcher.close()


def wait_for_zombie(pid: int) -> None:
    """Block (the loop too) until ``pid`` has exited and waits to be reaped."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rpartition(b")")[2].split()[0] == b"Z":
                return
        assert time.monotonic() < deadline, f"{pid} did not exit"
        time.sleep(0.01)


async def test_a_signal_to_a_worker_that_just_exited_keeps_its_status(
    reaped_by_the_loop: None, slot: WorkerProcess, busy_port: int
) -> None:
    """The worker exited (status 1) and asyncio has not reaped it yet: signalling it must not
    reap it either (``Popen.send_signal`` does, and asyncio then reports 255)."""
    await slot.spawn(echo_settings().model_copy(update={"raw_port": busy_port}), {})
    assert slot.proc is not None
    wait_for_zombie(slot.proc.pid)
    slot.signal(signal.SIGTERM)
    slot.kill()
    assert await asyncio.wait_for(slot.reap(), DEADLINE_S) == 1


async def test_a_worker_silent_past_the_timeout_is_not_ready(slot: WorkerProcess) -> None:
    await slot.spawn(echo_settings(), {})
    assert await slot.ready(0.001) is None  # python has not even imported the service yet
    assert slot.alive


async def test_a_slot_never_started() -> None:
    worker = WorkerProcess(3, 4, "wirekit_echo", hold_sighup=False)
    assert (worker.alive, await worker.ready(0.1), await worker.reap()) == (False, None, None)
    worker.signal(signal.SIGTERM)
    worker.kill()
    assert worker.returncode is None


async def test_a_worker_joins_the_ports_it_is_given(slot: WorkerProcess) -> None:
    """Worker 1 of 2 joins the ports it is given (SO_REUSEPORT) and binds the others."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        worker = WorkerProcess(1, 2, "wirekit_echo", hold_sighup=False)
        try:
            await worker.spawn(echo_settings(limit_connections=10), {"raw": port})
            report = await worker.ready(DEADLINE_S)
            assert report is not None
            assert report.ports["raw"] == port
            assert report.ports["framed"] not in (0, port)
        finally:
            worker.kill()
            await asyncio.wait_for(worker.reap(), DEADLINE_S)


# -- Supervisor ---------------------------------------------------------------------------


def supervisor(busy: int | None = None, **values: Any) -> Supervisor:
    """A supervisor of two echo workers (built inside a running loop: it makes events)."""
    settings = echo_settings(workers=2, **values)
    if busy is not None:
        settings = settings.model_copy(update={"raw_port": busy})
    return Supervisor(settings, "wirekit-echo", "wirekit_echo", 2)


async def test_supervisor_before_it_runs() -> None:
    sup = supervisor()
    try:
        assert sup.metrics.namespace == "echo"
        assert [(w.index, w.count, w.module) for w in sup.workers] == [
            (0, 2, "wirekit_echo"), (1, 2, "wirekit_echo"),
        ]  # fmt: skip
        assert sup.ready() is False
        assert sup.worker_exposition("/nope") is None
        assert sup.worker_exposition("/workers/0/metrics") is None  # no worker yet
        assert sup.server.port > 0
    finally:
        sup.server.start()  # (stop waits for a server loop that ran)
        sup.server.stop()


def value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


async def until(what: str, check: Callable[[], bool], task: asyncio.Task[int]) -> None:
    """Wait until ``check()`` (or the run ended, a failure), within the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not check():
        assert not task.done(), f"the supervisor ended while waiting for {what}"
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(sup: Supervisor) -> AsyncIterator[asyncio.Task[int]]:
    """``sup.run()`` as a task of this loop; stopped (and every worker killed) at the end."""
    task = asyncio.get_running_loop().create_task(sup.run())
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(task, DEADLINE_S)
        for worker in sup.workers:
            worker.kill()
            await asyncio.wait_for(worker.reap(), DEADLINE_S)


async def test_supervisor_runs_two_workers_and_stops_cleanly() -> None:
    sup = supervisor()
    base = f"http://127.0.0.1:{sup.server.port}"
    async with running(sup) as task:
        await until("both workers up", sup.ready, task)
        status, text = await get(f"{base}/metrics")
        assert status == 200
        assert value(text, "echo_workers", state="up") == 2.0
        assert value(text, "echo_workers", state="configured") == 2.0
        assert value(text, "echo_worker_restarts_total") == 0.0
        assert value(text, "echo_connections_active", mode="raw") == 0.0  # the workers', added
        assert await get(f"{base}/readyz") == (200, "ready\n")
        status, own = await get(f"{base}/workers/1/metrics")
        assert status == 200
        assert value(own, "echo_connections_active", mode="raw") == 0.0
        assert (await get(f"{base}/workers/2/metrics"))[0] == 404
        pids = [w.proc.pid for w in sup.workers if w.proc is not None]
        assert len(set(pids)) == 2

        sup.handle_term()
        assert sup.ready() is False
        assert await asyncio.wait_for(task, DEADLINE_S) == 0
        assert [w.returncode for w in sup.workers] == [0, 0]
        assert [os.path.exists(f"/proc/{pid}") for pid in pids] == [False, False]


async def test_supervisor_replaces_a_dead_worker() -> None:
    sup = supervisor()
    base = f"http://127.0.0.1:{sup.server.port}"
    async with running(sup) as task:
        await until("both workers up", sup.ready, task)
        victim = sup.workers[1].proc
        assert victim is not None
        victim.kill()
        await until("the worker replaced", lambda: sup.metrics.restarts == 1, task)
        await until("both workers up again", sup.ready, task)
        replacement = sup.workers[1].proc
        assert replacement is not None
        assert replacement.pid != victim.pid
        assert victim.returncode == -signal.SIGKILL
        status, text = await get(f"{base}/metrics")
        assert status == 200
        assert value(text, "echo_worker_restarts_total") == 1.0
        assert value(text, "echo_workers", state="up") == 2.0

        sup.handle_term()
        assert await asyncio.wait_for(task, DEADLINE_S) == 0  # the replacement exited 0
        assert [w.returncode for w in sup.workers] == [0, 0]


async def test_supervisor_exits_1_when_a_worker_did_not_exit_0() -> None:
    sup = supervisor()
    async with running(sup) as task:
        await until("both workers up", sup.ready, task)
        sup.handle_term()
        # What the drain deadline does, at once: both are still draining (their SIGTERM is
        # microseconds old, and this loop has not yet seen anything exit).
        sup.kill_stragglers()
        assert await asyncio.wait_for(task, DEADLINE_S) == 1
        assert [w.returncode for w in sup.workers] == [-signal.SIGKILL, -signal.SIGKILL]


async def test_supervisor_stops_when_worker_0_cannot_start(busy_port: int) -> None:
    sup = supervisor(busy=busy_port)
    async with running(sup) as task:
        assert await asyncio.wait_for(task, DEADLINE_S) == 1
        assert [w.returncode for w in sup.workers] == [1, None]  # worker 1 never started
        assert sup.ready() is False


async def test_a_stop_while_workers_start_reaches_every_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM arriving after worker 0 reported ready and before worker 1 is spawned (the
    others start concurrently, each ``spawn`` an await): worker 1 must not serve on."""
    monkeypatch.setattr(supervisor_module, "STOP_MARGIN_S", 1.0)  # kill deadline: 1 s + 1 s
    sup = supervisor(timeout_drain_s=1.0)
    start = sup.start

    async def start_then_stop(worker: WorkerProcess) -> bool:
        started = await start(worker)
        if worker.index == 0:
            sup.handle_term()  # what the loop's SIGTERM handler does
        return started

    monkeypatch.setattr(sup, "start", start_then_stop)
    async with running(sup) as task:
        status = await asyncio.wait_for(task, DEADLINE_S)
        # Worker 1 not started at all (None), or started and stopped like the others (0).
        # (Got status 1, [0, -9]: worker 1 started after the stop, never got the SIGTERM,
        # served until the kill deadline and was killed.)
        assert (status, sup.workers[0].returncode) == (0, 0)
        assert sup.workers[1].returncode in (None, 0)
