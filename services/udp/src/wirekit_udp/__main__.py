"""``wirekit-udp``: run the UDP echo service (``--help`` lists every setting)."""

from __future__ import annotations

import asyncio
import time

from wirekit_servicekit import Background, DatagramListener, Part, Runtime, Service

from . import __version__
from .pktinfo import open_pktinfo_endpoint
from .protocol import UdpContext, UdpEcho
from .settings import UdpSettings


def build(runtime: Runtime[UdpSettings]) -> list[Part]:
    """The datagram endpoint, and the task that reports drops once per interval."""
    settings = runtime.settings
    ctx = UdpContext.build(settings, runtime.registry, runtime.tracer, time.monotonic)

    async def flush_reports() -> None:
        """Drops not reported yet, every interval, and once more at shutdown."""
        try:
            while True:
                await asyncio.sleep(settings.report_interval_s)
                ctx.reporter.flush_all(ctx.clock())
        finally:
            ctx.reporter.flush_all(ctx.clock())

    return [
        DatagramListener(
            "udp",
            settings.host,
            settings.port,
            lambda: UdpEcho(ctx),
            open_pktinfo_endpoint(settings.max_datagram_size),
        ),
        Background("drop reports", flush_reports),
    ]


SERVICE = Service("wirekit-udp", __version__, UdpSettings, build, compiled=("wirekit_udp._hot",))
main = SERVICE.main
serve = SERVICE.serve  # the in-process entry point of earlier releases, for tests and embedders

if __name__ == "__main__":
    main()
