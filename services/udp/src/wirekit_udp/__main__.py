"""``wirekit-udp``: run the UDP echo service (``--help`` lists every setting)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from wirekit_servicekit import Background, DatagramListener, serve_service, service_main
from wirekit_servicekit.lifecycle import Part

from . import __version__
from .protocol import UdpContext, UdpEcho
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
        ctx = UdpContext.build(
            settings, registry, provider.get_tracer("wirekit_udp", __version__), loop.time
        )

        async def flush_reports() -> None:
            """Drops not reported yet, every interval, and once more at shutdown."""
            try:
                while True:
                    await asyncio.sleep(settings.report_interval_s)
                    ctx.reporter.flush_all(loop.time())
            finally:
                ctx.reporter.flush_all(loop.time())

        return [
            DatagramListener("udp", settings.host, settings.port, lambda: UdpEcho(ctx)),
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
