"""The UDP echo: one ``DatagramProtocol`` answers each datagram byte-exact, in one datagram,
unless a defence drops it. Nothing on the hot path takes a lock: counters are plain integers
that Prometheus reads at scrape time, and drops are reported (log line + span) at
most once per reason per interval, with how many they stand for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from wirekit_servicekit import HotCounter
from wirekit_servicekit.metrics import Cell
from wirekit_servicekit.ratelimit import SourceLimiter, TokenBucket

from . import _hot
from .defences import LoopGuard, is_broadcast_or_multicast
from .kernel import SocketStats
from .settings import UdpSettings

log = logging.getLogger(__name__)
#: A source address as asyncio gives it: (host, port), or (host, port, flowinfo, scope_id) on
#: an IPv6 socket (it was annotated (str, int); a trial compiled build, which checks argument
#: types at run time, found it).
Address = tuple[Any, ...]
#: Source hosts remembered as unicast (then forgotten all at once and judged again).
UNICAST_MEMO = 4096

#: Why a datagram got no answer: the ``reason`` label of udp_datagrams_dropped_total.
DROP_REASONS = (
    "oversize", "privileged_port", "denied_port", "broadcast_multicast", "loop",
    "rate_limit_source", "rate_limit_global", "send_error",
)  # fmt: skip


class UdpMetrics:
    """The service's metrics. Per-datagram ones are lock-free cells (see HotCounter)."""

    def __init__(self, registry: CollectorRegistry, limiter: SourceLimiter) -> None:
        ns = "udp"

        def cell(name: str, doc: str) -> Cell:
            return HotCounter(name, doc, namespace=ns, registry=registry,
                              cell=_hot.Cell).labels()  # fmt: skip

        self.received = cell("datagrams_received", "Datagrams received.")
        self.received_bytes = cell("received_bytes", "Bytes received.")
        dropped = HotCounter("datagrams_dropped", "Datagrams not answered, by reason.", ["reason"],
                             namespace=ns, registry=registry)  # fmt: skip
        self.dropped = {reason: dropped.labels(reason) for reason in DROP_REASONS}
        self.dropped_bytes = Cell()  # of the datagrams dropped before an answer
        self.answered = Answered(self)
        registry.register(self.answered)
        Gauge(
            "rate_limited_sources",
            "Source addresses whose last datagram was refused by their rate limit.",
            namespace=ns, registry=registry,
        ).set_function(lambda: limiter.limited)  # fmt: skip
        Gauge(
            "tracked_sources", "Source addresses in the rate-limit table.",
            namespace=ns, registry=registry,
        ).set_function(lambda: len(limiter))  # fmt: skip
        self.socket = SocketStats(registry)


class Answered(Collector):
    """``udp_datagrams_sent_total`` and ``udp_sent_bytes_total``: what was received less what
    was dropped before an answer, computed at scrape time (two counters fewer per datagram).
    A datagram is counted as received after its fate (answered, or counted as dropped), and
    received is read before dropped: a scrape in between sees one answer too few, never one
    too many, and the value reported never goes down."""

    def __init__(self, metrics: UdpMetrics) -> None:
        self.metrics = metrics
        self.before = [d for reason, d in metrics.dropped.items() if reason != "send_error"]
        self.last = (0, 0)
        self._lock = threading.Lock()  # two scrapes at once (the metrics server is threaded)

    def collect(self) -> Iterator[CounterMetricFamily]:
        m = self.metrics
        with self._lock:
            # received before dropped: a drop counted between the two reads makes one too few
            received, received_bytes = m.received.n, m.received_bytes.n
            now = (
                int(received - sum(d.n for d in self.before)),
                int(received_bytes - m.dropped_bytes.n),
            )
            self.last = sent, sent_bytes = max(self.last[0], now[0]), max(self.last[1], now[1])
        yield CounterMetricFamily("udp_datagrams_sent", "Datagrams answered.", value=sent)
        yield CounterMetricFamily("udp_sent_bytes", "Bytes answered.", value=sent_bytes)

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("udp_datagrams_sent", "Datagrams answered.")
        yield CounterMetricFamily("udp_sent_bytes", "Bytes answered.")


