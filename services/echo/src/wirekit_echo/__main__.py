"""``wirekit-echo``: run the echo service (``--help`` lists every setting)."""

from __future__ import annotations

import functools

from wirekit_servicekit import ConnectionLimits, Listener, Part, Runtime, Service

from . import __version__
from .protocol import EchoContext, EchoMetrics, FramedEcho, RawEcho
from .settings import EchoSettings

_PROTOCOLS = {"raw": RawEcho, "framed": FramedEcho}


def build(runtime: Runtime[EchoSettings]) -> list[Part]:
    """One listener per mode: raw (bytes back as they come) and framed (frame by frame)."""
    settings = runtime.settings
    metrics = EchoMetrics(runtime.registry)
    ports = {"raw": settings.raw_port, "framed": settings.framed_port}
    modes = ("raw", "framed") if settings.mode == "both" else (settings.mode,)
    listeners: list[Part] = []
    for mode in modes:
        ctx = EchoContext.build(
            mode, metrics, runtime.tracer, limits=ConnectionLimits.from_settings(settings),
            max_frame_size=settings.max_frame_size,
        )  # fmt: skip
        factory = functools.partial(_PROTOCOLS[mode], ctx)
        listeners.append(Listener(mode, settings.host, ports[mode], factory, ctx.hub))
    return listeners


SERVICE = Service(
    "wirekit-echo",
    __version__,
    EchoSettings,
    build,
    compiled=("wirekit_framing._codec", "wirekit_echo._hot"),
)
main = SERVICE.main
serve = SERVICE.serve  # the in-process entry point of earlier releases, for tests and embedders

if __name__ == "__main__":
    main()
