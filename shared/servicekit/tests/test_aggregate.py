"""A supervisor's /metrics: real prometheus_client families of fake workers, exposed and parsed
as the supervisor does it (OpenMetrics), combined by type; gauge modes as declared; the
supervisor's collector scraping real worker endpoints on loopback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from wirekit_servicekit.aggregate import InstanceMetrics, Key, ServiceRegistry, combine, gauge_modes
from wirekit_servicekit.metrics import MetricsServer

Maker = Callable[[CollectorRegistry], object]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> list[Metric]:
    return list(text_string_to_metric_families(text))  # type: ignore[no-untyped-call]


def expose(registry: CollectorRegistry) -> list[Metric]:
    """A worker's families as the supervisor gets them: OpenMetrics text, parsed."""
    return parse(generate_latest(registry).decode())  # type: ignore[no-untyped-call]


def samples(families: Iterable[Metric]) -> Samples:
    """Every sample by (sample name, sorted labels)."""
    out: Samples = {}
    for family in families:
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def family_samples(families: Iterable[Metric], name: str) -> Samples:
    found = [f for f in families if f.name == name]
    assert len(found) == 1, f"{name}: {len(found)} families"
    return samples(found)


def types(families: Iterable[Metric]) -> dict[str, str]:
    return {f.name: f.type for f in families}


@dataclass(frozen=True)
class FakeWorker:
    """What one fake worker has counted and measured."""

    requests: int
    observations: tuple[float, ...]
    active: float
    buffer: float
    free: float
    load: float
    version: str
    state: str


WORKERS = (
    FakeWorker(3, (0.25, 1.5), 2, 4096, 10, 0.5, "1", "a"),
    FakeWorker(4, (0.5, 4.0), 5, 8192, 3, 0.75, "2", "b"),
)


class Metrics:
    """The families of one fake worker, in a registry of its own."""

    def __init__(self, worker: FakeWorker) -> None:
        self.registry = ServiceRegistry()
        r = self.registry
        self.requests = Counter("demo_requests", "Requests.", ["mode"], registry=r)
        self.requests.labels("raw").inc(worker.requests)
        latency = Histogram("demo_latency", "Latency.", unit="seconds", buckets=(1.0, 2.0),
                            registry=r)  # fmt: skip
        for value in worker.observations:
            latency.observe(value)
        self.active = Gauge("demo_active", "Default mode.", registry=r)
        self.active.set(worker.active)
        Gauge("demo_buffer", "Max.", multiprocess_mode="livemax", registry=r).set(worker.buffer)
        Gauge("demo_free", "Min.", multiprocess_mode="livemin", registry=r).set(worker.free)
        Gauge("demo_load", "All.", multiprocess_mode="liveall", registry=r).set(worker.load)
        Info("demo_build", "Build.", registry=r).info({"version": worker.version})
        Enum("demo_state", "State.", states=["a", "b"], registry=r).state(worker.state)
        ProcessCollector(registry=r)  # process_*: each worker's own, left out
        PlatformCollector(registry=r)  # python_info: left out


def combined(workers: Iterable[FakeWorker] = WORKERS) -> list[Metric]:
    fakes = [Metrics(w) for w in workers]
    modes: dict[str, str] = {}
    for fake in fakes:
        modes.update(gauge_modes(fake.registry))
    return combine([(i, expose(f.registry)) for i, f in enumerate(fakes)], modes)


def k(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        pytest.param(
            "demo_requests", {k("demo_requests_total", mode="raw"): 7.0}, id="counter-sum"
        ),
        pytest.param(
            "demo_latency_seconds",
            {
                k("demo_latency_seconds_bucket", le="1.0"): 2.0,
                k("demo_latency_seconds_bucket", le="2.0"): 3.0,
                k("demo_latency_seconds_bucket", le="+Inf"): 4.0,
                k("demo_latency_seconds_count"): 4.0,
                k("demo_latency_seconds_sum"): 6.25,
            },
            id="histogram-sum",
        ),
        pytest.param("demo_active", {k("demo_active"): 7.0}, id="gauge-default-sum"),
        pytest.param("demo_buffer", {k("demo_buffer"): 8192.0}, id="gauge-max"),
        pytest.param("demo_free", {k("demo_free"): 3.0}, id="gauge-min"),
        pytest.param(
            "demo_load",
            {k("demo_load", worker="0"): 0.5, k("demo_load", worker="1"): 0.75},
            id="gauge-all-per-worker",
        ),
        pytest.param(
            "demo_build",
            {k("demo_build_info", version="1"): 1.0, k("demo_build_info", version="2"): 1.0},
            id="info-each-configuration-once",
        ),
        pytest.param(
            "demo_state",
            {k("demo_state", demo_state="a"): 1.0, k("demo_state", demo_state="b"): 0.0},
            id="stateset-first-worker",
        ),
    ],
)
def test_combine_by_type(family: str, expected: Samples) -> None:
    assert family_samples(combined(), family) == expected


