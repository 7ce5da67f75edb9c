"""Who a connection is from (:class:`Peer`), and the PROXY protocol gate in front of a TCP
listener that reads it from a trusted load balancer's header (:class:`ProxyGate`).

Behind HAProxy, nginx ``stream``, Envoy or a cloud load balancer every connection comes from
the proxy's address. With ``proxy_protocol`` on, the proxy sends a header naming the client
first (HAProxy's ``proxy-protocol.txt``; parsed by :class:`wirekit_framing.ProxyHeaderParser`),
and the client's address is then *the* address: per-source limits, cmdexec's login limiter
and identities' ``sources``, the audit trail, logs and spans all use it; the proxy's stays as
``proxy`` / ``network.peer.address``.

The gate, per connection, before the service's own protocol exists:

- the peer must be in ``proxy_trusted`` (else: closed at once, ``untrusted``): a header from
  anyone else would let them choose their address;
- the header must come first, complete, within ``timeout_proxy_header_s`` (else: closed,
  ``timeout``), and be one the parser accepts (``signature`` -- no header at all, ``version``,
  ``too_long``, ``malformed``; ``incomplete``/``empty`` when the peer leaves first); at most the
  header's own bytes are buffered;
- a v2 ``LOCAL`` header is the proxy's own health check, and so is a v1 header naming the
  connection's own ends (HAProxy's v1 checks, v1 having no LOCAL): it is answered by closing
  the connection, counted as ``local``, never as a client (no connection, span or login);
- otherwise the connection is handed to the service's protocol with the client's address.

Every outcome is counted in ``<service>_proxy_headers_total{result}``; refusals are logged at
most once a second per result, with the peer and how many more there were.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Counter

from wirekit_framing import ProxyHeaderError, ProxyHeaderParser

__all__ = ["PROXY_OFF", "PROXY_RESULTS", "Peer", "ProxyGate", "ProxyPolicy", "normalise"]

log = logging.getLogger(__name__)

#: The ``result`` label of ``<service>_proxy_headers_total``.
PROXY_RESULTS = (
    "accepted", "local", "untrusted", "signature", "version", "too_long", "malformed",
    "incomplete", "empty", "timeout", "limit",
)  # fmt: skip
#: A refusal of one kind is logged at most this often (with the count since the last line).
_LOG_INTERVAL_S = 1.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalise(address: str) -> str:
    """An address as every decision and record shows it: IPv4-mapped IPv6 as IPv4, no zone."""
    if ":" not in address:
        return address  # IPv4 (the kernel's and the header parser's are canonical already)
    host = address.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass(frozen=True)
class Peer:
    """Who a connection is from: the client's ``address`` and ``port`` (normalised), and the
    proxy that carried it when a PROXY header named the client."""

    address: str
    port: int
    proxy: tuple[str, int] | None = None

    @classmethod
    def direct(cls, peername: object) -> Peer:
        """The socket's own peer (no proxy)."""
        if isinstance(peername, tuple) and len(peername) >= 2:
            return cls(normalise(str(peername[0])), int(peername[1]))
        return cls(str(peername or ""), 0)

    @property
    def source(self) -> str:
        """What per-source limits count: the IPv4 address, or the /64 of an IPv6 one (one host
        usually holds a whole /64)."""
        if ":" not in self.address:
            return self.address
        try:
            net = ipaddress.IPv6Network((self.address, 64), strict=False)
        except ValueError:
            return self.address
        return str(net)

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class ProxyPolicy:
    """A listener's PROXY protocol settings: the versions accepted (none: off), the networks
    of trusted proxies, the header's deadline."""

    versions: frozenset[int] = frozenset()
    trusted: tuple[Network, ...] = ()
    timeout_s: float = 3.0

    @property
    def on(self) -> bool:
        return bool(self.versions)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(normalise(address))
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    @classmethod
    def from_setting(cls, mode: str, trusted: Iterable[Network], timeout_s: float) -> ProxyPolicy:
        versions = {"off": (), "v1": (1,), "v2": (2,), "any": (1, 2)}[mode]
        return cls(frozenset(versions), tuple(trusted), timeout_s)


#: A listener without the PROXY protocol.
PROXY_OFF = ProxyPolicy()


class _Hub(Protocol):
    """What the gate needs of the listener's hub."""

    def hold(self) -> bool: ...
    def unhold(self) -> None: ...
    def expect(self, transport: asyncio.BaseTransport, peer: Peer) -> None: ...


@dataclass
class _Throttle:
    """One log line per result and interval, saying how many it stands for."""

    last: dict[str, float] = field(default_factory=dict)
    suppressed: dict[str, int] = field(default_factory=dict)

    def warn(self, result: str, peer: str, detail: str) -> None:
        now = time.monotonic()
        if now - self.last.get(result, -_LOG_INTERVAL_S) < _LOG_INTERVAL_S:
            self.suppressed[result] = self.suppressed.get(result, 0) + 1
            return
        self.last[result] = now
        more = self.suppressed.pop(result, 0)
        log.warning("PROXY header refused", extra={"result": result, "peer": peer,
                                                   "detail": detail, "more": more})  # fmt: skip


