"""A worker's place: limits divided, settings for one of N, the announcement through a real
pipe, the pickled (settings, Worker) read back in :func:`enter_worker`."""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from pydantic import Field

from wirekit_echo.settings import EchoSettings
from wirekit_servicekit.settings import ServiceSettings, TcpServiceSettings
from wirekit_servicekit.worker import WORKER_ENV, Worker, enter_worker, share, worker_settings


@pytest.mark.parametrize(
    ("value", "count", "expected"),
    [
        pytest.param(1024, 1, 1024, id="int-alone"),
        pytest.param(1024, 4, 256, id="int-exact"),
        pytest.param(7, 2, 3, id="int-rounded-down"),
        pytest.param(1000, 3, 333, id="int-thirds"),
        pytest.param(3, 4, 1, id="int-never-below-1"),
        pytest.param(1, 64, 1, id="int-1-stays-1"),
        pytest.param(10.0, 4, 2.5, id="float-exact"),
        pytest.param(1.0, 3, 1.0 / 3, id="float-thirds"),
        pytest.param(0.5, 8, 0.0625, id="float-below-1"),
        pytest.param(0.0, 2, 0.0, id="float-zero"),
    ],
)
def test_share(value: float, count: int, expected: float) -> None:
    got = share(value, count)
    assert got == expected
    assert type(got) is type(value)  # counts stay counts
    assert Worker(0, count).share(value) == expected


@pytest.mark.parametrize(
    ("count", "shares"),
    [pytest.param(1, False, id="alone"), pytest.param(2, True, id="two")],
)
def test_shares_ports(count: int, shares: bool) -> None:
    assert Worker(0, count).shares_ports is shares


class RateSettings(TcpServiceSettings):
    """A service with a per-instance limit of its own, a rate (a float)."""

    per_instance: ClassVar[tuple[str, ...]] = (*TcpServiceSettings.per_instance, "rate_per_s")

    rate_per_s: float = Field(100.0, gt=0)
    burst: int = Field(50, ge=1)  # not per instance: every worker keeps it whole


def echo_settings(**values: Any) -> EchoSettings:
    return EchoSettings(
        limit_connections=1000, limit_connections_per_source=10, workers=4,
        metrics_host="0.0.0.0", metrics_port=9700, raw_port=1234, framed_port=1235,
        timeout_idle_s=5.0, host="::", **values,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("settings", "count", "expected"),
    [
        pytest.param(
            echo_settings(), 4,
            {"limit_connections": 250, "limit_connections_per_source": 2},
            id="echo-4",
        ),
        pytest.param(
            echo_settings(), 3,
            {"limit_connections": 333, "limit_connections_per_source": 3},
            id="echo-3",
        ),
        pytest.param(
            echo_settings(), 1,
            {"limit_connections": 1000, "limit_connections_per_source": 10},
            id="echo-alone",
        ),
        pytest.param(
            echo_settings(), 64,
            {"limit_connections": 15, "limit_connections_per_source": 1},
            id="echo-at-least-1",
        ),
        pytest.param(
            RateSettings(limit_connections=100, limit_connections_per_source=8, workers="auto",
                         rate_per_s=10.0, burst=50), 4,
            {"limit_connections": 25, "limit_connections_per_source": 2, "rate_per_s": 2.5},
            id="own-float-limit",
        ),
    ],
)  # fmt: skip
def test_worker_settings(settings: ServiceSettings, count: int, expected: dict[str, Any]) -> None:
    before = settings.model_dump()
    got = worker_settings(settings, count)
    assert type(got) is type(settings)
    assert settings.model_dump() == before  # the instance's own settings are left alone
    changed = {"metrics_host": "127.0.0.1", "metrics_port": 0, **expected}
    assert got.model_dump() == {**before, **changed}  # workers, ports, timeouts: unchanged
    assert got.metrics_bind == "127.0.0.1"
    assert got.workers == settings.workers


# -- announce: a real pipe ----------------------------------------------------------------


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A pipe (read end non-blocking: a write end left open fails the read, never hangs)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    pipe_inode = os.fstat(r).st_ino
    try:
        yield r, w
    finally:
        for fd in (r, w):
            # Closed by the code under test (as it should be), maybe reused since: only ours.
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino == pipe_inode:
                    os.close(fd)


def read_to_eof(fd: int) -> bytes:
    """Everything in the pipe, then its end; BlockingIOError if its write end is still open."""
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


def record_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bytes]]:
    """``os.write`` records instead of writing, until the test ends."""
    writes: list[tuple[int, bytes]] = []

    def write(fd: int, data: bytes) -> int:
        writes.append((fd, data))
        return len(data)

    monkeypatch.setattr(os, "write", write)
    return writes


