"""The event loop a service runs on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["event_loop_factory"]


def event_loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The loop to run on: uvloop when asked (or on ``auto`` when installed), else the standard
    one (``None``: asyncio's default). For ``asyncio.Runner(loop_factory=...)``, as uvicorn does:
    no process-wide event loop policy (deprecated from Python 3.14)."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.new_event_loop, "uvloop"
    return None, "asyncio"