def test_combine_keeps_names_types_and_units() -> None:
    result = combined()
    assert types(result) == {
        "demo_requests": "counter",
        "demo_latency_seconds": "histogram",
        "demo_active": "gauge",
        "demo_buffer": "gauge",
        "demo_free": "gauge",
        "demo_load": "gauge",
        "demo_build": "info",
        "demo_state": "stateset",
    }
    assert {f.name: f.unit for f in result}["demo_latency_seconds"] == "seconds"
    assert {f.name: f.documentation for f in result}["demo_buffer"] == "Max."


def test_combine_leaves_out_process_python_and_created() -> None:
    worker = Metrics(WORKERS[0])
    families = expose(worker.registry)
    names = {s.name for f in families for s in f.samples}
    # The exposition has them (else this test would prove nothing) ...
    assert {"process_cpu_seconds_total", "python_info", "demo_requests_created"} <= names
    # ... the combination does not.
    out = {s.name for f in combine([(0, families)]) for s in f.samples}
    assert [n for n in out if n.startswith(("process_", "python_")) or "created" in n] == []


@pytest.mark.parametrize(
    ("versions", "expected"),
    [
        pytest.param(("1",), {k("demo_build_info", version="1"): 1.0}, id="one-worker"),
        pytest.param(("1", "1"), {k("demo_build_info", version="1"): 1.0}, id="two-agree"),
        pytest.param(("1", "1", "1"), {k("demo_build_info", version="1"): 1.0}, id="three-agree"),
        pytest.param(
            ("1", "2", "1"),
            {k("demo_build_info", version="1"): 1.0, k("demo_build_info", version="2"): 1.0},
            id="reload-half-way",
        ),
    ],
)
def test_info_is_one_whatever_the_workers(versions: tuple[str, ...], expected: Samples) -> None:
    workers = [FakeWorker(1, (), 0, 0, 0, 0, v, "a") for v in versions]
    assert family_samples(combined(workers), "demo_build") == expected


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        pytest.param((0, 1), {"a": 1.0, "b": 0.0}, id="a-first"),
        pytest.param((1, 0), {"a": 0.0, "b": 1.0}, id="b-first"),
    ],
)
def test_stateset_is_the_first_workers(order: tuple[int, int], expected: dict[str, float]) -> None:
    fakes = [Metrics(w) for w in WORKERS]
    result = combine([(i, expose(fakes[i].registry)) for i in order])
    got = family_samples(result, "demo_state")
    assert got == {k("demo_state", demo_state=s): v for s, v in expected.items()}


RETIRED: dict[str, dict[Key, float]] = {
    "demo_requests": {
        k("demo_requests_total", mode="raw"): 10.0,
        k("demo_requests_total", mode="framed"): 2.0,  # no live worker has it now
    },
    "demo_latency_seconds": {
        k("demo_latency_seconds_bucket", le="1.0"): 1.0,
        k("demo_latency_seconds_bucket", le="2.0"): 1.0,
        k("demo_latency_seconds_bucket", le="+Inf"): 1.0,
        k("demo_latency_seconds_count"): 1.0,
        k("demo_latency_seconds_sum"): 0.5,
    },
}


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        pytest.param(
            "demo_requests",
            {
                k("demo_requests_total", mode="raw"): 17.0,
                k("demo_requests_total", mode="framed"): 2.0,
            },
            id="counter",
        ),
        pytest.param(
            "demo_latency_seconds",
            {
                k("demo_latency_seconds_bucket", le="1.0"): 3.0,
                k("demo_latency_seconds_bucket", le="2.0"): 4.0,
                k("demo_latency_seconds_bucket", le="+Inf"): 5.0,
                k("demo_latency_seconds_count"): 5.0,
                k("demo_latency_seconds_sum"): 6.75,
            },
            id="histogram",
        ),
        pytest.param("demo_active", {k("demo_active"): 7.0}, id="gauge-untouched"),
    ],
)
def test_retired_values_are_added(family: str, expected: Samples) -> None:
    fakes = [Metrics(w) for w in WORKERS]
    result = combine([(i, expose(f.registry)) for i, f in enumerate(fakes)], {}, RETIRED)
    assert family_samples(result, family) == expected