ANNOUNCEMENTS = [
    pytest.param(
        {"raw": 7000, "framed": 7001, "metrics": 40000}, {},
        b'{"ports": {"raw": 7000, "framed": 7001, "metrics": 40000}, "gauges": {}}\n',
        id="no-gauge-modes",
    ),
    pytest.param(
        {"udp": 5353, "metrics": 40001}, {"udp_buffer_bytes": "max", "load": "all"},
        b'{"ports": {"udp": 5353, "metrics": 40001}, '
        b'"gauges": {"udp_buffer_bytes": "max", "load": "all"}}\n',
        id="gauge-modes",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("ports", "gauges", "line"), ANNOUNCEMENTS)
def test_announce_writes_one_line_and_closes(
    pipe: tuple[int, int], ports: dict[str, int], gauges: dict[str, str], line: bytes
) -> None:
    r, w = pipe
    worker = Worker(1, 2, {"raw": 7000}, ready_fd=w)
    worker.announce(ports, gauges)
    assert worker.ready_fd is None
    assert read_to_eof(r) == line  # EOF: the write end is closed


def test_announce_once(pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = pipe
    worker = Worker(0, 2, ready_fd=w)
    worker.announce({"metrics": 1}, {})
    writes = record_writes(monkeypatch)
    worker.announce({"metrics": 2}, {"x": "max"})
    assert writes == []
    assert read_to_eof(r) == b'{"ports": {"metrics": 1}, "gauges": {}}\n'


def test_announce_without_a_supervisor_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    writes = record_writes(monkeypatch)
    closes: list[int] = []
    monkeypatch.setattr(os, "close", closes.append)
    worker = Worker()
    worker.announce({"metrics": 1}, {})
    assert (writes, closes, worker.ready_fd) == ([], [], None)


def test_announce_to_a_supervisor_gone_closes_quietly(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.close(r)  # the reader is gone: the write fails (EPIPE), silently
    worker = Worker(0, 2, ready_fd=w)
    worker.announce({"metrics": 1}, {})
    assert worker.ready_fd is None
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(w)  # closed all the same


@pytest.mark.parametrize(
    "worker",
    [
        pytest.param(Worker(1, 3, {"raw": 7000, "framed": 7001}, ready_fd=5), id="with-fd"),
        pytest.param(Worker(0, 1, {}, ready_fd=None), id="without-fd"),
    ],
)
def test_pickling_drops_the_fd(worker: Worker) -> None:
    fd = worker.ready_fd
    copy = pickle.loads(pickle.dumps(worker))
    assert copy == Worker(worker.index, worker.count, worker.ports, ready_fd=None)
    assert worker.ready_fd == fd  # the original keeps its own


# -- enter_worker -------------------------------------------------------------------------


def test_enter_worker_outside_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKER_ENV, raising=False)
    assert enter_worker() is None


def test_enter_worker_reads_its_place_from_the_pipe(
    monkeypatch: pytest.MonkeyPatch, pipe: tuple[int, int]
) -> None:
    settings = echo_settings()
    settings_r, settings_w = os.pipe()
    with os.fdopen(settings_w, "wb") as f:
        f.write(pickle.dumps((settings, Worker(1, 2, {"raw": 1234}))))
    ready_r, ready_w = pipe
    monkeypatch.setenv(WORKER_ENV, f"{settings_r},{ready_w}")
    # enter_worker also asks the kernel (prctl PR_SET_PDEATHSIG) to SIGTERM this process when
    # its parent dies: harmless for a test run, which ends with its parent anyway.
    entered = enter_worker()
    assert entered is not None
    got, worker = entered
    assert type(got) is EchoSettings
    assert got == settings
    assert worker == Worker(1, 2, {"raw": 1234}, ready_fd=ready_w)
    assert WORKER_ENV not in os.environ  # not passed on to what the worker starts
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(settings_r)  # read and closed
    worker.announce({"raw": 1234, "metrics": 9}, {})
    assert read_to_eof(ready_r) == b'{"ports": {"raw": 1234, "metrics": 9}, "gauges": {}}\n'


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(({"host": "::"}, Worker()), id="not-settings"),
        pytest.param((echo_settings(), {"index": 1}), id="not-a-worker"),
    ],
)
def test_enter_worker_refuses_what_is_not_its_place(
    monkeypatch: pytest.MonkeyPatch, pipe: tuple[int, int], payload: tuple[object, object]
) -> None:
    settings_r, settings_w = os.pipe()
    with os.fdopen(settings_w, "wb") as f:
        f.write(pickle.dumps(payload))
    monkeypatch.setenv(WORKER_ENV, f"{settings_r},{pipe[1]}")
    with pytest.raises(AssertionError):
        enter_worker()  # (prctl as above: harmless)
