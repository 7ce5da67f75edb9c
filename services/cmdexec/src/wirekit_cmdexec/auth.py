"""Authentication: the failed-login limiter, and one connection's way in (the TLS handshake when
TLS is on, then one AUTH frame and its credential).

Before AUTH nothing but one small frame is read, within ``timeout_auth_s``; anything else is
``unauthorized`` (after ``auth_failure_delay_s``, counted, limited per source address). Every
attempt is an audit event.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wirekit_framing import FrameTooLarge, IncompleteFrame, read_frame
from wirekit_servicekit import Peer
from wirekit_servicekit.ratelimit import SourceLimiter, TokenBucket

from .audit import auth_event
from .errors import AuthTimeout, Forbidden, Unauthorized
from .identities import Identity, certificate_names
from .messages import BadMessage, decode_client
from .states import Act, State, act
from .tokens import hash_token

if TYPE_CHECKING:
    from .context import CmdexecContext

__all__ = ["AuthGuard", "Login"]

log = logging.getLogger(__name__)


@dataclass
class AuthGuard:
    """Failed logins. The rule (docs/cmdexec.md states it for operators):

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
      (:func:`~.tokens.token_bits`).
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


class Login:
    """One connection's way in."""

    def __init__(
        self,
        svc: CmdexecContext,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: Peer,
    ) -> None:
        self.svc = svc
        self.reader = reader
        self.writer = writer
        self.client = client

    async def tls(self, context: ssl.SSLContext) -> bool:
        """The TLS handshake, with the context in force now (a reload replaces it for the
        connections that follow), within ``timeout_auth_s``. False: the connection is over."""
        reason, detail = None, ""
        try:
            async with asyncio.timeout(self.svc.timeout_auth_s):
                await self.writer.start_tls(context)
            return True
        except TimeoutError:
            reason, detail = "timeout", "TLS handshake timed out"
        except ssl.SSLError as exc:
            reason, detail = "tls", exc.reason or type(exc).__name__
        except (ConnectionError, OSError):
            pass  # connected and left: nothing was tried
        if reason is not None:
            self.svc.metrics.auth_failures.labels(reason).inc()
            auth_event(identity=None, peer=self.client, method="certificate", denied=detail)
        self.writer.transport.abort()
        return False

    async def authenticate(self) -> tuple[Identity, str] | None:
        """Read one AUTH frame and check its credential: the identity and the credential, or
        None when the client left before AUTH. Refusals raise (unauthorized, timeout)."""
        svc = self.svc
        try:
            async with asyncio.timeout(svc.timeout_auth_s):
                frame = await read_frame(self.reader, svc.limit_auth_bytes)
        except TimeoutError:
            svc.metrics.auth_failures.labels("timeout").inc()
            raise AuthTimeout(f"no AUTH within {svc.timeout_auth_s:g} s") from None
        except (IncompleteFrame, ConnectionError, OSError):
            return None  # connected and left (a port probe, a reset): nothing was tried
        except FrameTooLarge as exc:
            await self._failed("protocol")
            raise Unauthorized(f"AUTH frame over limit_auth_bytes ({exc.size} bytes)") from None
        if frame is None:
            return None
        refusal = svc.guard.refusal(self.client.source)
        if refusal is not None:  # the frame is read, its token not looked at
            await self._failed("rate_limited")  # the audit's reason: rate_limited
            raise Unauthorized(refusal)
        try:
            kind, body = decode_client(frame)
        except BadMessage as exc:
            await self._failed("protocol")
            raise Unauthorized(f"AUTH expected: {exc}") from None
        if act(State.AUTHENTICATING, kind) is not Act.HANDLE:
            await self._failed("protocol")
            raise Unauthorized(f"AUTH expected, got {kind.name}")
        identity, method, credential, problem = self._identify(body.token)
        if identity is None:
            raise Unauthorized(await self._failed("token", problem))
        if method == "token" and (weak := svc.weak_token(body.token, credential)):
            weak += "; the operator must replace it (this server refuses weak tokens)"
            raise Unauthorized(await self._failed("weak_token", weak, identity.name))
        try:
            identity.check_source(self.client.address)
        except Forbidden as exc:
            await self._failed("source", str(exc), identity.name)
            raise Unauthorized(str(exc)) from None
        svc.metrics.identity_logins.labels(identity.name).inc()
        auth_event(identity=identity.name, peer=self.client, method=method, denied=None)
        return identity, credential

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

    async def _failed(
        self, reason: str, detail: str | None = None, identity: str | None = None
    ) -> str:
        """Count, audit and answer (after the guard's delay) a failed AUTH; return the reason
        to give the client (under attack, it says why the answer was slow)."""
        svc = self.svc
        guard = svc.guard
        svc.metrics.auth_failures.labels(reason).inc()
        detail = detail or reason
        delay = guard.delay_s if reason == "rate_limited" else guard.failed(self.client.source)
        attacked = guard.under_attack and reason != "rate_limited"
        auth_event(identity=identity, peer=self.client, method=None, denied=detail,
                   under_attack=attacked)  # fmt: skip
        await asyncio.sleep(delay)
        if attacked:  # the client is told why the answer was slow; the audit keeps the reason
            return (f"{detail} (the service is under a login attack: failed logins are answered "
                    f"after {delay:g} s)")  # fmt: skip
        return detail
