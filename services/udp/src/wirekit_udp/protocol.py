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
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Gauge

from wirekit_servicekit import HotCounter
from wirekit_servicekit.metrics import Cell
from wirekit_servicekit.ratelimit import SourceLimiter, TokenBucket

from .defences import LoopGuard, is_broadcast_or_multicast, source_key
from .kernel import SocketStats
from .settings import UdpSettings

log = logging.getLogger(__name__)

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
            return HotCounter(name, doc, namespace=ns, registry=registry).labels()

        self.received = cell("datagrams_received", "Datagrams received.")
        self.received_bytes = cell("received_bytes", "Bytes received.")
        self.sent = cell("datagrams_sent", "Datagrams answered.")
        self.sent_bytes = cell("sent_bytes", "Bytes answered.")
        dropped = HotCounter("datagrams_dropped", "Datagrams not answered, by reason.", ["reason"],
                             namespace=ns, registry=registry)  # fmt: skip
        self.dropped = {reason: dropped.labels(reason) for reason in DROP_REASONS}
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


class DropReporter:
    """Log and trace drops without letting a flood flood the logs: per reason, at most one
    log line and one span per interval, each carrying the number of drops it stands for."""

    def __init__(self, tracer: trace.Tracer, interval_s: float) -> None:
        self.tracer = tracer
        self.interval_s = interval_s
        self.pending = dict.fromkeys(DROP_REASONS, 0)
        self.last_source: dict[str, tuple[str, int]] = {}
        self.next_report = dict.fromkeys(DROP_REASONS, 0.0)

    def drop(self, reason: str, addr: tuple[str, int], now: float) -> None:
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
        limiter = SourceLimiter(settings.rate_per_source, settings.burst_per_source,
                                settings.limit_sources)  # fmt: skip
        return cls(
            metrics=UdpMetrics(registry, limiter),
            limiter=limiter,
            reporter=DropReporter(tracer, settings.report_interval_s),
            global_bucket=TokenBucket(settings.rate_global, settings.burst_global, 0.0),
            loop=LoopGuard(settings.loop_window_s, settings.limit_sources),
            clock=clock,
            max_size=settings.max_datagram_size,
            min_port=1024 if settings.deny_privileged_ports else 0,
            deny_ports=frozenset(settings.deny_ports),
            check_source=settings.deny_broadcast_multicast,
            buffers=(settings.receive_buffer_bytes, settings.send_buffer_bytes),
        )


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, ctx: UdpContext) -> None:
        self.ctx = ctx
        self.stats = ctx.metrics
        self.limiter = ctx.limiter
        self.reporter = ctx.reporter
        self.max_size = ctx.max_size
        self.min_port = ctx.min_port
        self.deny_ports = ctx.deny_ports
        self.check_source = ctx.check_source
        self.global_bucket = ctx.global_bucket
        self.loop = ctx.loop
        self.transport: asyncio.DatagramTransport | None = None
        self.sends_empty = False  # asyncio's transport skips empty datagrams
        self._time = ctx.clock
        # the per-datagram cells, one attribute away
        self._received, self._received_bytes = ctx.metrics.received, ctx.metrics.received_bytes
        self._sent, self._sent_bytes = ctx.metrics.sent, ctx.metrics.sent_bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.sends_empty = bool(getattr(transport, "sends_empty", False))
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a real socket (tests drive the protocol with a fake transport)
            self.stats.socket.attach(sock, *self.ctx.buffers)

    def _send_empty(self, addr: tuple[str, int]) -> None:
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

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        n = len(data)
        self._received.n += 1
        self._received_bytes.n += n
        port = addr[1]
        if n > self.max_size:
            reason = "oversize"
        elif port < self.min_port:
            reason = "privileged_port"
        elif port in self.deny_ports:
            reason = "denied_port"
        elif self.check_source and is_broadcast_or_multicast(addr[0]):
            reason = "broadcast_multicast"
        else:
            now = self._time()
            host = addr[0]
            loop = self.loop
            key = hash((addr, data))  # LoopGuard.key, inlined on the hot path
            if loop.reflected(key, now):
                reason = "loop"
            elif not self.global_bucket.take(now):
                reason = "rate_limit_global"
            elif not self.limiter.allow(host if ":" not in host else source_key(host), now):
                reason = "rate_limit_source"
            else:
                transport = self.transport
                assert transport is not None
                if n or self.sends_empty:
                    transport.sendto(data, addr)  # the same bytes: never larger
                else:
                    self._send_empty(addr)
                loop.answered(key, now)
                self._sent.n += 1
                self._sent_bytes.n += n
                return
        self.stats.dropped[reason].n += 1
        self.reporter.drop(reason, addr, self._time())

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier answers (e.g. port unreachable): counted, never fatal.
        self.stats.dropped["send_error"].n += 1
