"""An in-process UDP echo on an ephemeral loopback port, with its own registry and tracer."""

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

from wirekit_servicekit import new_registry
from wirekit_udp.__main__ import serve
from wirekit_udp.settings import UdpSettings


@dataclass
class UdpHarness:
    settings: UdpSettings
    registry: CollectorRegistry
    spans: InMemorySpanExporter
    port: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def value(self, name: str, **labels: str) -> float:
        got = self.registry.get_sample_value(name, labels)
        return 0.0 if got is None else got

    async def wait_for(self, predicate: Callable[[], bool], limit_s: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + limit_s
        while not predicate():
            assert loop.time() < end, "condition not reached in time"
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running_udp(**overrides: Any) -> AsyncIterator[UdpHarness]:
    values: dict[str, Any] = {"port": 0, "metrics_port": 0}
    values.update(overrides)
    settings = UdpSettings(**values)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    h = UdpHarness(settings, new_registry(process_metrics=False), exporter)
    ready = asyncio.Event()

    def on_ready(ports: dict[str, int]) -> None:
        h.port = ports["udp"]
        ready.set()

    task = asyncio.create_task(serve(settings, h.registry, provider, on_ready, h.stop))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield h
    finally:
        h.stop.set()
        assert await asyncio.wait_for(task, 10) == 0


@pytest.fixture
def start_udp() -> Callable[..., contextlib.AbstractAsyncContextManager[UdpHarness]]:
    return running_udp
