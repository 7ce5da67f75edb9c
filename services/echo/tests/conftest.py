"""An in-process echo server on ephemeral loopback ports, with its own registry and tracer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from wirekit_harness import EchoHarness, StartEcho, running_echo


@pytest.fixture
async def echo() -> AsyncIterator[EchoHarness]:
    async with running_echo() as harness:
        yield harness


@pytest.fixture
def start_echo() -> StartEcho:
    """``async with start_echo(limit_connections=3) as h:`` for tests that need other settings."""
    return running_echo
