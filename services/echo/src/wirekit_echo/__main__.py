"""``wirekit-echo``: run the echo service (``--help`` lists every setting)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from wirekit_servicekit import ConnectionLimits, Listener, serve_service, service_main
from wirekit_servicekit.lifecycle import Part

from . import __version__
from .protocol import EchoContext, EchoMetrics, FramedEcho, RawEcho
from .settings import EchoSettings

NAME = "wirekit-echo"

_PROTOCOLS = {"raw": RawEcho, "framed": FramedEcho}


def build_listeners(
    settings: EchoSettings, registry: CollectorRegistry, provider: TracerProvider
) -> list[Part]:
    metrics = EchoMetrics(registry)
    tracer = provider.get_tracer("wirekit_echo", __version__)
    ports = {"raw": settings.raw_port, "framed": settings.framed_port}
    modes = ("raw", "framed") if settings.mode == "both" else (settings.mode,)
    listeners: list[Part] = []
    for mode in modes:
        ctx = EchoContext.build(
            mode,
            metrics,
            tracer,
            limits=ConnectionLimits.from_settings(settings),
            max_frame_size=settings.max_frame_size,
        )
        factory = functools.partial(_PROTOCOLS[mode], ctx)
        listeners.append(Listener(mode, settings.host, ports[mode], factory, ctx.hub))
    return listeners


async def serve(
    settings: EchoSettings,
    registry: CollectorRegistry | None = None,
    provider: TracerProvider | None = None,
    on_ready: Callable[[dict[str, int]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; return the exit status. Tests pass their own registry/provider."""
    return await serve_service(
        settings, NAME, __version__, functools.partial(build_listeners, settings),
        registry=registry, provider=provider, on_ready=on_ready, stop=stop,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    service_main(EchoSettings, NAME, __version__, serve, argv)


if __name__ == "__main__":
    main()