def test_combined_families_expose_and_parse_again() -> None:
    """What combine returns is what the supervisor serves: valid OpenMetrics, same values."""
    result = combined()

    class Fixed(Collector):
        def collect(self) -> Iterator[Metric]:
            return iter(result)

    registry = CollectorRegistry()
    registry.register(Fixed())
    assert samples(expose(registry)) == samples(result)


# -- gauge_modes --------------------------------------------------------------------------


class OwnGauges(Collector):
    """A collector of its own that declares how its gauges add up."""

    def __init__(self, modes: Mapping[str, str]) -> None:
        self.gauge_modes = dict(modes)

    def collect(self) -> Iterator[Metric]:
        for name in self.gauge_modes:
            yield GaugeMetricFamily(name, "Own.", value=1)


Mode = Literal[
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent",
    "livemostrecent",
]  # fmt: skip


def gauge(mode: Mode | None, namespace: str = "", unit: str = "") -> Maker:
    def make(registry: CollectorRegistry) -> object:
        if mode is None:
            return Gauge("size", "Size.", namespace=namespace, unit=unit, registry=registry)
        return Gauge("size", "Size.", namespace=namespace, unit=unit, registry=registry,
                     multiprocess_mode=mode)  # fmt: skip

    return make


def own(modes: Mapping[str, str]) -> Maker:
    def make(registry: CollectorRegistry) -> object:
        collector = OwnGauges(modes)
        registry.register(collector)
        return collector

    return make


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(gauge(None), {}, id="default-is-a-sum"),
        pytest.param(gauge("all"), {}, id="all-is-a-sum"),
        pytest.param(gauge("sum"), {}, id="sum"),
        pytest.param(gauge("livesum"), {}, id="livesum"),
        pytest.param(gauge("max"), {"size": "max"}, id="max"),
        pytest.param(gauge("livemax"), {"size": "max"}, id="livemax"),
        pytest.param(gauge("min"), {"size": "min"}, id="min"),
        pytest.param(gauge("livemin"), {"size": "min"}, id="livemin"),
        pytest.param(gauge("liveall"), {"size": "all"}, id="liveall"),
        pytest.param(
            gauge("livemax", namespace="demo", unit="bytes"),
            {"demo_size_bytes": "max"},
            id="full-name",
        ),
        pytest.param(
            own({"a": "liveall", "b": "livesum", "c": "max"}),
            {"a": "all", "c": "max"},
            id="own-collector",
        ),
        pytest.param(
            lambda r: Counter("hits", "Hits.", registry=r),
            {},
            id="not-a-gauge",
        ),
    ],
)
def test_gauge_modes(make: Maker, expected: dict[str, str]) -> None:
    registry = ServiceRegistry()
    make(registry)
    assert gauge_modes(registry) == expected


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(gauge("mostrecent"), id="mostrecent"),
        pytest.param(gauge("livemostrecent"), id="livemostrecent"),
        pytest.param(own({"own": "last"}), id="own-collector"),
    ],
)
def test_gauge_modes_refuses_what_cannot_be_combined(
    make: Maker,
) -> None:
    registry = ServiceRegistry()
    make(registry)
    with pytest.raises(ValueError, match="is not combined across workers"):
        gauge_modes(registry)


def test_service_registry_remembers_its_collectors() -> None:
    registry = ServiceRegistry()
    size = Gauge("size", "Size.", multiprocess_mode="livemax", registry=registry)
    hits = Counter("hits", "Hits.", registry=registry)
    assert registry.collectors == [size, hits]
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("hits", "Hits.", registry=registry)
    assert registry.collectors == [size, hits]
    registry.unregister(size)
    assert registry.collectors == [hits]
    assert gauge_modes(registry) == {}


# -- InstanceMetrics: real worker endpoints on loopback ----------------------------------


