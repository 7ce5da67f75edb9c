"""One cmdexec connection: AUTH first, then EXEC after EXEC, each streamed to its EXIT.

A reader task turns frames into messages on a bounded queue (so a client that floods STDIN is
slowed by TCP, not buffered); the connection loop takes EXECs from it, checks them against the
policy and the concurrency cap, and hands the queue to the runner while the command runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from wirekit_framing import (
    HEADER,
    MAX_WIRE_FRAME_SIZE,
    FrameTooLarge,
    FramingError,
    encode,
    read_frame,
)
from wirekit_servicekit import ConnectionHub, ConnectionMetrics

from . import runner
from .messages import BadMessage, ErrorCode, Exec, Exit, Kind, decode, encode_json
from .policy import Decision, Forbidden, Policy
from .runner import RunLimits

log = logging.getLogger(__name__)
audit = logging.getLogger("wirekit_cmdexec.audit")

RESULTS = ("ok", "nonzero", "signal", "timeout", "denied", "error")
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: Client messages queued while a command consumes them (STDIN back-pressure beyond this).
INBOX_SIZE = 16
_propagator = TraceContextTextMapPropagator()
_KIND_BYTE = {kind: bytes((kind,)) for kind in Kind}


class CmdexecMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "cmdexec"
        self.connections = ConnectionMetrics(ns, registry, [])
        self.runs = Counter(
            "runs", "Commands requested, by result.", ["result"], namespace=ns, registry=registry
        )
        self.duration = Histogram(
            "run_duration_seconds", "Wall time of commands that ran.",
            buckets=DURATION_BUCKETS, namespace=ns, registry=registry,
        )  # fmt: skip
        self.output = Counter(
            "output_bytes", "Command output sent to clients.", ["stream"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        self.auth_failures = Counter(
            "auth_failures", "Connections refused for a missing or wrong token.",
            namespace=ns, registry=registry,
        )  # fmt: skip
        self.active = Gauge("runs_active", "Commands running now.", namespace=ns, registry=registry)
        self.errors = Counter(
            "protocol_errors", "Connections closed for a protocol error, by code.", ["code"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        # Every series exists from the start, at 0: rate() and alerts see the first event.
        for result in RESULTS:
            self.runs.labels(result)
        for code in ("unauthorized", "bad_request", "too_large"):
            self.errors.labels(code)


@dataclass
class Service:
    """What every connection shares."""

    token_digest: bytes
    policy: Policy
    limits: RunLimits
    max_frame_size: int
    limit_exec_bytes: int
    limit_runs: int
    auth_failure_delay_s: float
    metrics: CmdexecMetrics
    tracer: trace.Tracer
    hub: ConnectionHub
    running: int = 0
    pids: set[int] = field(default_factory=set)  # main process of each command being run

    def __post_init__(self) -> None:
        # Children bound once: no label lookup per output chunk.
        self.output = {
            Kind.STDOUT: self.metrics.output.labels("stdout"),
            Kind.STDERR: self.metrics.output.labels("stderr"),
        }

    def token_ok(self, offered: str) -> bool:
        # Digests of equal length: the comparison time says nothing about the token.
        digest = hashlib.sha256(offered.encode()).digest()
        return hmac.compare_digest(digest, self.token_digest)


class ProtocolError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Connection:
    """Implements the hub's Connection protocol for one client."""

    def __init__(self, svc: Service, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.svc = svc
        self.reader = reader
        self.writer = writer
        self.activity = 0
        self.frame_started = 0.0
        self.running = False
        self.draining = False
        self.inbox: runner.Inbox = asyncio.Queue(INBOX_SIZE)
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    # -- hub callbacks ----------------------------------------------------------------------
    def begin_drain(self) -> None:
        self.draining = True
        if not self.running:
            self.writer.close()

    def close_now(self, reason: str) -> None:
        if reason == "idle_timeout" and self.running:
            return  # a running command has its own timeout
        self.writer.transport.abort()

    # -- wire -------------------------------------------------------------------------------
    async def send(self, kind: Kind, data: bytes) -> None:
        """STDOUT/STDERR: header+kind and the data in one writelines (no copy of the data)."""
        self.writer.writelines((HEADER.pack(len(data) + 1) + _KIND_BYTE[kind], data))
        self.svc.output[kind].inc(len(data))
        await self.writer.drain()

    async def send_json(self, kind: Kind, body: Exit | dict[str, str]) -> None:
        self.writer.write(encode(encode_json(kind, body), MAX_WIRE_FRAME_SIZE))
        await self.writer.drain()

    async def error(self, code: ErrorCode, message: str) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.send_json(Kind.ERROR, {"code": code.value, "message": message})

    async def _read_loop(self) -> None:
        """Frames -> messages on the inbox; None at end of stream. Errors become ProtocolError."""
        try:
            while (frame := await read_frame(self.reader, self.svc.max_frame_size)) is not None:
                self.activity += 1
                if frame[:1] == _KIND_BYTE[Kind.EXEC] and len(frame) > self.svc.limit_exec_bytes:
                    raise ProtocolError(ErrorCode.TOO_LARGE, "EXEC over limit_exec_bytes")
                await self.inbox.put(decode(frame))
        except FrameTooLarge as exc:
            await self.inbox.put((Kind.ERROR, ProtocolError(ErrorCode.TOO_LARGE, str(exc))))
        except BadMessage as exc:
            await self.inbox.put((Kind.ERROR, ProtocolError(ErrorCode.BAD_REQUEST, str(exc))))
        except ProtocolError as exc:
            await self.inbox.put((Kind.ERROR, exc))
        except (FramingError, ConnectionError, OSError):
            pass
        await self.inbox.put(None)

    async def _next(self) -> tuple[Kind, object] | None:
        item = await self.inbox.get()
        if item is not None and item[0] is Kind.ERROR:
            raise item[1]  # type: ignore[misc]
        return item

    # -- the conversation -------------------------------------------------------------------
    async def serve(self) -> None:
        reader_task = asyncio.ensure_future(self._read_loop())
        try:
            await self._conversation()
        except ProtocolError as exc:
            self.svc.metrics.errors.labels(exc.code.value).inc()
            await self.error(exc.code, str(exc))
        finally:
            reader_task.cancel()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _conversation(self) -> None:
        first = await self._next()
        if first is None:
            return
        kind, body = first
        if kind is not Kind.AUTH or not self.svc.token_ok(getattr(body, "token", "")):
            self.svc.metrics.auth_failures.inc()
            audit.warning("auth failed", extra={"peer": self.peer, "event": "auth_failed"})
            await asyncio.sleep(self.svc.auth_failure_delay_s)
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "missing or wrong token")
        while not self.draining:
            item = await self._next()
            if item is None:
                return
            kind, body = item
            if kind in (Kind.STDIN, Kind.STDIN_EOF, Kind.SIGNAL):
                continue  # the tail of a run that has ended: harmless, dropped
            if kind is not Kind.EXEC or not isinstance(body, Exec):
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"expected EXEC, got {kind.name}")
            await self._exec(body)

    async def _exec(self, req: Exec) -> None:
        svc = self.svc
        try:
            decision = svc.policy.decide(req)
        except Forbidden as exc:
            svc.metrics.runs.labels("denied").inc()
            audit.warning(
                "denied",
                extra={"peer": self.peer, "event": "denied", "reason": str(exc),
                       "arg_count": len(req.argv) - 1},
            )  # fmt: skip
            await self.error(ErrorCode.FORBIDDEN, str(exc))
            return
        if svc.running >= svc.limit_runs:
            svc.metrics.runs.labels("denied").inc()
            await self.error(ErrorCode.BUSY, f"{svc.limit_runs} commands are running; retry later")
            return
        svc.running += 1
        self.running = True
        svc.metrics.active.inc()
        try:
            await self._run(req, decision)
        finally:
            svc.running -= 1
            self.running = False
            svc.metrics.active.dec()

    async def _run(self, req: Exec, decision: Decision) -> None:
        svc = self.svc
        carrier = {k: v for k, v in (("traceparent", req.traceparent),
                                     ("tracestate", req.tracestate)) if v}  # fmt: skip
        timeout = min(req.timeout_s or svc.limits.timeout_s, svc.limits.timeout_s)
        with svc.tracer.start_as_current_span(
            "cmdexec.run",
            context=_propagator.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes={
                "process.executable.name": decision.name,
                "wirekit.cmdexec.arg_count": len(decision.args),
                "network.peer.address": self.peer.rsplit(":", 1)[0],
            },
        ) as span:
            try:
                out = await runner.run(
                    decision.path, decision.args, svc.limits, timeout_s=timeout,
                    want_stdin=req.stdin, send=self.send, inbox=self.inbox, active=svc.pids,
                )  # fmt: skip
            except OSError as exc:
                svc.metrics.runs.labels("error").inc()
                span.set_status(Status(StatusCode.ERROR, "spawn failed"))
                log.error("spawn failed", extra={"executable": decision.name, "error": str(exc)})
                await self.error(ErrorCode.INTERNAL, f"could not start {decision.name}")
                return
            result = out.result
            svc.metrics.runs.labels(result).inc()
            svc.metrics.duration.observe(out.duration_s)
            if out.code is not None:
                span.set_attribute("process.exit.code", out.code)
            if out.signal is not None:
                span.set_attribute("wirekit.cmdexec.signal", out.signal)
            span.set_attribute("wirekit.cmdexec.result", result)
            if result in ("signal", "timeout"):
                span.set_status(Status(StatusCode.ERROR, result))
            audit.info(
                "run",
                extra={
                    "event": "run", "peer": self.peer, "argv0": decision.name,
                    "arg_count": len(decision.args), "result": result, "exit_code": out.code,
                    "signal": out.signal, "timed_out": out.timed_out,
                    "duration_s": round(out.duration_s, 6), "stdout_bytes": out.sent["stdout"],
                    "stderr_bytes": out.sent["stderr"], "truncated": out.truncated,
                    "aborted": out.aborted,
                },
            )  # fmt: skip
            if out.aborted == "bad_request":
                raise ProtocolError(ErrorCode.BAD_REQUEST, "unexpected message during a run")
            if out.aborted is None:
                with contextlib.suppress(ConnectionError, OSError):
                    await self.send_json(
                        Kind.EXIT,
                        Exit(code=out.code, signal=out.signal, duration_s=round(out.duration_s, 6),
                             timed_out=out.timed_out, truncated=out.truncated),
                    )  # fmt: skip


async def handle(svc: Service, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The stream callback for one accepted connection."""
    conn = Connection(svc, reader, writer)
    if not svc.hub.admit(conn, writer.get_extra_info("peername")):
        writer.close()
        return
    try:
        await conn.serve()
    finally:
        svc.hub.release(conn)
