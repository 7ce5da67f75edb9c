"""The UDP echo: one ``DatagramProtocol`` answers each datagram byte-exact, in one datagram,
unless a defence drops it. Nothing on the hot path takes a lock: counters are plain integers
that a Prometheus collector reads at scrape time, and drops are reported (log line + span) at
most once per reason per interval, with how many they stand for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from opentelemetry import trace
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .defences import SourceLimiter, TokenBucket, is_broadcast_or_multicast
from .settings import UdpSettings

log = logging.getLogger(__name__)

#: Why a datagram got no answer: the ``reason`` label of udp_datagrams_dropped_total.
DROP_REASONS = (
    "oversize", "privileged_port", "denied_port", "broadcast_multicast",
    "rate_limit_source", "rate_limit_global", "send_error",
)  # fmt: skip


@dataclass
class UdpStats:
    """Plain integers moved on the hot path; read by :class:`UdpCollector` at scrape time."""

    received: int = 0
    received_bytes: int = 0
    sent: int = 0
    sent_bytes: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))


class UdpCollector(Collector):
    def __init__(self, stats: UdpStats, limiter: SourceLimiter) -> None:
        self.stats = stats
        self.limiter = limiter

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.stats
        for name, doc, value in (
            ("udp_datagrams_received", "Datagrams received.", s.received),
            ("udp_received_bytes", "Bytes received.", s.received_bytes),
            ("udp_datagrams_sent", "Datagrams answered.", s.sent),
            ("udp_sent_bytes", "Bytes answered.", s.sent_bytes),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        dropped = CounterMetricFamily(
            "udp_datagrams_dropped", "Datagrams not answered, by reason.", labels=["reason"]
        )
        for reason, count in list(s.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield GaugeMetricFamily(
            "udp_rate_limited_sources",
            "Source addresses whose last datagram was refused by their rate limit.",
            value=self.limiter.limited,
        )
        yield GaugeMetricFamily(
            "udp_tracked_sources",
            "Source addresses in the rate-limit table.",
            value=len(self.limiter),
        )


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


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, settings: UdpSettings, stats: UdpStats, limiter: SourceLimiter,
                 reporter: DropReporter, clock: Callable[[], float]) -> None:  # fmt: skip
        self.stats = stats
        self.limiter = limiter
        self.reporter = reporter
        self.max_size = settings.max_datagram_size
        self.min_port = 1024 if settings.deny_privileged_ports else 0
        self.deny_ports = frozenset(settings.deny_ports)
        self.check_source = settings.deny_broadcast_multicast
        self.global_bucket = TokenBucket(settings.rate_global, settings.burst_global, 0.0)
        self.transport: asyncio.DatagramTransport | None = None
        self._time = clock

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

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
            self.stats.dropped["send_error"] += 1

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        stats = self.stats
        n = len(data)
        stats.received += 1
        stats.received_bytes += n
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
            if not self.global_bucket.take(now):
                reason = "rate_limit_global"
            elif not self.limiter.allow(addr[0], now):
                reason = "rate_limit_source"
            else:
                assert self.transport is not None
                if n:
                    self.transport.sendto(data, addr)  # the same bytes: never larger
                else:
                    self._send_empty(addr)
                stats.sent += 1
                stats.sent_bytes += n
                return
        stats.dropped[reason] += 1
        self.reporter.drop(reason, addr, self._time())

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier answers (e.g. port unreachable): counted, never fatal.
        self.stats.dropped["send_error"] += 1


def register(registry: CollectorRegistry, stats: UdpStats, limiter: SourceLimiter) -> None:
    registry.register(UdpCollector(stats, limiter))
