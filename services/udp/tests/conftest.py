"""An in-process UDP echo on an ephemeral loopback port, with its own registry and tracer."""

from __future__ import annotations

import pytest
from wirekit_harness import StartUdp, running_udp


@pytest.fixture
def start_udp() -> StartUdp:
    return running_udp
