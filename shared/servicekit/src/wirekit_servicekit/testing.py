"""Test support: run a service in-process (:meth:`Service.serve`, the entry point the console
script uses too) on ephemeral ports with a fresh registry and an in-memory span exporter (as
client_python's and OpenTelemetry's own tests do)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from .metrics import new_registry
from .service import Service
from .settings import ServiceSettings

__all__ = ["RunningService", "running_service", "until"]

S = TypeVar("S", bound=ServiceSettings)
R = TypeVar("R", bound="RunningService[Any]")
#: The serve(settings, registry, provider, on_ready, stop) of earlier releases (Service.serve).
Serve = Callable[..., Coroutine[Any, Any, int]]


@dataclass
class RunningService(Generic[S]):
    settings: S
    registry: CollectorRegistry
    spans: InMemorySpanExporter
    ports: dict[str, int] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[int] | None = None

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when the series does not exist yet)."""
        got = self.registry.get_sample_value(name, labels)
        return 0.0 if got is None else got

    async def wait_for(self, predicate: Callable[[], bool], limit_s: float = 5.0) -> None:
        """Poll ``predicate`` until true; fail (AssertionError) after ``limit_s`` seconds."""
        await until(predicate, limit_s)


async def until(predicate: Callable[[], bool], limit_s: float = 5.0) -> None:
    """Poll ``predicate`` on the loop until true; fail (AssertionError) after ``limit_s``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


class _Problems(logging.Handler):
    """Collects what a clean run never logs: ERROR and above, and any traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@contextlib.asynccontextmanager
async def running_service(
    service: Service[Any] | Serve,
    settings: ServiceSettings,
    cls: type[R],
    expected_errors: Collection[str] = (),
) -> AsyncIterator[R]:
    """Start ``service`` with ``settings`` as ``cls`` (a
    :class:`RunningService` subclass with the service's own helpers); stop it after, and check
    that it ended cleanly: exit status 0, every ``*_active`` gauge back to 0, nothing logged at
    ERROR or with a traceback while it ran (but the messages in ``expected_errors``, which a
    test provokes on purpose, logged without a traceback)."""
    problems = _Problems()
    logging.getLogger().addHandler(problems)
    try:
        async with _running(service, settings, cls) as running:
            yield running
        active = {
            f"{s.name}{s.labels}": s.value
            for metric in running.registry.collect()
            for s in metric.samples
            if s.name.endswith("_active") and s.value
        }
        assert not active, f"left active after the service stopped: {active}"
        unexpected = [r for r in problems.records
                      if r.exc_info or r.getMessage() not in expected_errors]  # fmt: skip
        assert not unexpected, "logged: " + "; ".join(
            f"{r.name}: {r.getMessage()}" for r in unexpected
        )
    finally:
        logging.getLogger().removeHandler(problems)


@contextlib.asynccontextmanager
async def _running(
    spec: Service[Any] | Serve, settings: ServiceSettings, cls: type[R]
) -> AsyncIterator[R]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    service = cls(settings, new_registry(process_metrics=False), exporter)
    ready = asyncio.Event()

    def on_ready(ports: dict[str, int]) -> None:
        service.ports = ports
        ready.set()

    serve = spec.serve if isinstance(spec, Service) else spec  # or a serve of earlier releases
    service.task = asyncio.create_task(
        serve(settings, service.registry, provider, on_ready, service.stop)
    )
    # Ready, or ended first (settings it refuses): say so at once rather than wait it out.
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({waiter, service.task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    if not ready.is_set():
        if service.task.done():
            code = service.task.result()  # or its exception, raised here
            raise RuntimeError(f"the service ended before it was ready (exit {code})")
        service.task.cancel()
        await asyncio.gather(service.task, return_exceptions=True)
        raise TimeoutError("the service was not ready within 10 s")
    try:
        yield service
    finally:
        service.stop.set()
        code = await asyncio.wait_for(service.task, 15)
        assert code == 0, f"the service exited {code}"