class ProxyGate(asyncio.BufferedProtocol):
    """The first protocol of a connection on a listener with ``proxy_protocol`` on. It reads
    exactly the header's bytes (a buffer of :attr:`ProxyHeaderParser.wanted` bytes at a time),
    so the client's first bytes stay in the socket for the service's own protocol -- which may
    be TLS, started later."""

    __slots__ = ("_buffer", "_context", "_factory", "_parser", "_paused", "_timer", "_transport",
                 "peername")  # fmt: skip

    def __init__(
        self, context: GateContext, factory: Callable[[], asyncio.BaseProtocol], paused: bool
    ) -> None:
        self._context = context
        self._factory = factory
        self._paused = paused
        self._parser: ProxyHeaderParser | None = None
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self.peername: object = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        ctx = self._context
        self.peername = transport.get_extra_info("peername")
        if self.peername is None:  # reset before it was accepted (a proxy's TCP check): gone
            ctx.count("empty")
            transport.close()
            return
        peer = Peer.direct(self.peername)
        if not ctx.policy.trusts(peer.address):
            self._refuse("untrusted", f"{peer.address} is not in proxy_trusted", hold=False)
            return
        if not ctx.hub.hold():
            self._refuse("limit", "limit_connections reached", hold=False)
            return
        self._parser = ProxyHeaderParser(ctx.policy.versions)
        self._timer = asyncio.get_running_loop().call_later(ctx.policy.timeout_s, self._late)

    def get_buffer(self, sizehint: int) -> memoryview:
        wanted = self._parser.wanted if self._parser is not None else 1
        if len(self._buffer) != wanted:
            self._buffer = bytearray(wanted)
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        parser = self._parser
        if parser is None:
            return  # refused already: what still arrives is dropped with the connection
        try:
            header = parser.feed(bytes(self._buffer[:nbytes]))
        except ProxyHeaderError as exc:
            self._refuse(exc.reason, str(exc))
            return
        if header is None:
            return
        self._done()
        transport = self._transport
        assert transport is not None
        ctx = self._context
        own = Peer.direct(self.peername)
        if header.local or _names_itself(header.source, own):  # the proxy's own health check
            ctx.count("local")
            transport.close()
            return
        ctx.count("accepted")
        peer = own
        if header.source is not None:
            address, port = header.source
            peer = Peer(normalise(address), port, (own.address, own.port))
        ctx.hub.expect(transport, peer)
        assert not parser.rest  # read exactly: the client's bytes are still in the socket
        inner = self._factory()
        # Paused across the hand-over: some loops (uvloop) go on reading in this very callback,
        # and a protocol that starts TLS later must not have the ClientHello read before.
        transport.pause_reading()
        transport.set_protocol(inner)  # the next read is the client's first byte: its own
        inner.connection_made(transport)
        if not self._paused and not transport.is_closing():
            transport.resume_reading()

    def eof_received(self) -> bool:
        parser = self._parser
        if parser is not None:
            result = "incomplete" if parser.buffered else "empty"
            self._refuse(result, f"closed after {parser.buffered} bytes of the header")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._parser is not None:  # left mid-header (a reset)
            result = "incomplete" if self._parser.buffered else "empty"
            self._context.count(result)
            self._done()

    def _late(self) -> None:
        self._timer = None
        self._refuse("timeout", f"no complete header in {self._context.policy.timeout_s:g} s")

    def _done(self) -> None:
        """The header phase is over: the deadline and the hold on a connection slot end."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._parser is not None:
            self._parser = None
            self._context.hub.unhold()

    def _refuse(self, result: str, detail: str, *, hold: bool = True) -> None:
        self._context.count(result)
        self._context.throttle.warn(result, str(Peer.direct(self.peername)), detail)
        if hold:
            self._done()
        if self._transport is not None:
            self._transport.abort()


def _names_itself(source: tuple[str, int] | None, own: Peer) -> bool:
    """A header whose client is the connection's own end (v1 has no LOCAL: HAProxy's v1 health
    checks name their own socket, as the spec asks): the proxy's connection, not a client's."""
    return source is not None and (normalise(source[0]), source[1]) == (own.address, own.port)


@dataclass
class GateContext:
    """What one listener's gates share."""

    policy: ProxyPolicy
    hub: _Hub
    results: Mapping[str, Counter]
    throttle: _Throttle = field(default_factory=_Throttle)

    def count(self, result: str) -> None:
        self.results[result].inc()

    def wrap(
        self, factory: Callable[[], asyncio.BaseProtocol], paused: bool = False
    ) -> Callable[[], ProxyGate]:
        return lambda: ProxyGate(self, factory, paused)
