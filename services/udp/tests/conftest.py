"""An in-process UDP echo on an ephemeral loopback port, with its own registry and tracer."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from wirekit_servicekit.testing import RunningService, running_service
from wirekit_udp.__main__ import serve
from wirekit_udp.settings import UdpSettings


class UdpHarness(RunningService[UdpSettings]):
    @property
    def port(self) -> int:
        return self.ports["udp"]


@contextlib.asynccontextmanager
async def running_udp(**overrides: Any) -> AsyncIterator[UdpHarness]:
    settings = UdpSettings(**{"port": 0, "metrics_port": 0, **overrides})
    async with running_service(serve, settings, UdpHarness) as service:
        yield service


@pytest.fixture
def start_udp() -> Callable[..., contextlib.AbstractAsyncContextManager[UdpHarness]]:
    return running_udp
