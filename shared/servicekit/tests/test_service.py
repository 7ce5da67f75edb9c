"""A service declared with :class:`Service`, served in-process: the Runtime its ``build`` gets,
readiness and ports, stop, background tasks, SIGHUP reload, the drain of TCP connections,
workers sharing ports; and the console script's ``--version``, bad settings and ``check``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import cast

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from pydantic_settings import SettingsConfigDict

from wirekit_servicekit.hub import CloseReason, ConnectionHub, ConnectionLimits
from wirekit_servicekit.metrics import ConnectionMetrics, new_registry
from wirekit_servicekit.parts import (
    Background,
    DatagramListener,
    HttpRoute,
    Listener,
    Part,
    Reload,
)
from wirekit_servicekit.service import Runtime, Service
from wirekit_servicekit.settings import ServiceSettings, TcpServiceSettings
from wirekit_servicekit.testing import until
from wirekit_servicekit.worker import SOLO, Worker

VERSION = "1.2.3"
HUP = signal.SIGHUP


class DemoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_", cli_prog_name="wirekit-demo")


class DemoTcpSettings(TcpServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_", cli_prog_name="wirekit-demo")


def _demo(build: Callable[[Runtime[DemoSettings]], list[Part]]) -> Service[DemoSettings]:
    return Service("wirekit-demo", VERSION, DemoSettings, build)


@dataclass
class Telemetry:
    """What a test gives ``serve``: a fresh registry, a tracer provider recording spans."""

    registry: CollectorRegistry = field(default_factory=lambda: new_registry(process_metrics=False))
    spans: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)
    provider: TracerProvider = field(default_factory=TracerProvider)

    def __post_init__(self) -> None:
        self.provider.add_span_processor(SimpleSpanProcessor(self.spans))


@pytest.fixture
def telemetry() -> Iterator[Callable[[], Telemetry]]:
    made: list[Telemetry] = []

    def make() -> Telemetry:
        made.append(Telemetry())
        return made[-1]

    yield make
    for t in made:
        t.provider.shutdown()


@dataclass
class Serving:
    ports: dict[str, int]
    stop: asyncio.Event
    task: asyncio.Task[int]

    async def status(self) -> int:
        """Stop it and wait for its exit status."""
        self.stop.set()
        return await asyncio.wait_for(self.task, 15)


@contextlib.asynccontextmanager
async def serving(
    service: Service[DemoSettings] | Service[DemoTcpSettings],
    settings: ServiceSettings,
    telemetry: Telemetry,
    worker: Worker = SOLO,
    on_ready: Callable[[dict[str, int]], None] | None = None,
) -> AsyncIterator[Serving]:
    """``service.serve`` in a task, once ready (``on_ready`` called first); stopped and
    awaited at the end."""
    ready = asyncio.Event()
    stop = asyncio.Event()
    ports: dict[str, int] = {}

    def ready_now(got: dict[str, int]) -> None:
        if on_ready is not None:
            on_ready(got)
        ports.update(got)
        ready.set()

    serve = cast(Service[ServiceSettings], service).serve
    task = asyncio.create_task(
        serve(settings, registry=telemetry.registry, provider=telemetry.provider,
              on_ready=ready_now, stop=stop, worker=worker)
    )  # fmt: skip
    try:
        waiter = asyncio.create_task(ready.wait())
        try:
            await asyncio.wait({waiter, task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        if not ready.is_set():
            if task.done():
                code = task.result()  # or what it raised, raised here
                raise AssertionError(f"the service ended before it was ready (exit {code})")
            raise AssertionError("the service was not ready within 10 s")
        yield Serving(ports, stop, task)
    finally:
        stop.set()
        if not task.done():
            await asyncio.wait_for(task, 15)


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    return await asyncio.to_thread(_get, port, path)


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@dataclass
class SignalGuard:
    """Fallback handlers while a test sends itself signals (a signal that ``run`` did not
    handle is recorded here instead of ending pytest); handlers and mask restored after."""

    caught: list[int] = field(default_factory=list)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.caught.append(signum)


@pytest.fixture
def signals() -> Iterator[SignalGuard]:
    guard = SignalGuard()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    old = {s: signal.signal(s, guard) for s in (HUP, signal.SIGTERM)}
    try:
        yield guard
    finally:
        if HUP in signal.sigpending():
            signal.sigtimedwait({HUP}, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for signum, handler in old.items():
            signal.signal(signum, handler)


async def _until_len(items: list[bool], n: int) -> None:
    await until(lambda: len(items) == n, 5)


def _hup_blocked() -> bool:
    return HUP in signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.mark.parametrize(
    ("name", "module"),
    [("wirekit-demo", "wirekit_demo"), ("wirekit-cmd-exec", "wirekit_cmd_exec"),
     ("plain", "plain")],
    ids=["one-dash", "two-dashes", "none"],
)  # fmt: skip
def test_module(name: str, module: str) -> None:
    assert Service(name, VERSION, DemoSettings, lambda rt: []).module == module


def _must_not_build(runtime: Runtime[DemoSettings]) -> list[Part]:
    """Fails the test at once if ``main`` gets as far as serving (rather than serving until a
    signal that never comes)."""
    raise AssertionError("main went on to build the service")


@pytest.fixture
def console(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``main`` outside a supervisor, without DEMO_* settings in the environment; the root
    logger as it was after (should ``main`` get as far as configuring it)."""
    monkeypatch.delenv("WIREKIT_WORKER", raising=False)
    for name in ("DEMO_METRICS_PORT", "DEMO_HOST", "DEMO_WORKERS", "DEMO_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("console")
@pytest.mark.parametrize(
    "argv", [["--version"], ["--log-level", "DEBUG", "--version"]], ids=["alone", "with-flags"]
)
def test_version(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    checked: list[DemoSettings] = []
    service = Service("wirekit-demo", VERSION, DemoSettings, _must_not_build, checked.append)
    with pytest.raises(SystemExit) as info:
        service.main(argv)
    assert info.value.code == 0
    assert capsys.readouterr() == ("wirekit-demo 1.2.3\n", "")
    assert checked == []


@pytest.mark.usefixtures("console")
@pytest.mark.usefixtures("console")
def test_a_refusing_check_stops_main_before_anything_else(
    capsys: pytest.CaptureFixture[str],
) -> None:
    checked: list[DemoSettings] = []

    def check(settings: DemoSettings) -> None:
        checked.append(settings)
        print("wirekit-demo: refused", file=sys.stderr)
        raise SystemExit(2)

    service = Service("wirekit-demo", VERSION, DemoSettings, _must_not_build, check)
    with pytest.raises(SystemExit) as info:
        service.main(["--metrics-port", "9999"])
    assert info.value.code == 2
    assert [(type(s), s.metrics_port) for s in checked] == [(DemoSettings, 9999)]
    # The JSON logs are set up before the check (a check may log, e.g. a generated token);
    # its refusal is still one plain line on stderr and nothing was built.
    assert capsys.readouterr() == ("", "wirekit-demo: refused\n")


@pytest.mark.usefixtures("console")
def test_bad_settings_exit_2_before_check(capsys: pytest.CaptureFixture[str]) -> None:
    checked: list[DemoSettings] = []
    service = Service("wirekit-demo", VERSION, DemoSettings, _must_not_build, checked.append)
    with pytest.raises(SystemExit) as info:
        service.main(["--metrics-port", "-1"])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("wirekit-demo: invalid settings: metrics_port: ")
    assert err.count("\n") == 1
    assert checked == []


@dataclass
class Ticker:
    """A background task that runs until cancelled, recording its life."""

    events: list[str] = field(default_factory=list)

    async def __call__(self) -> None:
        self.events.append("started")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.events.append("cancelled")
            raise
        finally:
            self.events.append("finally")


async def test_serve_runtime_ready_and_stop(telemetry: Callable[[], Telemetry]) -> None:
    tel = telemetry()
    ticker = Ticker()
    runtimes: list[Runtime[DemoSettings]] = []

    def build(runtime: Runtime[DemoSettings]) -> list[Part]:
        runtimes.append(runtime)
        with runtime.tracer.start_as_current_span("build"):
            pass
        return [Background("tick", ticker)]

    settings = DemoSettings(metrics_port=0)
    async with serving(_demo(build), settings, tel) as s:
        assert list(s.ports) == ["metrics"]
        metrics = s.ports["metrics"]
        assert metrics > 0
        [rt] = runtimes
        assert (rt.settings, rt.registry) == (settings, tel.registry)
        assert rt.log is logging.getLogger("wirekit_demo")
        assert rt.worker is SOLO
        assert (rt.worker.index, rt.worker.count, rt.worker.shares_ports) == (0, 1, False)
        [span] = tel.spans.get_finished_spans()  # the tracer is the given provider's
        scope = span.instrumentation_scope
        assert scope is not None
        assert (span.name, scope.name, scope.version) == ("build", "wirekit_demo", VERSION)
        assert await http_get(metrics, "/readyz") == (200, b"ready\n")
        assert await http_get(metrics, "/healthz") == (200, b"ok\n")
        await until(lambda: ticker.events == ["started"], 5)
        assert await s.status() == 0
    assert ticker.events == ["started", "cancelled", "finally"]
    assert _refuses(metrics)
    await until(lambda: "metrics-http" not in {t.name for t in threading.enumerate()}, 5)
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_a_failing_background_task_is_logged_and_the_service_goes_on(
    telemetry: Callable[[], Telemetry], caplog: pytest.LogCaptureFixture
) -> None:
    ticker = Ticker()

    async def boom() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    def build(runtime: Runtime[DemoSettings]) -> list[Part]:
        return [Background("boom", boom), Background("tick", ticker)]

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "background task failed"]

    caplog.set_level(logging.INFO, logger="wirekit_servicekit.lifecycle")
    async with serving(_demo(build), DemoSettings(), telemetry()) as s:
        await until(lambda: len(failures()) == 1, 5)
        await asyncio.sleep(0.05)
        assert not s.task.done()
        assert ticker.events == ["started"]
        assert await http_get(s.ports["metrics"], "/readyz") == (200, b"ready\n")
        assert await s.status() == 0
    [record] = failures()
    assert (record.name, record.levelno, getattr(record, "task", None)) == (
        "wirekit_servicekit.lifecycle", logging.ERROR, "boom",
    )  # fmt: skip
    assert record.exc_info is not None
    assert record.exc_info[0] is RuntimeError
    assert ticker.events == ["started", "cancelled", "finally"]


class Echo(asyncio.DatagramProtocol):
    """Echoes each datagram, after ``prefix``."""

    def __init__(self, prefix: bytes = b"") -> None:
        self.prefix = prefix
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        assert self.transport is not None
        self.transport.sendto(self.prefix + data, addr)


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.replies.put_nowait(data)


async def udp_ask(port: int, payload: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(
        _Client, remote_addr=("127.0.0.1", port)
    )
    try:
        transport.sendto(payload)
        return await asyncio.wait_for(client.replies.get(), 5)
    finally:
        transport.close()


def _udp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_datagram_listener(telemetry: Callable[[], Telemetry]) -> None:
    def build(runtime: Runtime[DemoSettings]) -> list[Part]:
        return [DatagramListener("udp", runtime.settings.host, 0, Echo)]

    async with serving(_demo(build), DemoSettings(), telemetry()) as s:
        assert sorted(s.ports) == ["metrics", "udp"]
        port = s.ports["udp"]
        assert port > 0
        assert port != s.ports["metrics"]
        assert not _udp_port_free(port)
        assert await udp_ask(port, b"hello") == b"hello"
        assert await s.status() == 0
    assert _udp_port_free(port)


async def test_http_route_on_the_metrics_port(telemetry: Callable[[], Telemetry]) -> None:
    """A service's own path beside /metrics: its handler gets the query's parameters and
    answers status, type and body; other paths are still 404."""
    asked: list[dict[str, list[str]]] = []

    def handler(params: dict[str, list[str]]) -> tuple[int, str, bytes]:
        asked.append(params)
        if "target" not in params:
            return 400, "text/plain", b"target is required\n"
        return 200, "text/plain", f"probed {params['target'][-1]}\n".encode()

    def build(runtime: Runtime[DemoSettings]) -> list[Part]:
        return [HttpRoute("/probe", handler)]

    async with serving(_demo(build), DemoSettings(metrics_port=0), telemetry()) as s:
        port = s.ports["metrics"]
        assert await http_get(port, "/probe?target=a:1&target=b:2") == (200, b"probed b:2\n")
        assert await http_get(port, "/probe") == (400, b"target is required\n")
        assert (await http_get(port, "/nothing"))[0] == 404
        assert (await http_get(port, "/metrics"))[0] == 200
        assert await s.status() == 0
    assert asked == [{"target": ["a:1", "b:2"]}, {}]


async def test_workers_share_ports(
    telemetry: Callable[[], Telemetry], caplog: pytest.LogCaptureFixture
) -> None:
    runtimes: list[Runtime[DemoSettings]] = []

    def build(runtime: Runtime[DemoSettings]) -> list[Part]:
        runtimes.append(runtime)
        prefix = f"{runtime.worker.index}:".encode()
        return [DatagramListener("udp", runtime.settings.host, 0, lambda: Echo(prefix))]

    service, settings = _demo(build), DemoSettings()
    async with serving(service, settings, telemetry(), Worker(index=0, count=2)) as first:
        port = first.ports["udp"]
        second_worker = Worker(index=1, count=2, ports={"udp": port})
        async with serving(service, settings, telemetry(), second_worker) as second:
            assert second.ports["udp"] == port
            assert second.ports["metrics"] not in (0, first.ports["metrics"])
            assert [rt.worker for rt in runtimes] == [Worker(0, 2), second_worker]
            replies = await asyncio.gather(*(udp_ask(port, b"x") for _ in range(64)))
            # The kernel spreads the clients over both sockets (all 64 on one: p = 2**-63).
            assert sorted(set(replies)) == [b"0:x", b"1:x"]
            assert await second.status() == 0
        # Alone (count 1: no SO_REUSEPORT), the same port cannot be joined: exit 1, one line.
        alone, tel = Worker(index=1, count=1, ports={"udp": port}), telemetry()
        readies: list[dict[str, int]] = []
        caplog.set_level(logging.INFO, logger="wirekit_servicekit.lifecycle")
        status = await asyncio.wait_for(
            service.serve(settings, registry=tel.registry, provider=tel.provider,
                          on_ready=readies.append, worker=alone),
            15,
        )  # fmt: skip
        assert (status, readies) == (1, [])
        [refused] = [r for r in caplog.records if r.getMessage() == "cannot listen"]
        assert refused.levelno == logging.ERROR
        assert "Address already in use" in str(getattr(refused, "error", ""))
        assert await udp_ask(port, b"y") == b"0:y"  # the first serves on
        assert await first.status() == 0


@pytest.mark.parametrize(
    ("blocked_before", "pending_before"),
    [(False, False), (True, False), (True, True)],
    ids=["unblocked", "blocked", "blocked-with-one-pending"],
)
async def test_reload_on_sighup(
    signals: SignalGuard,
    telemetry: Callable[[], Telemetry],
    blocked_before: bool,
    pending_before: bool,
) -> None:
    if blocked_before:
        signal.pthread_sigmask(signal.SIG_BLOCK, {HUP})
    if pending_before:
        # To this thread: a thread an earlier test left in this process (one still ending) does
        # not block SIGHUP and could take one sent to the process. In a service hold() comes
        # before any thread starts; tests/test_reload_signal.py sends to the process.
        signal.pthread_kill(threading.get_ident(), HUP)
        assert HUP in signal.sigpending()
    reloads: list[bool] = []

    def build(runtime: Runtime[DemoSettings]) -> list[Part]:
        return [Reload(lambda: reloads.append(True))]

    # One that came before is taken once the handler is installed: before the service is
    # ready (it serves with the newest configuration).
    at_start = 1 if pending_before else 0
    at_ready: list[int] = []
    service = _demo(build)
    async with serving(
        service, DemoSettings(), telemetry(), on_ready=lambda _: at_ready.append(len(reloads))
    ) as s:
        assert at_ready == [at_start]
        assert len(reloads) == at_start
        assert not _hup_blocked()
        await asyncio.sleep(0.05)
        assert len(reloads) == at_start  # not delivered a second time
        for n in (1, 2):
            os.kill(os.getpid(), HUP)
            await _until_len(reloads, at_start + n)
        await asyncio.sleep(0.05)
        assert len(reloads) == at_start + 2
        assert await s.status() == 0
    assert _hup_blocked() == blocked_before
    assert HUP not in signal.sigpending()
    assert signals.caught == []


class DemoConnection(asyncio.Protocol):
    """An echo connection under a hub; ``finishes`` it closes when asked to drain."""

    def __init__(self, hub: ConnectionHub, finishes: bool, events: list[str]) -> None:
        self.hub = hub
        self.finishes = finishes
        self.events = events
        self.activity = 0
        self.frame_started = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not self.hub.admit(self, transport.get_extra_info("peername")):
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.activity += len(data)
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.hub.release(self)

    def begin_drain(self) -> None:
        self.events.append("drain")
        if self.finishes:
            assert self.transport is not None
            self.transport.close()

    def close_now(self, reason: CloseReason) -> None:
        self.events.append(reason.value)
        assert self.transport is not None
        self.transport.abort()


@pytest.mark.parametrize(
    ("finishes", "drain_s", "signalled", "status", "events", "logged"),
    [
        pytest.param(True, 30.0, False, 0, ["drain"], ["drained: every connection finished"],
                     id="every-connection-finishes"),
        pytest.param(False, 0.2, False, 0, ["drain", "shutdown"],
                     ["drain deadline reached: closed the rest"], id="drain-deadline"),
        pytest.param(False, 30.0, True, 1, ["drain", "shutdown"],
                     ["signal received: draining", "second signal: closing every connection now"],
                     id="second-sigterm-forces"),
    ],
)  # fmt: skip
async def test_stop_drains_tcp_connections(
    signals: SignalGuard,
    telemetry: Callable[[], Telemetry],
    caplog: pytest.LogCaptureFixture,
    finishes: bool,
    drain_s: float,
    signalled: bool,
    status: int,
    events: list[str],
    logged: list[str],
) -> None:
    seen: list[str] = []

    def build(runtime: Runtime[DemoTcpSettings]) -> list[Part]:
        settings = runtime.settings
        hub = ConnectionHub(ConnectionLimits.from_settings(settings),
                            ConnectionMetrics("demo", runtime.registry, []))  # fmt: skip
        factory = lambda: DemoConnection(hub, finishes, seen)  # noqa: E731
        return [Listener("tcp", settings.host, 0, factory, hub)]

    tel = telemetry()
    service = Service("wirekit-demo", VERSION, DemoTcpSettings, build)
    caplog.set_level(logging.INFO, logger="wirekit_servicekit.lifecycle")
    async with serving(service, DemoTcpSettings(timeout_drain_s=drain_s), tel) as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.ports["tcp"])
        try:
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            assert tel.registry.get_sample_value("demo_connections_active") == 1.0
            if signalled:
                os.kill(os.getpid(), signal.SIGTERM)
                await until(lambda: seen == ["drain"], 5)
                assert not s.task.done()
                assert await http_get(s.ports["metrics"], "/readyz") == (503, b"not ready\n")
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                s.stop.set()
            assert await asyncio.wait_for(s.task, 15) == status
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    assert seen == events
    assert tel.registry.get_sample_value("demo_connections_active") == 0.0
    assert tel.registry.get_sample_value("demo_connections_opened_total") == 1.0
    messages = [r.getMessage() for r in caplog.records if r.name == "wirekit_servicekit.lifecycle"]
    assert messages[0] == "listening"
    assert messages[1:] == logged
    assert signals.caught == []
