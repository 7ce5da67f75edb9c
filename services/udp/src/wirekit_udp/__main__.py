"""``wirekit-udp``: run the UDP echo service (``--help`` lists every setting)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from wirekit_servicekit import Background, DatagramListener, serve_service, service_main
from wirekit_servicekit.lifecycle import Part
from wirekit_servicekit.ratelimit import SourceLimiter

from . import __version__
from .protocol import DropReporter, UdpEcho, UdpStats
from .settings import UdpSettings

NAME = "wirekit-udp"


async def serve(
    settings: UdpSettings,
    registry: CollectorRegistry | None = None,
    provider: TracerProvider | None = None,
    on_ready: Callable[[dict[str, int]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    loop = asyncio.get_running_loop()

    def build(registry: CollectorRegistry, provider: TracerProvider) -> list[Part]:
        limiter = SourceLimiter(settings.rate_per_source, settings.burst_per_source,
                                settings.limit_sources)  # fmt: skip
        stats = UdpStats(registry, limiter)
        tracer = provider.get_tracer("wirekit_udp", __version__)
        reporter = DropReporter(tracer, settings.report_interval_s)

        async def flush_reports() -> None:
            """Drops not reported yet, every interval, and once more at shutdown."""
            try:
                while True:
                    await asyncio.sleep(settings.report_interval_s)
                    reporter.flush_all(loop.time())
            finally:
                reporter.flush_all(loop.time())

        def factory() -> UdpEcho:
            return UdpEcho(settings, stats, limiter, reporter, loop.time)

        return [
            DatagramListener("udp", settings.host, settings.port, factory),
            Background("drop reports", flush_reports),
        ]

    return await serve_service(
        settings, NAME, __version__, build,
        registry=registry, provider=provider, on_ready=on_ready, stop=stop,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    service_main(UdpSettings, NAME, __version__, serve, argv)


if __name__ == "__main__":
    main()
