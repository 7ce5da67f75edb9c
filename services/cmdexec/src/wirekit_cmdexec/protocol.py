"""One cmdexec connection: AUTH first, then EXEC after EXEC, each streamed to its EXIT.

Before AUTH nothing but one small frame is read, within ``timeout_auth_s``; anything else is
``unauthorized`` (after ``auth_failure_delay_s``, counted, rate limited per source address and
in all). After it, a reader task turns frames into messages on a bounded inbox (a client that
floods STDIN is slowed by TCP, not buffered); the conversation takes EXECs from it and hands
the inbox to the runner while a command runs. Every task has an owner that awaits it; every
write that waits for the client has a deadline (``timeout_write_s``); every error a client can
cause is a :class:`~.errors.CmdexecError`, answered with ERROR in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from wirekit_framing import (
    HEADER,
    HEADER_SIZE,
    MAX_WIRE_FRAME_SIZE,
    FrameDecoder,
    FrameTooLarge,
    IncompleteFrame,
    encode,
)
from wirekit_servicekit import CloseReason, ConnectionHub, ConnectionMetrics, HotCounter, reset
from wirekit_servicekit.lifecycle import source_key
from wirekit_servicekit.ratelimit import SourceLimiter, TokenBucket

from . import runner
from .containment import containment
from .errors import (
    AuthTimeout,
    BadRequest,
    Busy,
    ClientGone,
    CmdexecError,
    Forbidden,
    Internal,
    ShuttingDown,
    TooLarge,
    Unauthorized,
)
from .identities import Identities, Identity, certificate_names, hash_token, weak_token_problem
from .messages import BadMessage, Exec, Exit, Kind, decode_client, encode_json
from .policy import Decision
from .runner import END, End, Inbox, Spawner

log = logging.getLogger(__name__)
audit = logging.getLogger("wirekit_cmdexec.audit")

RESULTS = ("ok", "nonzero", "signal", "timeout", "output_cap", "aborted", "denied", "error")
AUTH_FAILURES = ("token", "protocol", "timeout", "rate_limited", "source", "tls", "weak_token")
#: Token hashes judged at login (strong or not), at most this many remembered.
_JUDGED_TOKENS = 1024
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: Client messages queued while a command consumes them (STDIN back-pressure beyond this).
INBOX_SIZE = 16
#: Read size of a connection's reader task.
READ_SIZE = 64 * 1024
_propagator = TraceContextTextMapPropagator()
_KIND_BYTE = {kind: bytes((kind,)) for kind in Kind}


class CmdexecMetrics:
    def __init__(self, registry: CollectorRegistry, guard: AuthGuard) -> None:
        ns = "cmdexec"
        Gauge(
            "auth_under_attack", "1 while failed logins from all sources together are over "
            "auth_failure_burst (failures answered after auth_failure_delay_attack_s).",
            namespace=ns, registry=registry,
        ).set_function(guard.attacked_now)  # fmt: skip
        Gauge(
            "auth_sources", "Source addresses (IPv6: /64s) with failed logins remembered.",
            namespace=ns, registry=registry,
        ).set_function(lambda: len(guard.per_source))  # fmt: skip
        Gauge(
            "auth_limited_sources", "Sources refused at their last attempt because they had "
            "spent their budget of failed logins (rate_limited).",
            namespace=ns, registry=registry,
        ).set_function(lambda: guard.per_source.limited)  # fmt: skip
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
            "auth_failures", "Connections refused before AUTH succeeded, by reason.", ["reason"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        self.active = Gauge("runs_active", "Commands running now.", namespace=ns, registry=registry)
        self.errors = Counter(
            "protocol_errors", "ERROR messages sent, by code.", ["code"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        self.identity_runs = Counter(
            "identity_runs", "Commands requested, by identity (from the configuration) and "
            "result.", ["identity", "result"], namespace=ns, registry=registry,
        )  # fmt: skip
        self.identity_logins = Counter(
            "identity_logins", "Successful AUTHs, by identity.", ["identity"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        self.reloads = Counter(
            "config_reloads", "Configuration reloads (SIGHUP), by result.", ["result"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        self.config = Info(
            "config", "The configuration in force: SHA-256 of the policy file (or of the "
            "token's hash without one) and of the TLS files.", namespace=ns, registry=registry,
        )  # fmt: skip
        self.killed = HotCounter(
            "processes_killed", "Processes killed because they outlived their run or left it "
            "(background children, setsid daemons).", namespace=ns, registry=registry,
        ).labels()  # fmt: skip
        # Every series exists from the start, at 0: rate() and alerts see the first event.
        for result in RESULTS:
            self.runs.labels(result)
        for reason in AUTH_FAILURES:
            self.auth_failures.labels(reason)
        for code in ("unauthorized", "bad_request", "too_large", "forbidden", "busy"):
            self.errors.labels(code)
        for result in ("ok", "error"):
            self.reloads.labels(result)

    def known(self, identities: Identities, tls_sha256: str) -> None:
        """Series for every configured identity, at 0; the info metric for this config."""
        for name in identities.by_name:
            self.identity_logins.labels(name)
            for result in RESULTS:
                self.identity_runs.labels(name, result)
        self.config.info({"policy_sha256": identities.sha256, "tls_sha256": tls_sha256})


@dataclass
class AuthGuard:
    """Failed logins. The rule (the README's security model states it for operators):

    - Each source -- an IPv4 address, an IPv6 /64 -- may fail ``auth_failure_burst_per_source``
      times, then regains ``auth_failure_rate_per_source`` failures per second. A source that has
      spent its budget is refused without its token being looked at (``rate_limited``), and
      told so, with its address and when to retry.
    - All sources together have a budget as well, but it refuses nobody: once it is spent the
      service is *under attack* -- a WARNING is logged, ``cmdexec_auth_under_attack`` is 1 and
      every failed login is answered after ``delay_attack_s`` instead of ``delay_s`` -- until
      it has regained its whole burst. A source within its own budget is never refused because
      of other sources' failures (many addresses must not lock every user out); what makes
      guessing from any number of addresses hopeless is the token's strength
      (:func:`~.identities.token_bits`).
    - The table of sources is bounded (``limit_auth_sources``): the least recently failed
      source is forgotten first, so a spray from many addresses costs bounded memory; a source
      forgotten starts afresh (OpenSSH's ``PerSourcePenalties`` calls this overflow policy
      permissive, its default).
    """

    per_source: SourceLimiter
    overall: TokenBucket
    delay_s: float
    delay_attack_s: float
    under_attack: bool = False

    def refusal(self, source: str) -> str | None:
        """Why ``source`` may not try a token now, or None when it may."""
        now = time.monotonic()
        if self.per_source.ready(source, now):
            return None
        self.per_source.allow(source, now)  # takes nothing: marks the source limited (gauge)
        wait = math.ceil(self.per_source.wait_s(source, now))
        return f"too many failed logins from {source or 'this address'}; retry in {wait} s"

    def failed(self, source: str) -> float:
        """Count a failed login of ``source``; return how long to wait before answering it."""
        now = time.monotonic()
        self.per_source.allow(source, now)
        if self.overall.level(now) >= self.overall.burst:
            self.under_attack = False  # the whole burst regained: the attack is over
        if not self.overall.take(now) and not self.under_attack:
            self.under_attack = True
            log.warning(
                "login attack: failed logins from all sources are over auth_failure_burst; "
                "failures are answered after auth_failure_delay_attack_s, sources within "
                "their own budget still get in",
                extra={"sources": len(self.per_source), "delay_s": self.delay_attack_s},
            )  # fmt: skip
        return self.delay_attack_s if self.under_attack else self.delay_s

    def attacked_now(self) -> bool:
        """The gauge: under attack and not yet recovered (read at scrape time)."""
        if self.under_attack and self.overall.level(time.monotonic()) >= self.overall.burst:
            return False
        return self.under_attack


@dataclass
class CmdexecContext:
    """What every connection shares. ``identities`` and ``tls`` are replaced as a whole by a
    reload: a connection reads them when it authenticates and at each EXEC."""

    identities: Identities
    tls: ssl.SSLContext | None
    spawner: Spawner
    guard: AuthGuard
    max_frame_size: int
    limit_auth_bytes: int
    limit_exec_bytes: int
    limit_runs: int
    timeout_auth_s: float
    timeout_write_s: float
    allow_weak_tokens: bool
    metrics: CmdexecMetrics
    tracer: trace.Tracer
    hub: ConnectionHub
    running: int = 0
    running_by_identity: dict[str, int] = field(default_factory=dict)
    #: Token hash -> why the token is too weak ("" when strong): judged once per token.
    weak: dict[str, str] = field(default_factory=dict)
    output: dict[Kind, Counter] = field(init=False)
    _killed_before: int = field(init=False)

    def __post_init__(self) -> None:
        # Children bound once: no label lookup per output chunk.
        self.output = {
            Kind.STDOUT: self.metrics.output.labels("stdout"),
            Kind.STDERR: self.metrics.output.labels("stderr"),
        }
        self._killed_before = containment().killed  # the process may have served before

    def weak_token(self, token: str, credential: str) -> str:
        """Why a token that matched an identity may not be used ("" when it may): tokens in a
        policy file are hashes, so their strength is judged at their first login."""
        if self.allow_weak_tokens:
            return ""
        problem = self.weak.get(credential)
        if problem is None:
            if len(self.weak) >= _JUDGED_TOKENS:
                self.weak.clear()
            problem = self.weak[credential] = weak_token_problem(token) or ""
        return problem

    def count_kills(self) -> None:
        """cmdexec_processes_killed_total: the sweeps' kills since this service started."""
        self.metrics.killed.n = containment().killed - self._killed_before


class Connection:
    """Implements the hub's Connection protocol for one client."""

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
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        self.source = source_key(peer)
        # Set by AUTH: who the client is, and by which credential (checked again at each EXEC,
        # so a reload that removes the credential ends what the connection may do).
        self.identity = ""
        self.credential = ""

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

    async def start_tls(self, context: ssl.SSLContext) -> bool:
        """The TLS handshake, with the context in force now (a reload replaces it for the
        connections that follow), within ``timeout_auth_s``. False: the connection is over."""
        svc = self.svc
        reason, detail = None, ""
        try:
            async with asyncio.timeout(svc.timeout_auth_s):
                await self.writer.start_tls(context)
            return True
        except TimeoutError:
            reason = "timeout"
        except ssl.SSLError as exc:
            reason, detail = "tls", exc.reason or type(exc).__name__
        except (ConnectionError, OSError):
            pass  # connected and left: nothing was tried
        if reason is not None:
            svc.metrics.auth_failures.labels(reason).inc()
            if reason == "timeout":
                detail = "TLS handshake timed out"
            audit.warning("auth", extra={
                "event": "auth", "identity": None, "source": self.peer, "method": "certificate",
                "decision": "denied", "reason": detail})  # fmt: skip
        self.writer.transport.abort()
        return False

    # -- the conversation -------------------------------------------------------------------
    async def serve(self) -> None:
        """Authenticate, then converse; close (FIN), or reset when the client stopped reading."""
        transport = self.writer.transport
        try:
            try:
                if not await self._authenticate():
                    return
            except CmdexecError as exc:
                await self.refuse(exc)
                return
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

    async def _authenticate(self) -> bool:
        """Read one AUTH frame and check its token. False when the client left before AUTH."""
        svc = self.svc
        try:
            frame = await asyncio.wait_for(self._read_auth_frame(), svc.timeout_auth_s)
        except TimeoutError:
            svc.metrics.auth_failures.labels("timeout").inc()
            raise AuthTimeout(f"no AUTH within {svc.timeout_auth_s:g} s") from None
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return False  # connected and left (a port probe, a reset): nothing was tried
        except FrameTooLarge as exc:
            await self._auth_failed("protocol")
            raise Unauthorized(f"AUTH frame over limit_auth_bytes ({exc.size} bytes)") from None
        self.activity += 1
        refusal = svc.guard.refusal(self.source)
        if refusal is not None:  # the frame is read, its token not looked at
            await self._auth_failed("rate_limited", refusal)
            raise Unauthorized(refusal)
        try:
            kind, body = decode_client(frame)
        except BadMessage as exc:
            await self._auth_failed("protocol")
            raise Unauthorized(f"AUTH expected: {exc}") from None
        if kind is not Kind.AUTH:
            await self._auth_failed("protocol")
            raise Unauthorized(f"AUTH expected, got {kind.name}")
        identity, method, credential, problem = self._identify(body.token)
        if identity is None:
            raise Unauthorized(await self._auth_failed("token", problem))
        if method == "token" and (weak := svc.weak_token(body.token, credential)):
            weak += "; the operator must replace it (this server refuses weak tokens)"
            raise Unauthorized(await self._auth_failed("weak_token", weak, identity.name))
        try:
            identity.check_source(self.address)
        except Forbidden as exc:
            await self._auth_failed("source", str(exc), identity.name)
            raise Unauthorized(str(exc)) from None
        self.identity, self.credential = identity.name, credential
        svc.metrics.identity_logins.labels(identity.name).inc()
        audit.info("auth", extra={"event": "auth", "identity": identity.name,
                                  "source": self.peer, "method": method,
                                  "decision": "allowed", "reason": None})  # fmt: skip
        return True

    def _identify(self, token: str) -> tuple[Identity | None, str, str, str]:
        """(identity, method, credential, why not): by token, by the verified client
        certificate (mTLS), or both when they agree."""
        identities = self.svc.identities
        ssl_object = self.writer.get_extra_info("ssl_object")
        names = certificate_names(ssl_object.getpeercert()) if ssl_object is not None else []
        by_cert = identities.by_certificate(names)
        if len(by_cert) > 1:
            return None, "", "", "the client certificate names more than one identity"
        if token:
            by_token = identities.by_token(token)
            if by_token is None:
                return None, "", "", "wrong token"
            if by_cert and by_cert[0] is not by_token:
                return None, "", "", "the token and the certificate are different identities"
            return by_token, "token", hash_token(token), ""
        if by_cert:
            cert_name = next(n for n in names if n in by_cert[0].credentials)
            return by_cert[0], "certificate", cert_name, ""
        return None, "", "", "wrong token" if not names else "no identity for this certificate"

    async def _read_auth_frame(self) -> bytes:
        (size,) = HEADER.unpack(await self.reader.readexactly(HEADER_SIZE))
        if size > self.svc.limit_auth_bytes:
            raise FrameTooLarge(size, self.svc.limit_auth_bytes)
        return await self.reader.readexactly(size)

    async def _auth_failed(
        self, reason: str, detail: str | None = None, identity: str | None = None
    ) -> str:
        """Count, audit and answer (after the guard's delay) a failed AUTH; return the reason
        to give the client (under attack, it says why the answer was slow)."""
        svc = self.svc
        guard = svc.guard
        svc.metrics.auth_failures.labels(reason).inc()
        detail = detail or reason
        delay = guard.delay_s if reason == "rate_limited" else guard.failed(self.source)
        if guard.under_attack and reason != "rate_limited":
            detail += (f" (the service is under a login attack: failed logins are answered "
                       f"after {delay:g} s)")  # fmt: skip
        audit.warning("auth", extra={"event": "auth", "identity": identity, "source": self.peer,
                                     "method": None, "decision": "denied",
                                     "reason": detail})  # fmt: skip
        await asyncio.sleep(delay)
        return detail

    async def _read(self) -> None:
        """Frames -> messages on the inbox, until the end of the stream or a protocol error
        (which ends the inbox with that error, after the messages before it)."""
        svc = self.svc
        decoder = FrameDecoder(svc.max_frame_size)
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
                if kind in (Kind.STDIN, Kind.STDIN_EOF, Kind.SIGNAL):
                    continue  # the tail of a run that has ended: harmless, dropped
                if kind is not Kind.EXEC:
                    raise BadRequest(f"{kind.name} after AUTH")
                if self.draining:
                    raise ShuttingDown("the server is shutting down; retry elsewhere")
                assert isinstance(body, Exec)
                await self._exec(body)
            except CmdexecError as exc:
                await self.refuse(exc)
                if exc.closes:
                    return

    def _denied(self, req: Exec, exc: CmdexecError) -> None:
        self.svc.metrics.runs.labels("denied").inc()
        if self.identity in self.svc.identities.by_name:
            self.svc.metrics.identity_runs.labels(self.identity, "denied").inc()
        audit.warning("exec", extra={
            "event": "exec", "identity": self.identity, "source": self.peer,
            "argv": req.argv, "shell": req.shell, "decision": "denied", "reason": str(exc),
            "result": "denied", "exit_code": None, "signal": None, "duration_s": None,
            "bytes_out": 0})  # fmt: skip

    async def _exec(self, req: Exec) -> None:
        svc = self.svc
        # The rules in force now: a reload since AUTH applies from the next EXEC on.
        identity = svc.identities.by_name.get(self.identity)
        try:
            if identity is None or self.credential not in identity.credentials:
                raise Unauthorized("this connection's credential is no longer valid (the "
                                   "configuration was reloaded); connect again")  # fmt: skip
            identity.check_source(self.address)
            decision = identity.policy.decide(req)
            if svc.running >= svc.limit_runs:
                raise Busy(f"{svc.limit_runs} commands are running; retry later")
            if svc.running_by_identity.get(identity.name, 0) >= identity.limit_runs:
                raise Busy(f"{identity.limit_runs} commands of {identity.name!r} are running; "
                           "retry later")  # fmt: skip
        except CmdexecError as exc:
            self._denied(req, exc)
            raise
        svc.running += 1
        svc.running_by_identity[identity.name] = svc.running_by_identity.get(identity.name, 0) + 1
        self.running = True
        svc.metrics.active.inc()
        try:
            await self._run(req, decision, identity)
        finally:
            svc.running -= 1
            svc.running_by_identity[identity.name] -= 1
            self.running = False
            svc.metrics.active.dec()

    async def _run(self, req: Exec, decision: Decision, identity: Identity) -> None:
        svc = self.svc
        carrier = {k: v for k, v in (("traceparent", req.traceparent),
                                     ("tracestate", req.tracestate)) if v}  # fmt: skip
        limits = identity.limits
        timeout = min(req.timeout_s or limits.timeout_s, limits.timeout_s)
        with svc.tracer.start_as_current_span(
            "cmdexec.run",
            context=_propagator.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes={
                "process.executable.name": decision.name,
                "wirekit.cmdexec.arg_count": len(decision.args),
                "network.peer.address": self.address,
                "wirekit.cmdexec.identity": identity.name,
            },
        ) as span:
            try:
                out = await runner.run(
                    decision.path, decision.args, limits, svc.spawner, timeout_s=timeout,
                    want_stdin=req.stdin, send=self.send, inbox=self.inbox,
                )  # fmt: skip
            except OSError as exc:
                svc.metrics.runs.labels("error").inc()
                svc.metrics.identity_runs.labels(identity.name, "error").inc()
                span.set_status(Status(StatusCode.ERROR, "spawn failed"))
                log.error("spawn failed", extra={"executable": decision.name, "error": str(exc)})
                raise Internal(f"could not start {decision.name}") from None
            finally:
                svc.count_kills()
            result = out.result
            svc.metrics.runs.labels(result).inc()
            svc.metrics.identity_runs.labels(identity.name, result).inc()
            svc.metrics.duration.observe(out.duration_s)
            if out.code is not None:
                span.set_attribute("process.exit.code", out.code)
            if out.signal is not None:
                span.set_attribute("wirekit.cmdexec.signal", out.signal)
            span.set_attribute("wirekit.cmdexec.result", result)
            if result in ("signal", "timeout", "aborted"):
                span.set_status(Status(StatusCode.ERROR, out.aborted or result))
            audit.info("exec", extra={
                "event": "exec", "identity": identity.name, "source": self.peer,
                "argv": req.argv, "shell": req.shell, "decision": "allowed", "reason": None,
                "result": result, "exit_code": out.code, "signal": out.signal,
                "duration_s": round(out.duration_s, 6),
                "bytes_out": out.sent["stdout"] + out.sent["stderr"],
                "timed_out": out.timed_out, "output_capped": out.output_capped,
                "aborted": out.aborted})  # fmt: skip
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


def handler(
    svc: CmdexecContext,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """The stream callback for accepted connections. It never raises: a bug is logged."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(svc, reader, writer)
        if not svc.hub.admit(conn, writer.get_extra_info("peername")):
            writer.close()
            return
        try:
            if svc.tls is not None and not await conn.start_tls(svc.tls):
                return
            await conn.serve()
        except Exception:
            log.exception("connection failed", extra={"peer": conn.peer})
            writer.transport.abort()
        finally:
            svc.hub.release(conn)

    return handle
