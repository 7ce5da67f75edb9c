"""``wirekit-udp``: run the UDP echo service (``--help`` lists every setting)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from wirekit_servicekit import (
    DatagramListener,
    MetricsServer,
    configure_logging,
    install_event_loop_policy,
    load_settings,
    new_registry,
    run,
    setup_tracing,
)

from . import __version__
from .defences import SourceLimiter
from .protocol import DropReporter, UdpEcho, UdpStats
from .settings import UdpSettings

log = logging.getLogger("wirekit_udp")


async def serve(
    settings: UdpSettings,
    registry: CollectorRegistry | None = None,
    provider: TracerProvider | None = None,
    on_ready: Callable[[dict[str, int]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    registry = registry if registry is not None else new_registry()
    own_provider = provider is None
    provider = provider if provider is not None else setup_tracing("wirekit-udp", __version__)
    limiter = SourceLimiter(settings.rate_per_source, settings.burst_per_source,
                            settings.limit_sources)  # fmt: skip
    stats = UdpStats(registry, limiter)
    reporter = DropReporter(
        provider.get_tracer("wirekit_udp", __version__), settings.report_interval_s
    )
    loop = asyncio.get_running_loop()

    async def flush_reports() -> None:  # drops nobody reported yet, once per interval
        while True:
            await asyncio.sleep(settings.report_interval_s)
            reporter.flush_all(loop.time())

    flusher = asyncio.ensure_future(flush_reports())
    listener = DatagramListener(
        "udp",
        settings.host,
        settings.port,
        lambda: UdpEcho(settings, stats, limiter, reporter, loop.time),
    )
    try:
        metrics = MetricsServer(registry, settings.metrics_bind, settings.metrics_port)
        return await run(
            settings, [listener], metrics, on_ready=on_ready,
            cleanup=provider.shutdown if own_provider else None, stop=stop,
        )  # fmt: skip
    finally:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        reporter.flush_all(loop.time())


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(UdpSettings, argv)
    configure_logging(settings.log_level, "wirekit-udp")
    loop = install_event_loop_policy(settings.event_loop)
    log.info("starting wirekit-udp", extra={"version": __version__, "event_loop": loop})
    raise SystemExit(asyncio.run(serve(settings)))


if __name__ == "__main__":
    main()
