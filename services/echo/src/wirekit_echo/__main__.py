"""``wirekit-echo``: run the echo service (``--help`` lists every setting)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from wirekit_servicekit import (
    Listener,
    MetricsServer,
    configure_logging,
    install_event_loop_policy,
    load_settings,
    new_registry,
    run,
    setup_tracing,
)

from . import __version__
from .protocol import EchoContext, EchoMetrics, FramedEcho, RawEcho
from .settings import EchoSettings

log = logging.getLogger("wirekit_echo")

_PROTOCOLS = {"raw": RawEcho, "framed": FramedEcho}


def build_listeners(
    settings: EchoSettings, registry: CollectorRegistry, provider: TracerProvider
) -> list[Listener]:
    metrics = EchoMetrics(registry)
    tracer = provider.get_tracer("wirekit_echo", __version__)
    ports = {"raw": settings.raw_port, "framed": settings.framed_port}
    modes = ("raw", "framed") if settings.mode == "both" else (settings.mode,)
    listeners = []
    for mode in modes:
        ctx = EchoContext.build(
            mode,
            metrics,
            tracer,
            limit=settings.limit_connections,
            idle_timeout=settings.timeout_idle_s,
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
    registry = registry if registry is not None else new_registry()
    own_provider = provider is None
    provider = provider if provider is not None else setup_tracing("wirekit-echo", __version__)
    metrics = MetricsServer(registry, settings.metrics_bind, settings.metrics_port)
    return await run(
        settings,
        build_listeners(settings, registry, provider),
        metrics,
        on_ready=on_ready,
        cleanup=provider.shutdown if own_provider else None,
        stop=stop,
    )


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(EchoSettings, argv)
    configure_logging(settings.log_level, "wirekit-echo")
    loop = install_event_loop_policy(settings.event_loop)
    log.info("starting wirekit-echo", extra={"version": __version__, "event_loop": loop})
    raise SystemExit(asyncio.run(serve(settings)))


if __name__ == "__main__":
    main()
