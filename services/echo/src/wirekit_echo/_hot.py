"""Echo's per-read path: the state a read touches, and the two ``data_received`` methods.

This is the pure-Python build and the reference. ``_hot.c`` is its C build (the same names and
behaviour; where it is built, ``make wheelhouse``/``make accel``, Python imports the extension
module before this file). ``make test-compiled`` runs echo's tests against the C build.

``Core`` holds what every read touches; the protocols in ``protocol.py`` subclass it and take
``data_received`` from it. A framed read goes to ``FramedEcho._relayed`` unless the C build
could answer it at once (nothing pending, whole frames): both builds give the same result.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import TYPE_CHECKING

from wirekit_servicekit.metrics import Buckets, Cell

if TYPE_CHECKING:
    from .protocol import EchoContext

__all__ = ["Buckets", "Cell", "Core"]

BUILD = "pure"


class Core:
    """Core(ctx): the state of an echo connection that its reads touch."""

    __slots__ = ("activity", "ctx", "draining", "finished", "frame_started", "pending",
                 "transport")  # fmt: skip

    def __init__(self, ctx: EchoContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.activity = 0  # bytes received; the hub's sweeper watches it move
        self.frame_started = 0.0  # perf_counter() of the first byte of a frame in progress
        self.finished = False  # no more replies: our FIN is out, or the connection is ending
        self.draining = False
        self.pending = 0  # framed: bytes the decoder holds; -1 once it is broken (C build only)

    # The protocols implement these (protocol.py).
    def _late_input(self, n: int) -> None:
        raise NotImplementedError

    def _finish_if_answered(self) -> None:
        raise NotImplementedError

    def _relayed(self, data: bytes, start: float) -> None:
        raise NotImplementedError

    def raw_data_received(self, data: bytes) -> None:
        """RawEcho.data_received: every byte back as it arrives."""
        n = len(data)
        self.activity += n
        ctx = self.ctx
        ctx.received.n += n
        if self.finished:
            self._late_input(n)
            return
        self.transport.write(data)  # type: ignore[union-attr]
        ctx.sent.n += n
        if self.draining:
            self._finish_if_answered()

    def framed_data_received(self, data: bytes) -> None:
        """FramedEcho.data_received: the frames a read completes go back in one write."""
        start = perf_counter()
        n = len(data)
        self.activity += n
        self.ctx.received.n += n
        if self.finished:
            self._late_input(n)
            return
        self._relayed(data, start)
