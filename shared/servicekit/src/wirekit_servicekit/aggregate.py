"""A supervisor's ``/metrics``: its workers' metrics as one instance, added up by metric type.

At scrape time the supervisor fetches each live worker's own ``/metrics`` (OpenMetrics, which
keeps every family's type) and combines them:

- **counters, histograms, summaries**: summed. A replaced worker's last values are kept, so a
  counter never goes down (what it counted after the last scrape is lost).
- **gauges**: by the mode declared with the gauge -- prometheus_client's own
  ``multiprocess_mode`` argument, as in its multiprocess mode: ``livesum``/``sum`` add the
  workers up (the default: an undeclared gauge, like ``connections_active``, is a sum),
  ``livemax``/``max`` and ``livemin``/``min`` take the largest or smallest (a socket buffer
  each worker has the same of), ``liveall`` keeps one series per worker (label ``worker``).
  Only live workers count. A worker tells its modes to the supervisor when it is ready.
- **info and state sets**: once -- each series with the value of the first worker that has it:
  an info metric is 1 however many workers there are, and while workers disagree (a reload
  reaching them one by one) each configuration in force shows as its own series.
- ``process_*`` and ``python_*`` of the workers are left out: the supervisor serves its own.

Worker ``i``'s own exposition stays reachable through the supervisor for debugging:
``/workers/<i>/metrics`` on the metrics port.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

__all__ = ["GAUGE_MODES", "InstanceMetrics", "ServiceRegistry", "combine", "gauge_modes"]

#: prometheus_client's ``multiprocess_mode`` -> how the supervisor combines the gauge.
#: ``all`` is prometheus_client's default (nothing declared): a sum here.
GAUGE_MODES = {
    "all": "sum", "sum": "sum", "livesum": "sum",
    "max": "max", "livemax": "max",
    "min": "min", "livemin": "min",
    "liveall": "all",
}  # fmt: skip
#: Families summed whatever is declared (their values are counts).
_SUMMED = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
_ONCE = frozenset({"info", "stateset"})
#: The supervisor asks its workers for OpenMetrics: the exposition that keeps info and state
#: set types (the text format shows them as gauges).
_ACCEPT = "application/openmetrics-text; version=1.0.0; charset=utf-8"
#: A worker that does not answer a scrape within this is left out of that scrape.
SCRAPE_TIMEOUT_S = 2.0

Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


class ServiceRegistry(CollectorRegistry):
    """A registry that remembers its collectors, so that a worker can tell its supervisor how
    each of its gauges adds up (:func:`gauge_modes`)."""

    def __init__(self, auto_describe: bool = True) -> None:
        super().__init__(auto_describe=auto_describe)
        self.collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        super().register(collector)
        self.collectors.append(collector)

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self.collectors.remove(collector)


def gauge_modes(registry: CollectorRegistry) -> dict[str, str]:
    """Family name -> combining mode of every gauge declared with a mode other than a sum: a
    prometheus_client ``Gauge`` by its ``multiprocess_mode``, a collector of its own by a
    ``gauge_modes`` mapping (family -> mode). Info and state sets need none: their type says
    it."""
    modes: dict[str, str] = {}
    for collector in getattr(registry, "collectors", ()):
        declared: Mapping[str, str] = getattr(collector, "gauge_modes", {})
        if isinstance(collector, Gauge):
            mode = getattr(collector, "_multiprocess_mode", "all")
            declared = {family.name: mode for family in collector.describe()}
        for name, mode in declared.items():
            if mode not in GAUGE_MODES:
                raise ValueError(f"{name}: gauge mode {mode!r} is not combined across workers")
            if GAUGE_MODES[mode] != "sum":
                modes[name] = GAUGE_MODES[mode]
    return modes


def _key(sample_name: str, labels: Mapping[str, str]) -> Key:
    return sample_name, tuple(sorted(labels.items()))


@dataclass
class _Series:
    """What one family adds up to while combining."""

    family: Metric
    values: dict[Key, float] = field(default_factory=dict)


def combine(
    workers: Sequence[tuple[int, Iterable[Metric]]],
    modes: Mapping[str, str] = {},  # read only
    retired: Mapping[str, Mapping[Key, float]] = {},  # read only
) -> list[Metric]:
    """The instance's families from each live worker's (index, families), the gauges' modes,
    and the counter/histogram values of workers that are gone (by family)."""
    out: dict[str, _Series] = {}
    for index, families in workers:
        for family in families:
            if family.name.startswith(("process_", "python_")):
                continue
            series = out.setdefault(family.name, _Series(family))
            mode = modes.get(family.name, "sum") if family.type == "gauge" else ""
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = dict(sample.labels)
                if mode == "all":
                    labels["worker"] = str(index)
                key, value = _key(sample.name, labels), sample.value
                old = series.values.get(key)
                if old is None:
                    series.values[key] = value
                elif family.type in _ONCE:
                    pass  # the first worker's
                elif mode == "max":
                    series.values[key] = max(old, value)
                elif mode == "min":
                    series.values[key] = min(old, value)
                else:
                    series.values[key] = old + value
    for name, values in retired.items():
        if name in out:
            into = out[name].values
            for key, value in values.items():
                into[key] = into.get(key, 0.0) + value
    result = []
    for name, series in out.items():
        family = series.family
        metric = Metric(name, family.documentation, family.type, family.unit)
        for (sample_name, pairs), value in series.values.items():
            metric.add_sample(sample_name, dict(pairs), value)
        result.append(metric)
    return result


@dataclass
class _Slot:
    """One worker slot as the supervisor's metrics see it."""

    metrics_port: int | None = None
    #: Moves at each attach and detach: a scrape that began before one is not used.
    generation: int = 0
    modes: dict[str, str] = field(default_factory=dict)
    #: Counter and histogram samples of the slot's current worker at its last scrape, and of
    #: the workers it had before (never go down), by family.
    last: dict[str, dict[Key, float]] = field(default_factory=dict)
    retired: dict[str, dict[Key, float]] = field(default_factory=dict)


