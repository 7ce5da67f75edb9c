"""The in-process harness itself: it must fail a test whose service logged an error or left a
gauge of active things above 0 (every service test relies on that check)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, Gauge

from wirekit_servicekit import Part, Runtime, Service, ServiceSettings
from wirekit_servicekit.testing import RunningService, running_service


def _service(misbehave: Callable[[CollectorRegistry], None]) -> Service[ServiceSettings]:
    def build(runtime: Runtime[ServiceSettings]) -> list[Part]:
        misbehave(runtime.registry)
        return []

    return Service("wirekit-demo", "0", ServiceSettings, build)


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
    run = running_service(_service(misbehave), ServiceSettings(metrics_port=0), RunningService)
    if complaint is None:
        async with run:
            pass
        return
    with pytest.raises(AssertionError, match=complaint):
        async with run:
            pass