class DropReporter:
    """Log and trace drops without letting a flood flood the logs: per reason, at most one
    log line and one span per interval, each carrying the number of drops it stands for."""

    def __init__(self, tracer: trace.Tracer, interval_s: float) -> None:
        self.tracer = tracer
        self.interval_s = interval_s
        self.pending = dict.fromkeys(DROP_REASONS, 0)
        self.last_source: dict[str, tuple[Any, Any]] = {}
        self.next_report = dict.fromkeys(DROP_REASONS, 0.0)

    def drop(self, reason: str, addr: Address, now: float) -> None:
        self.pending[reason] += 1
        self.last_source[reason] = (addr[0], addr[1])
        if now >= self.next_report[reason]:
            self.flush(reason, now)

    def flush(self, reason: str, now: float) -> None:
        count = self.pending[reason]
        if not count:
            return
        self.pending[reason] = 0
        self.next_report[reason] = now + self.interval_s
        host, port = self.last_source[reason]
        with self.tracer.start_as_current_span(
            "udp.drop",
            kind=trace.SpanKind.SERVER,
            attributes={
                "network.transport": "udp",
                "network.peer.address": host,
                "network.peer.port": port,
                "wirekit.udp.drop_reason": reason,
                "wirekit.udp.drop_count": count,
            },
        ):
            log.warning(
                "datagrams dropped",
                extra={"reason": reason, "count": count, "last_source": f"{host}:{port}"},
            )

    def flush_all(self, now: float) -> None:
        for reason in DROP_REASONS:
            self.flush(reason, now)


@dataclass
class UdpContext:
    """What the endpoint's protocol uses: the defences' state, the metrics, the drop reporter
    (one pattern with echo's and cmdexec's contexts)."""

    metrics: UdpMetrics
    limiter: SourceLimiter
    reporter: DropReporter
    global_bucket: TokenBucket
    loop: LoopGuard
    clock: Callable[[], float]
    max_size: int
    min_port: int
    deny_ports: frozenset[int]
    check_source: bool
    buffers: tuple[int, int]  # receive, send

    @classmethod
    def build(
        cls,
        settings: UdpSettings,
        registry: CollectorRegistry,
        tracer: trace.Tracer,
        clock: Callable[[], float],
    ) -> UdpContext:
        # the rate limits and loop table the per-datagram path reads in C where it is built
        # (_hot); the clock is time.monotonic in the service, which the C build reads itself
        limiter = _hot.SourceLimiter(settings.rate_per_source, settings.burst_per_source,
                                settings.limit_sources)  # fmt: skip
        return cls(
            metrics=UdpMetrics(registry, limiter),
            limiter=limiter,
            reporter=DropReporter(tracer, settings.report_interval_s),
            global_bucket=_hot.TokenBucket(settings.rate_global, settings.burst_global, 0.0),
            loop=LoopGuard(settings.loop_window_s, settings.limit_sources, _hot.LoopTable()),
            clock=clock,
            max_size=settings.max_datagram_size,
            min_port=1024 if settings.deny_privileged_ports else 0,
            deny_ports=frozenset(settings.deny_ports),
            check_source=settings.deny_broadcast_multicast,
            buffers=(settings.receive_buffer_bytes, settings.send_buffer_bytes),
        )


class UdpEcho(_hot.Core, asyncio.DatagramProtocol):
    """The endpoint's protocol. ``_hot.Core`` holds what each datagram touches (the defences'
    state, the transport's ``sendto``, the received cells) and ``datagram_received``; what is
    rare is here: ``_judge``, ``_drop``, ``_send_empty``."""

    def __init__(self, ctx: UdpContext) -> None:
        super().__init__(ctx)
        self.stats = ctx.metrics
        self.reporter = ctx.reporter
        self.check_source = ctx.check_source

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._sendto = self.transport.sendto  # type: ignore[union-attr]
        self.sends_empty = bool(getattr(transport, "sends_empty", False))
        sock = transport.get_extra_info("socket")
        self._ipv4 = getattr(sock, "family", None) == socket.AF_INET
        if sock is not None:  # a real socket (tests drive the protocol with a fake transport)
            self.stats.socket.attach(sock, *self.ctx.buffers)

    def _send_empty(self, addr: Address) -> None:
        """asyncio's sendto() silently skips empty datagrams; RFC 862 echoes them too."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is None:
            return
        try:
            with socket.socket(fileno=os.dup(sock.fileno())) as raw:
                raw.setblocking(False)
                raw.sendto(b"", addr)
        except OSError:
            self.stats.dropped["send_error"].n += 1

    # C where built (_hot.c), else _hot.py's: the checks, the clock, the loop guard's table,
    # the global and per-source buckets, sendto, the received cells
    datagram_received = _hot.Core.datagram_received

    def _judge(self, host: str) -> bool:
        """Whether ``host`` is a source no echo answers; one that is not joins ``_unicast``
        (a set: a membership test is cheaper than a cached call; emptied at 4,096 hosts)."""
        if self.check_source and is_broadcast_or_multicast(host):
            return True
        if len(self._unicast) >= UNICAST_MEMO:
            self._unicast.clear()
        self._unicast.add(host)
        return False

    def _drop(self, reason: str, addr: Address, n: int) -> None:
        stats = self.stats
        stats.dropped[reason].n += 1
        stats.dropped_bytes.n += n
        stats.received.n += 1
        stats.received_bytes.n += n
        self.reporter.drop(reason, addr, self._time())

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier answers (e.g. port unreachable): counted, never fatal.
        self.stats.dropped["send_error"].n += 1
