"""The continuous prober: targets resolved on an interval, one runner task per endpoint, the
series of the endpoints probed now; and /probe, one burst on demand for Prometheus'
multi-target pattern."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wirekit_servicekit.ratelimit import TokenBucket

from .runners import Pacer, run_module
from .series import Series, families
from .settings import ProbeSettings
from .targets import (
    RESOLVE_REASONS,
    Endpoint,
    Spec,
    allowed,
    dns_reason,
    parse_allow,
    parse_spec,
    resolve,
)
from .tracker import Tracker

log = logging.getLogger(__name__)

#: How long one resolution may take before it counts as failed (reason "timeout").
RESOLVE_TIMEOUT_S = 10.0


def budget_bucket(settings: ProbeSettings) -> TokenBucket:
    """The packet budget: ``packet_budget`` per second, a burst of at most one second's worth
    of a tenth -- so that no second ever holds more than 1.1 x packet_budget probes."""
    return TokenBucket(settings.packet_budget, max(1, int(settings.packet_budget / 10)),
                       time.monotonic())  # fmt: skip


def runner(
    series: Series, pacer: Pacer, settings: ProbeSettings, count: int | None
) -> Coroutine[Any, Any, None]:
    return run_module(series, pacer, size=settings.size, timeout_s=settings.timeout_s,
                      connect_timeout_s=settings.connect_timeout_s, count=count)  # fmt: skip


class Monitor(Collector):
    """Owns the runner tasks: ``run`` resolves, starts and stops them, and awaits every one
    when it ends. Also the collector of the service-wide families."""

    def __init__(self, settings: ProbeSettings, budget: TokenBucket) -> None:
        self.settings = settings
        self.budget = budget
        self.specs = [parse_spec(text) for text in settings.targets]
        self.series: dict[Endpoint, Series] = {}
        self.tasks: dict[Endpoint, asyncio.Task[None]] = {}
        self.by_spec: dict[Spec, list[Endpoint]] = {}
        self.resolve_errors: Counter[tuple[str, str]] = Counter()
        self.dropped = 0  # endpoints found but not probed: over limit_endpoints

    def rate(self) -> float:
        """Each target's share: rate_per_target, or less when the budget would not hold it
        (with a tenth of headroom for the clusters of Poisson sending)."""
        share = 0.9 * self.settings.packet_budget / max(1, len(self.tasks))
        return min(self.settings.rate_per_target, share)

    async def run(self) -> None:
        try:
            while True:
                await self.refresh()
                await asyncio.sleep(self.settings.resolve_interval_s)
        finally:
            await self._stop(list(self.tasks))

    async def refresh(self) -> None:
        for spec in self.specs:
            try:
                async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                    found = await resolve(spec, self.settings.dns_servers)
            except TimeoutError:
                self._failed(spec, "timeout")
                continue  # a failed resolution keeps what the last one found
            except OSError as exc:
                self._failed(spec, dns_reason(exc))
                continue
            self.by_spec[spec] = found
        wanted = self._within_limit({e for endpoints in self.by_spec.values() for e in endpoints})
        gone = [e for e in self.tasks if e not in wanted]
        await self._stop(gone)
        for endpoint in sorted(wanted - set(self.tasks)):
            self._start(endpoint)

    def _within_limit(self, found: set[Endpoint]) -> set[Endpoint]:
        """At most limit_endpoints of ``found``: those probed already first (no churn), then
        the rest in order; how many were left out is kept for probe_endpoints_dropped."""
        limit = self.settings.limit_endpoints
        self.dropped = max(0, len(found) - limit)
        if not self.dropped:
            return found
        kept = sorted(found & self.tasks.keys())[:limit]
        kept += sorted(found - self.tasks.keys())[: limit - len(kept)]
        log.warning("too many endpoints: some are not probed",
                    extra={"found": len(found), "limit_endpoints": limit})  # fmt: skip
        return set(kept)

    def _failed(self, spec: Spec, reason: str) -> None:
        self.resolve_errors[(spec.host, reason)] += 1
        log.warning("cannot resolve a target", extra={"target": str(spec), "reason": reason})

    def _start(self, endpoint: Endpoint) -> None:
        series = Series(endpoint, Tracker(self.settings.timeout_s))
        self.series[endpoint] = series
        pacer = Pacer(self.rate, self.budget, series)
        task = asyncio.create_task(self._supervised(series, pacer), name=endpoint.target)
        self.tasks[endpoint] = task
        log.info("target added", extra={"probe_module": endpoint.module, "target": endpoint.target,
                                        "target_name": endpoint.name})  # fmt: skip

    async def _supervised(self, series: Series, pacer: Pacer) -> None:
        """A runner that fails is logged and started again a second later."""
        while True:
            try:
                await runner(series, pacer, self.settings, None)
            except Exception:
                log.exception("a probe runner failed", extra={"target": series.endpoint.target})
                await asyncio.sleep(1.0)

    async def _stop(self, endpoints: list[Endpoint]) -> None:
        tasks = [self.tasks.pop(e) for e in endpoints]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for e in endpoints:
            del self.series[e]
            log.info("target removed", extra={"probe_module": e.module, "target": e.target,
                                              "target_name": e.name})  # fmt: skip

    def collect(self) -> Iterator[Metric]:
        targets = GaugeMetricFamily("probe_targets", "Endpoints probed now.")
        targets.add_metric([], len(self.series))
        yield targets
        dropped = GaugeMetricFamily("probe_endpoints_dropped", "Endpoints found at the last "
                                    "resolution but not probed: over limit_endpoints.")  # fmt: skip
        dropped.add_metric([], self.dropped)
        yield dropped
        errors = CounterMetricFamily(
            "probe_resolve_errors",
            "Failed resolutions of a target's name, by reason.",
            labels=["name", "reason"],
        )
        for name in sorted({spec.host for spec in self.specs}):
            for reason in RESOLVE_REASONS:
                errors.add_metric([name, reason], self.resolve_errors[(name, reason)])
        yield errors

    def series_now(self) -> list[Series]:
        return list(self.series.values())


class ProbeEndpoint(Collector):
    """``/probe?target=HOST:PORT&module=udp[&count=N]``: one burst, answered with the
    per-target families for that target plus ``probe_success`` and ``probe_duration_seconds``
    (blackbox_exporter's names). Runs in the metrics server's thread; the burst runs on the
    service's loop, with a deadline."""

    def __init__(
        self, settings: ProbeSettings, budget: TokenBucket, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.settings = settings
        self.budget = budget
        self.loop = loop
        self.networks, self.names = parse_allow(settings.probe_allow)
        self.slots = threading.BoundedSemaphore(settings.probe_concurrency)
        self.requests: Counter[str] = Counter()

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("probe_http_requests", "/probe requests, by status.",
                                       labels=["code"])  # fmt: skip
        for code, n in sorted(self.requests.items()):
            requests.add_metric([code], n)
        yield requests

    def handle(self, params: dict[str, list[str]]) -> tuple[int, str, bytes]:
        status, body = self._handle(params)
        self.requests[str(status)] += 1
        if status != 200:
            return status, "text/plain; charset=utf-8", body.encode() + b"\n"
        return status, "text/plain; version=0.0.4; charset=utf-8", body.encode()

    def _handle(self, params: dict[str, list[str]]) -> tuple[int, str]:
        target = params.get("target", [""])[-1]
        module = params.get("module", ["udp"])[-1]
        if not target:
            return 400, "target is required: /probe?target=HOST:PORT&module=udp"
        try:
            spec = parse_spec(target, module)
        except ValueError as exc:
            return 400, str(exc)
        count = self.settings.probe_count
        if "count" in params:
            text = params["count"][-1]
            if not text.isdigit() or not 1 <= int(text) <= self.settings.probe_count:
                return 400, f"count must be 1..{self.settings.probe_count}, got {text!r}"
            count = int(text)
        if not self.slots.acquire(blocking=False):
            return 429, f"{self.settings.probe_concurrency} /probe bursts are running already"
        try:
            deadline = (count * self.settings.probe_interval_s * 4 + self.settings.timeout_s
                        + self.settings.connect_timeout_s + RESOLVE_TIMEOUT_S)  # fmt: skip
            future = asyncio.run_coroutine_threadsafe(self.burst(spec, count), self.loop)
            try:
                return future.result(timeout=deadline)
            except concurrent.futures.TimeoutError:
                future.cancel()
                return 504, f"the burst did not end within {deadline:.1f} s"
        finally:
            self.slots.release()

    async def burst(self, spec: Spec, count: int) -> tuple[int, str]:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                found = await resolve(spec, self.settings.dns_servers)
        except (OSError, TimeoutError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else dns_reason(exc)
            return 400, f"cannot resolve {spec.host!r}: {reason}"
        if not allowed(spec, [e.address for e in found], self.networks, self.names):
            return 400, f"target {spec.host!r} is not allowed by probe_allow"
        series = Series(found[0], Tracker(self.settings.timeout_s))
        pacer = Pacer(lambda: 1.0 / self.settings.probe_interval_s, self.budget, series)
        started = time.monotonic()
        await runner(series, pacer, self.settings, count)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Burst(series, time.monotonic() - started, self.settings.up_window_s))
        return 200, generate_latest(registry).decode()


class _Burst(Collector):
    def __init__(self, series: Series, duration_s: float, up_window_s: float) -> None:
        self.series, self.duration_s, self.up_window_s = series, duration_s, up_window_s

    def collect(self) -> Iterator[Metric]:
        success = GaugeMetricFamily("probe_success", "1 when any probe of the burst came back.")
        success.add_metric([], 1.0 if self.series.tracker.received else 0.0)
        yield success
        duration = GaugeMetricFamily("probe_duration_seconds", "How long the burst took.")
        duration.add_metric([], self.duration_s)
        yield duration
        yield from families([self.series], self.up_window_s)
