"""The echo protocols: one ``asyncio.Protocol`` per connection, raw or framed.

Path of the data: ``data_received(chunk)`` -> (framed: ``FrameDecoder.feed``) -> one
``transport.write`` per chunk -> counters moved through label children bound once per
listener. Back-pressure: reading pauses while the transport's write buffer is over its
high-water mark. One span per connection; never one per message.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from time import perf_counter, time_ns
from typing import ClassVar, cast

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from prometheus_client import CollectorRegistry, Counter

from wirekit_framing import MAX_WIRE_FRAME_SIZE, FrameDecoder, FrameTooLarge, encode_many
from wirekit_servicekit import (
    ConnectionHub,
    ConnectionMetrics,
    HotCounter,
    HotHistogram,
    connection_span,
)
from wirekit_servicekit.metrics import Cell

log = logging.getLogger(__name__)

#: Error kinds counted in ``echo_errors_total{kind}`` (bounded label set).
ERROR_KINDS = ("frame_too_large", "incomplete_frame", "idle_timeout", "reset", "shutdown")
#: Sub-millisecond buckets: an echo is handled in microseconds when all is well.
LATENCY_BUCKETS = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3, 0.25, 1.0,
)  # fmt: skip


class EchoMetrics:
    """Every metric family of the echo service, on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "echo"
        self.connections = ConnectionMetrics(ns, registry, ["mode"])
        # Per-read metrics: lock-free cells read at scrape time (see HotCounter).
        self.received = HotCounter(
            "received_bytes", "Bytes received from clients.", ["mode"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        self.sent = HotCounter(
            "sent_bytes", "Bytes queued back to clients.", ["mode"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        self.frames = HotCounter(
            "frames", "Frames echoed (framed mode).", namespace=ns, registry=registry
        )
        self.errors = Counter(
            "errors", "Connections ended by an error, by kind.", ["mode", "kind"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        self.handling = HotHistogram(
            "handling_seconds",
            "Framed mode: time from a read to its replies written, per read.",
            buckets=LATENCY_BUCKETS, namespace=ns, registry=registry,
        )  # fmt: skip


@dataclass
class EchoContext:
    """What one listener's connections share: children bound once, the hub, the tracer."""

    mode: str
    hub: ConnectionHub
    tracer: trace.Tracer
    max_frame_size: int
    received: Cell
    sent: Cell
    frames: Cell
    handling: HotHistogram
    errors: dict[str, Counter]

    @classmethod
    def build(
        cls,
        mode: str,
        metrics: EchoMetrics,
        tracer: trace.Tracer,
        *,
        limit: int,
        idle_timeout: float,
        max_frame_size: int,
    ) -> EchoContext:
        conn = metrics.connections
        hub = ConnectionHub(
            limit=limit,
            idle_timeout=idle_timeout,
            opened=conn.opened.labels(mode),
            active=conn.active.labels(mode),
            rejected=conn.rejected.labels(mode, "limit"),
        )
        return cls(
            mode=mode,
            hub=hub,
            tracer=tracer,
            max_frame_size=max_frame_size,
            received=metrics.received.labels(mode),
            sent=metrics.sent.labels(mode),
            frames=metrics.frames.labels(),
            handling=metrics.handling,
            errors={kind: metrics.errors.labels(mode, kind) for kind in ERROR_KINDS},
        )


class _EchoConnection(asyncio.Protocol):
    mode: ClassVar[str]
    # Slots: 10,000 idle connections should cost as little as possible.
    __slots__ = ("_error", "_started", "activity", "ctx", "draining", "half_closed", "span",
                 "transport")  # fmt: skip

    def __init__(self, ctx: EchoContext) -> None:
        self.ctx = ctx
        self.activity = 0  # bytes received; the hub's idle sweeper watches it move
        self.transport: asyncio.Transport | None = None
        self.span: trace.Span | None = None  # made when first needed, timed from _started
        self._started = 0
        self.draining = False
        self.half_closed = False  # drain: our side sent EOF, nothing more can be written
        self._error: str | None = None

    # -- asyncio callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        if not self.ctx.hub.admit(self):
            transport.close()
            return
        self._started = time_ns()

    def _span(self) -> trace.Span:
        """The connection's span, created on first use with the connection's start time."""
        if self.span is None:
            assert self.transport is not None
            self.span = connection_span(
                self.ctx.tracer,
                f"echo.{self.mode} connection",
                self.transport.get_extra_info("peername"),
                self.transport.get_extra_info("sockname"),
                {"wirekit.echo.mode": self.mode},
                start_time=self._started,
            )
        return self.span

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self._error is None:
            self._fail("reset", str(exc), close=False)
        if not self._started:
            return  # refused at once: never admitted, no span
        self.ctx.hub.release(self)
        span = self._span()
        span.set_attribute("wirekit.received_bytes", self.activity)
        if self._error is not None:
            span.set_status(Status(StatusCode.ERROR, self._error))
        span.end()

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.activity += 1  # the peer is reading: not idle
        if not self.transport.is_closing():
            self.transport.resume_reading()

    # -- hub callbacks ----------------------------------------------------------------------
    def begin_drain(self) -> None:
        self.draining = True
        if self._idle():
            self._finish()

    def close_now(self, reason: str) -> None:
        self._fail(reason, f"closed: {reason}", close=True)

    # -- helpers ----------------------------------------------------------------------------
    def _idle(self) -> bool:
        return True

    def _finish(self) -> None:
        """Drain: flush what is queued, then half-close so the client sees every reply, then EOF."""
        assert self.transport is not None
        self.half_closed = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:  # pragma: no cover - TCP transports can always write EOF
            self.transport.close()

    def _fail(self, kind: str, detail: str, *, close: bool) -> None:
        self._error = kind
        self.ctx.errors[kind].inc()
        if self._started:
            with trace.use_span(self._span(), end_on_exit=False):
                log.info("connection error", extra={"kind": kind, "detail": detail})
        if close and self.transport is not None:
            if self.transport.get_write_buffer_size():
                self.transport.abort()  # the peer is not reading either: do not wait for it
            else:
                self.transport.close()


class RawEcho(_EchoConnection):
    """RFC 862: every byte received is sent back, as it arrives."""

    mode = "raw"
    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self.activity += n
        ctx = self.ctx
        ctx.received.n += n
        if self.half_closed:
            return  # draining: nothing more can be sent
        self.transport.write(data)  # type: ignore[union-attr]
        ctx.sent.n += n


class FramedEcho(_EchoConnection):
    """Each length-prefixed frame is returned as one frame; a read's replies go out in one write."""

    mode = "framed"
    __slots__ = ("decoder",)

    def __init__(self, ctx: EchoContext) -> None:
        super().__init__(ctx)
        self.decoder = FrameDecoder(ctx.max_frame_size)

    def data_received(self, data: bytes) -> None:
        start = perf_counter()
        n = len(data)
        self.activity += n
        ctx = self.ctx
        ctx.received.n += n
        decoder = self.decoder
        try:
            frames = decoder.feed(data)
        except FrameTooLarge as exc:
            self._fail("frame_too_large", str(exc), close=True)
            return
        if self.half_closed:
            return
        if frames:
            assert self.transport is not None
            # Whole frames only: the reply is those very bytes (no copy). Otherwise re-encode
            # (sizes were checked by the decoder already).
            out = data if decoder.exact else encode_many(frames, MAX_WIRE_FRAME_SIZE)
            self.transport.write(out)
            ctx.sent.n += len(out)
            ctx.frames.n += len(frames)
            ctx.handling.observe(perf_counter() - start)
        if self.draining and self._idle():
            self._finish()

    def eof_received(self) -> bool:
        if self.decoder.buffered:
            self._fail(
                "incomplete_frame",
                f"end of stream with {self.decoder.buffered} bytes of a frame buffered",
                close=False,
            )
        return False  # let asyncio close the transport once replies are flushed

    def _idle(self) -> bool:
        return self.decoder.buffered == 0
