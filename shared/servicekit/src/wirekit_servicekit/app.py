"""The entry point every wirekit service shares: settings, logs, event loop, telemetry, run.

A service supplies its settings class and a ``build(registry, tracer_provider)`` that returns
its listeners; everything around them is here, written once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, disable_created_metrics

from .lifecycle import Part, event_loop_factory, run
from .logs import configure_logging
from .metrics import MetricsServer, new_registry
from .settings import ServiceSettings, load_settings
from .tracing import setup_tracing
from .workers import current, enter_worker, supervise

__all__ = ["Build", "serve_service", "service_main"]

S = TypeVar("S", bound=ServiceSettings)
#: What a service supplies: its listeners and background tasks, built on a registry and a tracer
#: provider (fresh ones in tests).
Build = Callable[[CollectorRegistry, TracerProvider], Sequence[Part]]


async def serve_service(
    settings: ServiceSettings,
    name: str,
    version: str,
    build: Build,
    *,
    registry: CollectorRegistry | None = None,
    provider: TracerProvider | None = None,
    on_ready: Callable[[dict[str, int]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); return the exit status.

    Tests pass their own registry and tracer provider (the provider is then theirs to shut down).
    """
    registry = registry if registry is not None else new_registry()
    own_provider = provider is None
    provider = provider if provider is not None else setup_tracing(name, version)
    listeners = build(registry, provider)
    return await run(
        settings,
        listeners,
        MetricsServer(registry, settings.metrics_bind, settings.metrics_port),
        on_ready=on_ready,
        cleanup=provider.shutdown if own_provider else None,
        stop=stop,
    )


def service_main(
    settings_cls: type[S],
    name: str,
    version: str,
    serve: Callable[[S], Coroutine[Any, Any, int]],
    argv: Sequence[str] | None = None,
    *,
    check: Callable[[S], None] | None = None,
) -> NoReturn:
    """The console script: ``--version``; settings (exit 2 on bad ones); ``check`` (a service's
    own refusals, before anything starts); JSON logs; the event loop; serve; exit."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args:
        print(f"{name} {version}")
        raise SystemExit(0)
    inherited = enter_worker()  # a worker of a supervisor: its settings come from there
    settings = load_settings(settings_cls, args) if inherited is None else inherited
    assert isinstance(settings, settings_cls)
    if check is not None:
        check(settings)
    worker = current()
    configure_logging(settings.log_level, name, worker=None if worker is None else worker.index)
    disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide: once, here
    count = settings.worker_count
    if worker is None and count > 1:
        logging.getLogger(name.replace("-", "_")).info(
            f"starting {name}", extra={"version": version, "workers": count}
        )
        module = name.replace("-", "_")
        raise SystemExit(asyncio.run(supervise(settings, name, module, count, new_registry())))
    factory, loop = event_loop_factory(settings.event_loop)
    logging.getLogger(name.replace("-", "_")).info(
        f"starting {name}", extra={"version": version, "event_loop": loop}
    )
    with asyncio.Runner(loop_factory=factory) as runner:
        raise SystemExit(runner.run(serve(settings)))