class Endpoints:
    """Fake workers: their own /metrics on loopback, stopped at the end."""

    def __init__(self) -> None:
        self.servers: list[MetricsServer] = []

    def start(self, worker: Metrics) -> MetricsServer:
        server = MetricsServer(worker.registry, "127.0.0.1", 0)
        server.start()
        self.servers.append(server)
        return server

    def stop(self, server: MetricsServer) -> None:
        self.servers.remove(server)
        server.stop()


@pytest.fixture
def endpoints() -> Iterator[Endpoints]:
    eps = Endpoints()
    try:
        yield eps
    finally:  # each stop waits for its server's poll (0.5 s): all at once
        stops = [threading.Thread(target=eps.stop, args=(s,)) for s in list(eps.servers)]
        for thread in stops:
            thread.start()
        for thread in stops:
            thread.join(10)
        assert eps.servers == []


def scrape(metrics: InstanceMetrics) -> Samples:
    return samples(metrics.collect())


def test_instance_metrics_adds_live_workers_up_and_keeps_the_retired(
    endpoints: Endpoints,
) -> None:
    fakes = [Metrics(w) for w in WORKERS]
    servers = [endpoints.start(f) for f in fakes]
    metrics = InstanceMetrics("demo", 2)
    for i, (fake, server) in enumerate(zip(fakes, servers, strict=True)):
        metrics.attach(i, server.port, gauge_modes(fake.registry))

    got = scrape(metrics)
    assert got[k("demo_requests_total", mode="raw")] == 7.0
    assert got[k("demo_latency_seconds_count")] == 4.0
    assert got[k("demo_active")] == 7.0
    assert got[k("demo_buffer")] == 8192.0
    assert (got[k("demo_load", worker="0")], got[k("demo_load", worker="1")]) == (0.5, 0.75)
    assert got[k("demo_workers", state="configured")] == 2.0
    assert got[k("demo_workers", state="up")] == 2.0
    assert got[k("demo_worker_restarts_total")] == 0.0
    assert not [n for n, _ in got if n.startswith(("process_", "python_"))]

    fakes[1].requests.labels("raw").inc(100)  # after the last scrape: lost with the worker
    metrics.detach(1)
    endpoints.stop(servers[1])
    metrics.restarts = 1
    got = scrape(metrics)
    assert got[k("demo_requests_total", mode="raw")] == 3.0 + 4.0  # worker 1's last scrape kept
    assert got[k("demo_latency_seconds_count")] == 4.0
    assert got[k("demo_active")] == 2.0  # gauges: live workers only
    assert got[k("demo_buffer")] == 4096.0
    assert k("demo_load", worker="1") not in got
    assert got[k("demo_workers", state="configured")] == 2.0
    assert got[k("demo_workers", state="up")] == 1.0
    assert got[k("demo_worker_restarts_total")] == 1.0

    replacement = Metrics(FakeWorker(1, (3.0,), 1, 1, 1, 1, "1", "a"))  # counts from zero
    metrics.attach(1, endpoints.start(replacement).port, gauge_modes(replacement.registry))
    got = scrape(metrics)
    assert got[k("demo_requests_total", mode="raw")] == 3.0 + 4.0 + 1.0
    assert got[k("demo_latency_seconds_bucket", le="+Inf")] == 2.0 + 2.0 + 1.0
    assert got[k("demo_latency_seconds_sum")] == 1.75 + 4.5 + 3.0
    assert got[k("demo_active")] == 2.0 + 1.0
    assert got[k("demo_workers", state="up")] == 2.0


def test_instance_metrics_retires_twice_in_one_slot(endpoints: Endpoints) -> None:
    metrics = InstanceMetrics("demo", 1)
    total = 0.0
    for n in (5, 6, 7):
        fake = Metrics(FakeWorker(n, (), 0, 0, 0, 0, "1", "a"))
        server = endpoints.start(fake)
        metrics.attach(0, server.port, {})
        total += n
        assert scrape(metrics)[k("demo_requests_total", mode="raw")] == total
        metrics.detach(0)  # its server stops at the end: detached, it is not asked again
    assert metrics.slots[0].retired["demo_requests"] == {k("demo_requests_total", mode="raw"): 18}
    got = scrape(metrics)
    assert got[k("demo_workers", state="up")] == 0.0


