"""A wirekit service, declared once: its name, settings, refusals and ``build``.

A service module declares a :class:`Service` and nothing else around it::

    SERVICE = Service("wirekit-echo", __version__, EchoSettings, build)
    main = SERVICE.main  # the console script

``build(runtime)`` returns the service's parts (listeners, background tasks, reload) from a
:class:`Runtime`: its settings, metrics registry, tracer, logger and place among the workers.
Everything around it is here, written once: the console script (:meth:`Service.main`:
``--version``, settings, refusals, JSON logs, the supervisor or the event loop) and the entry
point the tests and the console script share (:meth:`Service.serve`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, NoReturn, TypeVar

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, disable_created_metrics

from .accel import summary
from .aggregate import gauge_modes
from .lifecycle import run
from .logs import configure_logging
from .loops import event_loop_factory
from .metrics import MetricsServer, new_registry
from .parts import Part
from .settings import ServiceSettings, load_settings
from .supervisor import supervise
from .tracing import setup_tracing
from .worker import SOLO, Worker, enter_worker

__all__ = ["Runtime", "Service"]

S = TypeVar("S", bound=ServiceSettings)


@dataclass(frozen=True)
class Runtime(Generic[S]):
    """What a service's ``build`` gets: everything it may depend on, passed in (tests pass
    fresh registries and tracer providers)."""

    settings: S
    registry: CollectorRegistry
    tracer: trace.Tracer
    log: logging.Logger
    #: Its place: worker ``worker.index`` of ``worker.count`` (0 of 1 alone). Per-instance
    #: limits of the settings are already divided; ``worker.share`` divides the service's own.
    worker: Worker


@dataclass(frozen=True)
class Service(Generic[S]):
    """One service: ``name`` is its console script (``wirekit-echo``), ``build`` makes its
    parts, ``check`` refuses unsafe settings before anything starts (exit 2 with one line)."""

    name: str
    version: str
    settings: type[S]
    build: Callable[[Runtime[S]], Sequence[Part]]
    #: Before anything starts (and before workers are spawned): refuse (exit 2) or complete
    #: the settings (return them: what the supervisor hands every worker).
    check: Callable[[S], S | None] | None = None
    #: The modules of its per-message path that have a compiled build (wirekit_servicekit.accel):
    #: the start log line says which build runs.
    compiled: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        """Its package, which ``python -m`` runs (a worker): ``wirekit_echo``."""
        return self.name.replace("-", "_")

    async def serve(
        self,
        settings: S,
        registry: CollectorRegistry | None = None,
        provider: TracerProvider | None = None,
        on_ready: Callable[[dict[str, int]], None] | None = None,
        stop: asyncio.Event | None = None,
        *,
        worker: Worker = SOLO,
    ) -> int:
        """Build the service and serve until SIGTERM/SIGINT (or ``stop``); the exit status.
        Tests pass their own registry and tracer provider (the provider is theirs to shut
        down); a worker announces itself to its supervisor once ready."""
        registry = registry if registry is not None else new_registry()
        own_provider = provider is None
        provider = provider if provider is not None else setup_tracing(self.name, self.version)
        runtime = Runtime(settings, registry, provider.get_tracer(self.module, self.version),
                          logging.getLogger(self.module), worker)  # fmt: skip
        parts = self.build(runtime)

        def ready(ports: dict[str, int]) -> None:
            if on_ready is not None:
                on_ready(ports)
            worker.announce(ports, gauge_modes(registry))

        return await run(
            settings, parts, MetricsServer(registry, settings.metrics_bind, settings.metrics_port),
            worker=worker, on_ready=ready, cleanup=provider.shutdown if own_provider else None,
            stop=stop,
        )  # fmt: skip

    def main(self, argv: Sequence[str] | None = None) -> NoReturn:
        """The console script: ``--version``; settings (exit 2 on bad ones); ``check``; JSON
        logs; a supervisor of workers, or the event loop; serve; exit."""
        args = list(sys.argv[1:] if argv is None else argv)
        if "--version" in args:
            print(f"{self.name} {self.version}")
            raise SystemExit(0)
        inherited = enter_worker()  # a worker of a supervisor: settings and place from there
        if inherited is None:
            settings, worker = load_settings(self.settings, args), None
        else:
            got, worker = inherited
            assert isinstance(got, self.settings)
            settings = got
        configure_logging(settings.log_level, self.name,
                          worker=None if worker is None else worker.index)  # fmt: skip
        if self.check is not None:
            settings = self.check(settings) or settings
        disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide: once, here
        log = logging.getLogger(self.module)
        count = settings.worker_count
        if worker is None and count > 1:
            log.info(f"starting {self.name}", extra={"version": self.version, "workers": count})
            raise SystemExit(supervise(settings, self.name, self.module, count))
        factory, loop = event_loop_factory(settings.event_loop)
        log.info(f"starting {self.name}", extra={"version": self.version, "event_loop": loop,
                                                 "build": summary(self.compiled)})  # fmt: skip
        with asyncio.Runner(loop_factory=factory) as runner:
            raise SystemExit(runner.run(self.serve(settings, worker=worker or SOLO)))
