"""The echo protocols: one ``asyncio.Protocol`` per connection, raw or framed.

Path of the data: ``data_received(chunk)`` (``_hot.Core``: C where built, else Python) ->
(framed: a chunk of whole frames is its own reply; otherwise ``FrameDecoder.relay``, which
returns the bytes of the frames the chunk completed, exactly as received) -> one
``transport.write`` per chunk -> counters moved through label children bound once per
listener. Back-pressure: reading pauses while the transport's write buffer is over its
high-water mark. One span per connection; never one per message.

What a client can rely on (docs/protocol.md, "Shutdown and errors"): every frame (raw: every
byte) the server reads is answered, in order. A connection closed while something it sent is
left unanswered -- a frame in progress, bytes not yet read, replies the client is not reading,
data after the server's end of stream, an oversize frame -- is reset (RST) and counted by
kind; a FIN (end of stream) means everything received was answered.
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
    CloseReason,
    ConnectionHub,
    ConnectionLimits,
    ConnectionMetrics,
    HotCounter,
    HotHistogram,
    Peer,
    connection_span,
    reset,
    reset_when_delivered,
    unread_bytes,
)
from wirekit_servicekit.metrics import Cell

from . import _hot

log = logging.getLogger(__name__)

#: Error kinds counted in ``echo_errors_total{kind}`` (bounded label set).
ERROR_KINDS = (
    "frame_too_large", "incomplete_frame", "unanswered", "reset", *CloseReason,
)  # fmt: skip
#: Drain: a connection is half-closed once everything it sent has been answered and it has sent
#: nothing more for this long, so bytes already in flight from the client (sent before it could
#: see our end of stream) are read and answered instead of being reset. Well above loopback and
#: LAN round trips; the drain deadline (``timeout_drain_s``) bounds the whole.
DRAIN_QUIET_S = 0.2
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
            namespace=ns, registry=registry, cell=_hot.Cell,
        )  # fmt: skip
        self.sent = HotCounter(
            "sent_bytes", "Bytes queued back to clients.", ["mode"],
            namespace=ns, registry=registry, cell=_hot.Cell,
        )  # fmt: skip
        self.frames = HotCounter(
            "frames", "Frames echoed (framed mode).",
            namespace=ns, registry=registry, cell=_hot.Cell,
        )  # fmt: skip
        self.errors = Counter(
            "errors", "Connections ended by an error, by kind.", ["mode", "kind"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        self.handling = HotHistogram(
            "handling_seconds",
            "Framed mode: time from a read to its replies written, per read.",
            buckets=LATENCY_BUCKETS, namespace=ns, registry=registry,
            implementation=_hot.Buckets,
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
        limits: ConnectionLimits,
        max_frame_size: int,
    ) -> EchoContext:
        return cls(
            mode=mode,
            hub=ConnectionHub(limits, metrics.connections, mode),
            tracer=tracer,
            max_frame_size=max_frame_size,
            received=metrics.received.labels(mode),
            sent=metrics.sent.labels(mode),
            frames=metrics.frames.labels(),
            handling=metrics.handling,
            errors={kind: metrics.errors.labels(mode, kind) for kind in ERROR_KINDS},
        )


class _EchoConnection(_hot.Core, asyncio.Protocol):
    """One connection. ``_hot.Core`` holds what each read touches (ctx, transport, activity,
    frame_started, finished, draining, pending) and the ``data_received`` methods."""

    mode: ClassVar[str]
    # Slots: 10,000 idle connections should cost as little as possible.
    __slots__ = ("_error", "_quiet_check", "_started", "peer", "span")

    def __init__(self, ctx: EchoContext) -> None:
        super().__init__(ctx)
        self.peer: Peer | None = None  # the client (named by a PROXY header behind a proxy)
        self.span: trace.Span | None = None  # made when first needed, timed from _started
        self._started = 0
        self._quiet_check: asyncio.TimerHandle | None = None  # drain: pending quiet check
        self._error: str | None = None

    # -- asyncio callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.peer = self.ctx.hub.admit(self, transport.get_extra_info("peername"), transport)
        if self.peer is None:
            transport.close()
            return
        self._started = time_ns()

    def _span(self) -> trace.Span:
        """The connection's span, created on first use with the connection's start time."""
        if self.span is None:
            assert self.transport is not None
            assert self.peer is not None
            self.span = connection_span(
                self.ctx.tracer,
                f"echo.{self.mode} connection",
                self.peer,
                self.transport.get_extra_info("sockname"),
                {"wirekit.echo.mode": self.mode},
                start_time=self._started,
            )
        return self.span

    def connection_lost(self, exc: Exception | None) -> None:
        if self._quiet_check is not None:
            self._quiet_check.cancel()
        if exc is not None and self._error is None:
            self._fail("reset", str(exc))
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
            if self.draining:
                self._finish_if_answered()

    # -- hub callbacks ----------------------------------------------------------------------
    def begin_drain(self) -> None:
        self.draining = True
        self._finish_if_answered()

    def close_now(self, reason: CloseReason) -> None:
        transport = self.transport
        assert transport is not None
        if self._error is not None:  # already ending: a reset waits for replies to be delivered
            if reason is CloseReason.SHUTDOWN and not transport.is_closing():
                reset(transport)
            return
        if reason is CloseReason.SHUTDOWN and not self._unanswered():
            transport.close()  # drain deadline, everything answered: a normal end (FIN)
            return
        self._fail(reason, f"closed: {reason}")
        self._close(now=reason is CloseReason.SHUTDOWN)

    # -- helpers ----------------------------------------------------------------------------
    def _in_frame(self) -> int:
        """Bytes of a frame in progress (framed mode)."""
        return 0

    def _unanswered(self) -> bool:
        """Something the client sent, or a reply to it, has not reached the client's socket."""
        assert self.transport is not None
        return bool(
            self._in_frame()
            or self.transport.get_write_buffer_size()
            or unread_bytes(self.transport)
        )

    def _finish_if_answered(self) -> None:
        """Drain: once everything read is answered, nothing waits unread in the socket and the
        client has been quiet for ``DRAIN_QUIET_S``, half-close (FIN after the queued replies):
        the client reads every reply, then end of stream."""
        transport = self.transport
        assert transport is not None
        if self.finished or transport.is_closing() or self._quiet_check is not None:
            return
        if self._in_frame() or unread_bytes(transport):
            return  # more to read and answer first: called again after the next read
        self._quiet_check = asyncio.get_running_loop().call_later(
            DRAIN_QUIET_S, self._finish_if_still_quiet, self.activity
        )

    def _finish_if_still_quiet(self, activity: int) -> None:
        self._quiet_check = None
        transport = self.transport
        assert transport is not None
        if transport.is_closing():
            return
        if self.activity != activity or self._in_frame() or unread_bytes(transport):
            self._finish_if_answered()  # it spoke meanwhile: look again later
            return
        self.finished = True
        transport.write_eof()

    def _late_input(self, n: int) -> None:
        """Data that arrived after our FIN can never be answered: reset, counted (ignored when
        the connection is already ending)."""
        if self._error is None:
            self._fail("unanswered", f"{n} bytes arrived after the server's end of stream")
            self._close(lost=True)

    def _fail(self, kind: str, detail: str) -> None:
        """Count and log an error of this connection (its span ends with status ERROR)."""
        self._error = kind
        self.ctx.errors[kind].inc()
        if self._started:
            with trace.use_span(self._span(), end_on_exit=False):
                log.info("connection error", extra={"kind": kind, "detail": detail})

    def _close(self, *, lost: bool = False, now: bool = False) -> None:
        """Close: with a FIN when everything received has been answered, else with a RST
        (``lost``: the caller knows something received will never be answered), once the
        replies already written have reached the client (``now``: at once)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not (lost or self._unanswered()):
            transport.close()  # FIN once the queued replies are out
        elif now:
            reset(transport)
        else:
            self.finished = True
            reset_when_delivered(transport)


class RawEcho(_EchoConnection):
    """RFC 862: every byte received is sent back, as it arrives."""

    mode = "raw"
    __slots__ = ()
    data_received = _hot.Core.raw_data_received


class FramedEcho(_EchoConnection):
    """Each length-prefixed frame is returned as one frame; a read's replies go out in one write:
    the bytes of the frames the read completed, exactly as received (``FrameDecoder.relay``)."""

    mode = "framed"
    __slots__ = ("decoder",)

    def __init__(self, ctx: EchoContext) -> None:
        super().__init__(ctx)
        self.decoder = FrameDecoder(ctx.max_frame_size)

    data_received = _hot.Core.framed_data_received

    def _relayed(self, data: bytes, start: float) -> None:
        """A read, counted (``Core.framed_data_received``), that is not over: relay the frames
        it completes; ``start`` is its ``perf_counter()``. (The C build calls this only when
        it cannot answer the read at once.)"""
        decoder = self.decoder
        try:
            count, out = decoder.relay(data)
        except FrameTooLarge as exc:
            self.pending = -1  # broken: every later read comes here (and is late input)
            # Answer the frames before the bad header, then reset: the rest is never answered.
            if exc.frames:
                self._reply(len(exc.frames), encode_many(exc.frames, MAX_WIRE_FRAME_SIZE), start)
            self._fail("frame_too_large", str(exc))
            self._close(lost=True)
            return
        if count:
            # self._reply(count, out, start), inlined: the pure build's every read
            ctx = self.ctx
            self.transport.write(out)  # type: ignore[union-attr]
            ctx.sent.n += len(out)
            ctx.frames.n += count
            ctx.handling.observe(perf_counter() - start)
            if out is data:
                # whole frames, nothing buffered before or after (nothing pending, no
                # frame_started to reset): the pure build's common read
                if self.draining:
                    self._finish_if_answered()
                return
        self.pending = pending = decoder.buffered
        if pending:
            if count or not self.frame_started:
                self.frame_started = start  # a new frame began in this read
        elif self.frame_started:
            self.frame_started = 0.0
        if self.draining:
            self._finish_if_answered()

    def _reply(self, count: int, out: bytes | memoryview, start: float) -> None:
        ctx = self.ctx
        self.transport.write(out)  # type: ignore[union-attr]
        ctx.sent.n += len(out)
        ctx.frames.n += count
        ctx.handling.observe(perf_counter() - start)

    def eof_received(self) -> bool:
        if self.decoder.buffered:
            # The client ended its own stream inside a frame: it knows that frame is not
            # answered. Its earlier replies still go out, then our FIN.
            self._fail(
                "incomplete_frame",
                f"end of stream with {self.decoder.buffered} bytes of a frame buffered",
            )
        return False  # let asyncio close the transport once replies are flushed

    def _in_frame(self) -> int:
        return self.decoder.buffered
