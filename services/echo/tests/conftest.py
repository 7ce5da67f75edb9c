"""An in-process echo server on ephemeral loopback ports, with its own registry and tracer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from wirekit_echo.__main__ import serve
from wirekit_echo.settings import EchoSettings
from wirekit_servicekit import new_registry


@dataclass
class EchoHarness:
    settings: EchoSettings
    registry: CollectorRegistry
    spans: InMemorySpanExporter
    ports: dict[str, int] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[int] | None = None

    def value(self, name: str, **labels: str) -> float:
        got = self.registry.get_sample_value(name, labels)
        return 0.0 if got is None else got

    async def wait_for(self, predicate: Callable[[], bool], limit_s: float = 5.0) -> None:
        """Poll ``predicate`` (bounded) until true; fail the test otherwise."""
        loop = asyncio.get_running_loop()
        end = loop.time() + limit_s
        while not predicate():
            if loop.time() > end:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.02)

    async def connect(self, mode: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.ports[mode])


@contextlib.asynccontextmanager
async def running_echo(**overrides: Any) -> AsyncIterator[EchoHarness]:
    values: dict[str, Any] = {
        "raw_port": 0,
        "framed_port": 0,
        "metrics_port": 0,
        "timeout_drain_s": 2.0,
    }
    values.update(overrides)
    settings = EchoSettings(**values)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    harness = EchoHarness(settings, new_registry(process_metrics=False), exporter)
    ready = asyncio.Event()

    def on_ready(ports: dict[str, int]) -> None:
        harness.ports = ports
        ready.set()

    harness.task = asyncio.create_task(
        serve(settings, harness.registry, provider, on_ready=on_ready, stop=harness.stop)
    )
    await asyncio.wait_for(ready.wait(), 5)
    try:
        yield harness
    finally:
        harness.stop.set()
        code = await asyncio.wait_for(harness.task, 10)
        assert code == 0


@pytest.fixture
async def echo() -> AsyncIterator[EchoHarness]:
    async with running_echo() as harness:
        yield harness


@pytest.fixture
def start_echo() -> Callable[..., contextlib.AbstractAsyncContextManager[EchoHarness]]:
    """``async with start_echo(limit_connections=3) as h:`` for tests that need other settings."""
    return running_echo
