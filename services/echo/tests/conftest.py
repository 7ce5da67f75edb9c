"""An in-process echo server on ephemeral loopback ports, with its own registry and tracer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from wirekit_echo.__main__ import serve
from wirekit_echo.settings import EchoSettings
from wirekit_servicekit.testing import RunningService, running_service


class EchoHarness(RunningService[EchoSettings]):
    async def connect(self, mode: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.ports[mode])


@contextlib.asynccontextmanager
async def running_echo(**overrides: Any) -> AsyncIterator[EchoHarness]:
    values: dict[str, Any] = {"raw_port": 0, "framed_port": 0, "metrics_port": 0,
                              "timeout_drain_s": 2.0, **overrides}  # fmt: skip
    async with running_service(serve, EchoSettings(**values), EchoHarness) as service:
        yield service


@pytest.fixture
async def echo() -> AsyncIterator[EchoHarness]:
    async with running_echo() as harness:
        yield harness


@pytest.fixture
def start_echo() -> Callable[..., contextlib.AbstractAsyncContextManager[EchoHarness]]:
    """``async with start_echo(limit_connections=3) as h:`` for tests that need other settings."""
    return running_echo
