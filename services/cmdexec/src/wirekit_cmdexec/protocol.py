"""One cmdexec connection: AUTH first (:mod:`.auth`), then EXEC after EXEC, each streamed to its
EXIT; what each message does in each state is the table in :mod:`.states`.

After AUTH, a reader task turns frames into messages on a bounded inbox (a client that floods
STDIN is slowed by TCP, not buffered); the conversation takes EXECs from it and hands the inbox
to the runner while a command runs. Every task has an owner that awaits it; every write that
waits for the client has a deadline (``timeout_write_s``); every error a client can cause is a
:class:`~.errors.CmdexecError`, answered with ERROR in one place (:meth:`Connection.refuse`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from wirekit_framing import (
    HEADER,
    MAX_WIRE_FRAME_SIZE,
    FrameDecoder,
    FrameTooLarge,
    IncompleteFrame,
    encode,
)
from wirekit_servicekit import CloseReason, Peer, reset

from . import runner
from .audit import exec_event
from .auth import Login
from .context import CmdexecContext
from .errors import (
    BadRequest,
    ClientGone,
    CmdexecError,
    Internal,
    ShuttingDown,
    TooLarge,
    Unauthorized,
)
from .identities import Identity
from .messages import BadMessage, Exec, Exit, Kind, decode_client, encode_json
from .policy import Decision
from .runner import END, End, Inbox, Outcome
from .states import Act, State, act

__all__ = ["Connection", "handler"]

log = logging.getLogger(__name__)

#: Client messages queued while a command consumes them (STDIN back-pressure beyond this).
INBOX_SIZE = 16
#: Read size of a connection's reader task.
READ_SIZE = 64 * 1024
_propagator = TraceContextTextMapPropagator()
_KIND_BYTE = {kind: bytes((kind,)) for kind in Kind}


class Connection:
    """One client. Implements the hub's Connection protocol (``activity``, ``frame_started``,
    ``begin_drain``, ``close_now``)."""

    def __init__(
        self, svc: CmdexecContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ):
        self.svc = svc
        self.reader = reader
        self.writer = writer
        self.activity = 0
        self.frame_started = 0.0
        self.running = False
        self.draining = False
        self.inbox = Inbox(INBOX_SIZE)
        #: Who it is from: set by admission (the client a PROXY header named, behind a proxy).
        self.client = Peer.direct(writer.get_extra_info("peername"))
        # Set by AUTH: who the client is, and by which credential (checked again at each EXEC,
        # so a reload that removes the credential ends what the connection may do).
        self.identity = ""
        self.credential = ""

    @property
    def state(self) -> State:
        if not self.identity:
            return State.AUTHENTICATING
        if self.running:
            return State.RUNNING
        return State.DRAINING if self.draining else State.IDLE

    # -- hub callbacks ----------------------------------------------------------------------
    def begin_drain(self) -> None:
        self.draining = True
        if not self.running:
            self.writer.close()  # idle: nothing in flight; a command in progress may finish

    def close_now(self, reason: CloseReason) -> None:
        if reason is CloseReason.IDLE_TIMEOUT and self.running:
            return  # a running command has its own timeout, and every write a deadline
        if reason is CloseReason.IDLE_TIMEOUT:
            self.writer.close()
        else:  # frame_timeout, shutdown: what the client sent is not all answered
            reset(self.writer.transport)  # type: ignore[arg-type]

    # -- wire -------------------------------------------------------------------------------
    async def _flush(self) -> None:
        """Wait for the client to take what was written, within ``timeout_write_s``."""
        try:
            async with asyncio.timeout(self.svc.timeout_write_s):  # a timer, no task
                await self.writer.drain()
        except (TimeoutError, ConnectionError, OSError) as exc:
            raise ClientGone(type(exc).__name__) from None

    async def send(self, kind: Kind, data: bytes) -> None:
        """STDOUT/STDERR: header+kind and the data in one writelines (no copy of the data)."""
        self.writer.writelines((HEADER.pack(len(data) + 1) + _KIND_BYTE[kind], data))
        self.svc.output[kind].inc(len(data))
        await self._flush()

    async def send_json(self, kind: Kind, body: Exit | dict[str, str]) -> None:
        self.writer.write(encode(encode_json(kind, body), MAX_WIRE_FRAME_SIZE))
        await self._flush()

    async def refuse(self, exc: CmdexecError) -> None:
        """The one place where errors become ERROR messages."""
        self.svc.metrics.errors.labels(exc.code.value).inc()
        with contextlib.suppress(ClientGone):
            await self.send_json(Kind.ERROR, {"code": exc.code.value, "message": str(exc)})

    # -- the conversation -------------------------------------------------------------------
    async def serve(self) -> None:
        """TLS when on, authenticate, then converse; close (FIN), or reset when the client
        stopped reading."""
        transport = self.writer.transport
        login = Login(self.svc, self.reader, self.writer, self.client)
        tls = self.svc.tls
        if tls is None:
            # Paused after a PROXY header for a TLS that is off (see Listener.tls_later).
            transport.resume_reading()  # type: ignore[attr-defined]
        elif not await login.tls(tls):
            return
        try:
            try:
                who = await login.authenticate()
            except CmdexecError as exc:
                await self.refuse(exc)
                return
            self.activity += 1
            if who is None:
                return
            identity, self.credential = who
            self.identity = identity.name
            reading = asyncio.ensure_future(self._read())
            try:
                await self._converse()
            finally:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
        except ClientGone:
            reset(transport)  # type: ignore[arg-type]
        finally:
            if not transport.is_closing():
                self.writer.close()

    async def _read(self) -> None:
        """Frames -> messages on the inbox, until the end of the stream or a protocol error
        (which ends the inbox with that error, after the messages before it)."""
        decoder = FrameDecoder(self.svc.max_frame_size)
        end = END
        try:
            while data := await self.reader.read(READ_SIZE):
                self.activity += len(data)
                failure: CmdexecError | None = None
                try:
                    frames = decoder.feed(data)
                except FrameTooLarge as exc:
                    frames, failure = exc.frames, TooLarge(str(exc))
                for frame in frames:
                    await self.inbox.put(self._message(frame))
                if failure is not None:
                    raise failure
                if decoder.buffered:
                    if not self.frame_started or frames:
                        self.frame_started = time.perf_counter()
                else:
                    self.frame_started = 0.0
            decoder.close()
        except CmdexecError as exc:
            end = End(exc)
        except (IncompleteFrame, ConnectionError, OSError):
            pass  # the client left (inside a frame, or abruptly): nothing more to answer
        finally:
            self.inbox.end(end)

    def _message(self, frame: bytes) -> tuple[Kind, object]:
        if frame[:1] == _KIND_BYTE[Kind.EXEC] and len(frame) > self.svc.limit_exec_bytes:
            raise TooLarge(f"EXEC of {len(frame)} bytes over limit_exec_bytes")
        try:
            return decode_client(frame)
        except BadMessage as exc:
            raise BadRequest(str(exc)) from None

    async def _converse(self) -> None:
        while True:
            if self.draining and not self.inbox:
                return  # shutting down, nothing asked: close
            item = await self.inbox.get()
            if isinstance(item, End):
                if isinstance(item.error, CmdexecError):
                    await self.refuse(item.error)
                return
            kind, body = item
            try:
                what = act(self.state, kind)
                if what is Act.DROP:
                    continue
                if what is Act.REFUSE:
                    raise BadRequest(f"{kind.name} after AUTH")
                if what is Act.SHUT:
                    raise ShuttingDown("the server is shutting down; retry elsewhere")
                assert isinstance(body, Exec)
                await self._exec(body)
            except CmdexecError as exc:
                await self.refuse(exc)
                if exc.closes:
                    return

    # -- one command ------------------------------------------------------------------------
    def _rules_now(self) -> Identity:
        """The connection's identity under the rules in force now (a reload since AUTH applies
        from the next EXEC on)."""
        identity = self.svc.identities.by_name.get(self.identity)
        if identity is None or self.credential not in identity.credentials:
            raise Unauthorized("this connection's credential is no longer valid (the "
                               "configuration was reloaded); connect again")  # fmt: skip
        identity.check_source(self.client.address)
        return identity

    async def _exec(self, req: Exec) -> None:
        svc = self.svc
        with contextlib.ExitStack() as slot:
            try:
                identity = self._rules_now()
                decision = identity.policy.decide(req)
                slot.enter_context(svc.run_slot(identity))
            except CmdexecError as exc:
                known = self.identity if self.identity in svc.identities.by_name else None
                svc.metrics.ran(known, "denied")
                exec_event(identity=self.identity, peer=self.client, argv=req.argv,
                           shell=req.shell, denied=str(exc))  # fmt: skip
                raise
            self.running = True
            try:
                await self._run(req, decision, identity)
            finally:
                self.running = False

    async def _run(self, req: Exec, decision: Decision, identity: Identity) -> None:
        svc = self.svc
        carrier = {k: v for k, v in (("traceparent", req.traceparent),
                                     ("tracestate", req.tracestate)) if v}  # fmt: skip
        limits = identity.limits
        if req.timeout_s is not None and req.timeout_s < limits.timeout_run_s:
            limits = dataclasses.replace(limits, timeout_run_s=req.timeout_s)
        with svc.tracer.start_as_current_span(
            "cmdexec.run",
            context=_propagator.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes={
                "process.executable.name": decision.name,
                "wirekit.cmdexec.arg_count": len(decision.args),
                "client.address": self.client.address,
                "network.peer.address": (self.client.proxy or (self.client.address,))[0],
                "wirekit.cmdexec.identity": identity.name,
            },
        ) as span:
            try:
                out = await runner.run(
                    decision.path, decision.args, limits, svc.spawner,
                    want_stdin=req.stdin, send=self.send, inbox=self.inbox,
                )  # fmt: skip
            except OSError as exc:
                svc.metrics.ran(identity.name, "error")
                span.set_status(Status(StatusCode.ERROR, "spawn failed"))
                log.error("spawn failed", extra={"executable": decision.name, "error": str(exc)})
                raise Internal(f"could not start {decision.name}") from None
            finally:
                svc.count_kills()
            self._record(out, identity, span)
            exec_event(identity=identity.name, peer=self.client, argv=req.argv,
                       shell=req.shell, outcome=out)  # fmt: skip
        if out.aborted == "bad_request":
            raise BadRequest("only STDIN, STDIN_EOF and SIGNAL may be sent while a command runs")
        if out.aborted == "stalled":
            raise ClientGone("stopped reading")
        if out.aborted is None:
            await self.send_json(
                Kind.EXIT,
                Exit(code=out.code, signal=out.signal, duration_s=round(out.duration_s, 6),
                     timed_out=out.timed_out, output_capped=out.output_capped,
                     truncated=out.truncated),
            )  # fmt: skip
        # "disconnect" / "error": the inbox's end tells the conversation what happened

    def _record(self, out: Outcome, identity: Identity, span: trace.Span) -> None:
        """The run's metrics and span attributes."""
        result = out.result
        self.svc.metrics.ran(identity.name, result)
        self.svc.metrics.duration.observe(out.duration_s)
        if out.code is not None:
            span.set_attribute("process.exit.code", out.code)
        if out.signal is not None:
            span.set_attribute("wirekit.cmdexec.signal", out.signal)
        span.set_attribute("wirekit.cmdexec.result", result)
        if result in ("signal", "timeout", "aborted"):
            span.set_status(Status(StatusCode.ERROR, out.aborted or result))


def handler(
    svc: CmdexecContext,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """The stream callback for accepted connections. It never raises: a bug is logged."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(svc, reader, writer)
        peer = svc.hub.admit(conn, writer.get_extra_info("peername"), writer.transport)
        if peer is None:
            writer.close()
            return
        conn.client = peer
        try:
            await conn.serve()
        except Exception:
            log.exception("connection failed", extra={"peer": str(conn.client)})
            writer.transport.abort()
        finally:
            svc.hub.release(conn)

    return handle
