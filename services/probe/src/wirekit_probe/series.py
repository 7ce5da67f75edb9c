"""What the prober knows about one endpoint, and the Prometheus families built from it.

The families are built at scrape time from the endpoints probed now (a custom collector): an
endpoint that is no longer a target has no series at all -- nothing stale is left behind, and
one that appears starts from zero."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from wirekit_servicekit.metrics import Buckets

from .targets import Endpoint
from .tracker import Tracker
from .wire import INVALID_REASONS

#: From a loopback round trip (~50 us) to a satellite hop's worst (5 s).
RTT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
               0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # fmt: skip
LABELS = ("module", "target", "name")
CONNECT_RESULTS = ("ok", "refused", "timeout", "error")
#: The reasons of probe_invalid_replies_total: the datagram's, and a broken framed reply.
INVALID = (*INVALID_REASONS, "frame")


@dataclass
class Series:
    endpoint: Endpoint
    tracker: Tracker
    rtt: Buckets = field(default_factory=lambda: Buckets(RTT_BUCKETS))
    connect: Buckets = field(default_factory=lambda: Buckets(RTT_BUCKETS))
    connects: Counter[str] = field(default_factory=Counter)
    invalid: Counter[str] = field(default_factory=Counter)
    skipped: int = 0  # probes not sent: the packet budget was spent
    last_ok: float | None = None  # monotonic: the last reply (or handshake)
    #: Every round trip, when kept (the terminal tool's percentiles); None in the service.
    samples: list[float] | None = None

    def on_rtt(self, rtt: float) -> None:
        self.rtt.observe(rtt)
        self.last_ok = time.monotonic()
        if self.samples is not None:
            self.samples.append(rtt)

    def on_connect(self, result: str, seconds: float | None = None) -> None:
        self.connects[result] += 1
        if seconds is not None:
            self.connect.observe(seconds)
            self.last_ok = time.monotonic()

    def up(self, now: float, window_s: float) -> bool:
        return self.last_ok is not None and now - self.last_ok <= window_s

    @property
    def labels(self) -> list[str]:
        e = self.endpoint
        return [e.module, e.target, e.name]


def families(series: Iterable[Series], up_window_s: float) -> Iterator[Metric]:
    """Every per-target family, for ``series``."""
    every = list(series)
    now = time.monotonic()

    def counter(name: str, doc: str, value: Callable[[Series], float]) -> CounterMetricFamily:
        f = CounterMetricFamily(f"probe_{name}", doc, labels=LABELS)
        for s in every:
            f.add_metric(s.labels, value(s))
        return f

    t = "probes"
    yield counter(f"{t}_sent", "Probes sent.", lambda s: s.tracker.sent)
    yield counter(f"{t}_received", "Replies on time.", lambda s: s.tracker.received)
    yield counter(f"{t}_lost", "Probes without a reply within timeout_s.", lambda s: s.tracker.lost)
    yield counter(f"{t}_late", "Replies after their probe was lost.", lambda s: s.tracker.late)
    yield counter(f"{t}_duplicate", "Replies to a probe already answered.",
                  lambda s: s.tracker.duplicate)  # fmt: skip
    yield counter(f"{t}_reordered", "Replies on time below the next expected (RFC 4737).",
                  lambda s: s.tracker.reordered)  # fmt: skip
    yield counter(f"{t}_skipped", "Probes not sent: the packet budget was spent.",
                  lambda s: s.skipped)  # fmt: skip
    invalid = CounterMetricFamily(
        "probe_invalid_replies",
        "Datagrams or frames that were not replies to our probes, by reason.",
        labels=[*LABELS, "reason"],
    )
    for s in every:  # every reason from the start (0 until seen): rate() works at once
        for reason in INVALID:
            invalid.add_metric([*s.labels, reason], s.invalid[reason])
    yield invalid
    rtt = HistogramMetricFamily("probe_rtt_seconds", "Round trips of replies on time "
                                "(tcp-connect: the handshake).", labels=LABELS)  # fmt: skip
    for s in every:
        rtt.add_metric(s.labels, *s.rtt.cumulative())
    yield rtt
    jitter = GaugeMetricFamily("probe_jitter_seconds", "RFC 3550 interarrival jitter of the "
                               "round trips.", labels=LABELS)  # fmt: skip
    hops = GaugeMetricFamily("probe_hops", "Hops of the last reply's way back (from its TTL or "
                             "hop limit; udp only).", labels=LABELS)  # fmt: skip
    up = GaugeMetricFamily("probe_up", "1 while a reply (or a handshake) came within "
                           "up_window_s.", labels=LABELS)  # fmt: skip
    for s in every:
        jitter.add_metric(s.labels, s.tracker.jitter_s)
        if s.tracker.hops is not None:
            hops.add_metric(s.labels, s.tracker.hops)
        up.add_metric(s.labels, 1.0 if s.up(now, up_window_s) else 0.0)
    yield jitter
    yield hops
    yield up
    tcp = [s for s in every if s.endpoint.module != "udp"]
    connects = CounterMetricFamily("probe_connects", "TCP handshakes, by result.",
                                   labels=[*LABELS, "result"])  # fmt: skip
    connect = HistogramMetricFamily("probe_connect_seconds", "TCP handshake times.",
                                    labels=LABELS)  # fmt: skip
    for s in tcp:
        for result in CONNECT_RESULTS:
            connects.add_metric([*s.labels, result], s.connects[result])
        connect.add_metric(s.labels, *s.connect.cumulative())
    yield connects
    yield connect


class SeriesCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[Series]], up_window_s: float) -> None:
        self.source = source
        self.up_window_s = up_window_s

    def collect(self) -> Iterator[Metric]:
        return families(self.source(), self.up_window_s)
