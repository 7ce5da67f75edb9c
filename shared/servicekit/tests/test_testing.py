"""The in-process harness itself: it must fail a test whose service logged an error or left a
gauge of active things above 0 (every service test relies on that check)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Gauge

from wirekit_servicekit import ServiceSettings
from wirekit_servicekit.testing import RunningService, running_service


def _serve(misbehave: Callable[[CollectorRegistry], None]) -> Any:
    async def serve(
        settings: ServiceSettings,
        registry: CollectorRegistry,
        provider: TracerProvider,
        on_ready: Callable[[dict[str, int]], None],
        stop: asyncio.Event,
    ) -> int:
        on_ready({})
        misbehave(registry)
        await stop.wait()
        return 0

    return serve


def _error(_: CollectorRegistry) -> None:
    logging.getLogger("demo").error("something broke")


def _left_active(registry: CollectorRegistry) -> None:
    Gauge("demo_runs_active", "Runs.", registry=registry).set(1)


def _fine(_: CollectorRegistry) -> None:
    logging.getLogger("demo").warning("a warning is fine")


@pytest.mark.parametrize(
    ("misbehave", "complaint"),
    [(_error, "something broke"), (_left_active, "demo_runs_active"), (_fine, None)],
    ids=["error-logged", "gauge-left-active", "clean"],
)
async def test_the_harness_fails_an_unclean_run(
    misbehave: Callable[[CollectorRegistry], None], complaint: str | None
) -> None:
    run = running_service(_serve(misbehave), ServiceSettings(), RunningService)
    if complaint is None:
        async with run:
            pass
        return
    with pytest.raises(AssertionError, match=complaint):
        async with run:
            pass
