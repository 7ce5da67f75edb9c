"""An in-process cmdexec server on an ephemeral loopback port, and a blocking client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from wirekit_harness import CmdexecHarness, StartCmdexec, running_cmdexec


@pytest.fixture
async def cmdexec() -> AsyncIterator[CmdexecHarness]:
    async with running_cmdexec() as h:
        yield h


@pytest.fixture
def start_cmdexec() -> StartCmdexec:
    return running_cmdexec