class InstanceMetrics(Collector):
    """The supervisor's collector: the workers combined (:func:`combine`), and the workers'
    own state (``<namespace>_workers{state}``, ``<namespace>_worker_restarts_total``)."""

    def __init__(self, namespace: str, count: int) -> None:
        self.namespace = namespace
        self.slots = [_Slot() for _ in range(count)]
        self.restarts = 0
        # attach/detach run on the event loop, collect() in the metrics thread: what a scrape
        # of a worker that was detached meanwhile found is dropped, under this lock (held for
        # bookkeeping only, never across a scrape).
        self._lock = threading.Lock()

    def attach(self, index: int, metrics_port: int, modes: Mapping[str, str]) -> None:
        """Worker ``index`` serves, with its own /metrics on ``metrics_port``."""
        with self._lock:
            slot = self.slots[index]
            slot.metrics_port, slot.modes = metrics_port, dict(modes)
            slot.generation += 1

    def detach(self, index: int) -> None:
        """Worker ``index`` is gone: what it counted stays in the sums."""
        with self._lock:
            slot = self.slots[index]
            slot.metrics_port = None
            slot.generation += 1
            for name, samples in slot.last.items():
                retired = slot.retired.setdefault(name, {})
                for key, value in samples.items():
                    retired[key] = retired.get(key, 0.0) + value
            slot.last = {}

    def exposition(self, index: int, accept: str = _ACCEPT) -> str | None:
        """Worker ``index``'s own /metrics now (None: not serving, or no answer in time)."""
        if not 0 <= index < len(self.slots) or self.slots[index].metrics_port is None:
            return None
        url = f"http://127.0.0.1:{self.slots[index].metrics_port}/metrics"
        request = urllib.request.Request(url, headers={"Accept": accept})  # http on loopback
        try:
            with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT_S) as resp:  # noqa: S310
                return str(resp.read().decode())
        except OSError:
            return None

    def _scrape(self, index: int) -> tuple[int, list[Metric]]:
        """Worker ``index``'s families now, with the slot's generation the scrape began in;
        the values a detach keeps are updated at once (unless it was detached meanwhile)."""
        slot = self.slots[index]
        generation = slot.generation
        text = self.exposition(index)
        if text is None:
            return generation, []
        families = list(text_string_to_metric_families(text))  # type: ignore[no-untyped-call]
        last = {
            f.name: {_key(s.name, s.labels): s.value for s in f.samples
                     if not s.name.endswith("_created")}
            for f in families if f.type in _SUMMED
        }  # fmt: skip
        with self._lock:
            if slot.generation == generation:
                slot.last = last
        return generation, families

    def collect(self) -> Iterator[Metric]:
        scraped = [(i, *self._scrape(i)) for i, s in enumerate(self.slots) if s.metrics_port]
        modes: dict[str, str] = {}
        retired: dict[str, dict[Key, float]] = {}
        with self._lock:
            # A worker detached during the scrape: its counts are in ``retired`` now.
            live = [(i, families) for i, generation, families in scraped
                    if self.slots[i].generation == generation]  # fmt: skip
            # A worker that did not answer this scrape (busy, dying, not reaped yet) counts
            # with what it had at its last one: a counter must not dip.
            missed = [self.slots[i].last for i, families in live if not families]
            for values_by_family in [s.retired for s in self.slots] + missed:
                for name, values in values_by_family.items():
                    into = retired.setdefault(name, {})
                    for key, value in values.items():
                        into[key] = into.get(key, 0.0) + value
            for slot in self.slots:
                modes.update(slot.modes)
        yield from combine(live, modes, retired)
        up = GaugeMetricFamily(
            f"{self.namespace}_workers", "Worker processes: configured, and up (serving).",
            labels=["state"],
        )  # fmt: skip
        up.add_metric(["configured"], len(self.slots))
        up.add_metric(["up"], sum(1 for s in self.slots if s.metrics_port is not None))
        yield up
        yield CounterMetricFamily(
            f"{self.namespace}_worker_restarts",
            "Workers replaced after they exited while the instance was not stopping.",
            value=self.restarts,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())