@pytest.mark.parametrize(
    ("index", "slot_1"),
    [
        pytest.param(1, "detached", id="detached"),
        pytest.param(1, "never-attached", id="never-attached"),
        pytest.param(2, "live", id="past-the-end"),
        pytest.param(-1, "live", id="negative"),  # not slot 1 from the end
        pytest.param(-2, "live", id="negative-2"),
        pytest.param(99, "live", id="far-out"),
    ],
)
def test_exposition_of_no_worker_is_none(endpoints: Endpoints, index: int, slot_1: str) -> None:
    metrics = InstanceMetrics("demo", 2)
    metrics.attach(0, endpoints.start(Metrics(WORKERS[0])).port, {})
    if slot_1 != "never-attached":
        metrics.attach(1, endpoints.start(Metrics(WORKERS[1])).port, {})
    if slot_1 == "detached":
        metrics.detach(1)
    assert metrics.exposition(index) is None
    assert metrics.exposition(0) is not None  # a live one answers
    assert (metrics.exposition(1) is not None) is (slot_1 == "live")


def test_exposition_of_a_worker_that_does_not_answer_is_none() -> None:
    with socket.socket() as sock:  # bound, not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        metrics = InstanceMetrics("demo", 1)
        metrics.attach(0, sock.getsockname()[1], {})
        assert metrics.exposition(0) is None
        got = scrape(metrics)
    assert got[k("demo_workers", state="up")] == 1.0  # attached: up, though silent
    assert [n for n, _ in got if n.startswith("demo_") and "workers" not in n] == [
        "demo_worker_restarts_total"
    ]


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        pytest.param(None, True, id="default-openmetrics"),
        pytest.param("text/plain", False, id="text"),
    ],
)
def test_exposition_is_the_workers_own(
    endpoints: Endpoints, accept: str | None, openmetrics: bool
) -> None:
    fake = Metrics(WORKERS[1])
    metrics = InstanceMetrics("demo", 1)
    metrics.attach(0, endpoints.start(fake).port, {})
    text = metrics.exposition(0) if accept is None else metrics.exposition(0, accept=accept)
    assert text is not None
    assert text.rstrip().endswith("# EOF") is openmetrics
    assert 'demo_requests_total{mode="raw"} 4.0' in text
    assert "process_cpu_seconds_total" in text  # its own: nothing left out


class DetachWhileScraped(Collector):
    """Part of worker 1's metrics: while the supervisor scrapes worker 1, worker 0 (scraped a
    moment before) exits and the supervisor's event loop detaches it. In the supervisor the
    scrape runs in the metrics thread and ``detach`` in the event loop, so this can happen
    whenever a worker dies during a scrape; here it happens at one chosen point."""

    def __init__(self, metrics: InstanceMetrics) -> None:
        self.metrics = metrics
        self.done = False

    def collect(self) -> Iterator[Metric]:
        if not self.done:
            self.done = True
            self.metrics.detach(0)
        return iter(())

    def describe(self) -> Iterator[Metric]:
        return iter(())


def test_a_worker_detached_during_a_scrape_is_not_counted_twice(endpoints: Endpoints) -> None:
    metrics = InstanceMetrics("demo", 2)
    fakes = [Metrics(w) for w in WORKERS]
    fakes[1].registry.register(DetachWhileScraped(metrics))
    for i, fake in enumerate(fakes):
        metrics.attach(i, endpoints.start(fake).port, {})
    first, second = scrape(metrics), scrape(metrics)
    counted = [s[k("demo_requests_total", mode="raw")] for s in (first, second)]
    # Worker 0's 3 (its last scrape, retired) and worker 1's 4, and never down from one
    # scrape to the next. (Got [10.0, 7.0]: worker 0 counted live and retired at once.)
    assert counted == [7.0, 7.0]


def test_a_worker_that_misses_a_scrape_counts_with_its_last_values(endpoints: Endpoints) -> None:
    """A worker that does not answer one scrape (busy, dying, not reaped yet) is counted with
    what it had at its last one: the instance's counter never dips (found by review)."""
    metrics = InstanceMetrics("demo", 2)
    fakes = [Metrics(w) for w in WORKERS]
    for i, fake in enumerate(fakes):
        metrics.attach(i, endpoints.start(fake).port, {})
    key = k("demo_requests_total", mode="raw")
    first = scrape(metrics)[key]
    metrics.slots[1].metrics_port = 1  # nobody listens there: the scrape of worker 1 fails
    assert scrape(metrics)[key] == first
