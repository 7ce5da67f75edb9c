"""The PROXY protocol gate of the cmdexec listener, in plaintext and with TLS (the header comes
before the TLS handshake), over real sockets: every refusal, a peer leaving mid-header or
saying nothing, the deadline, a health check (v2 LOCAL), headers from a peer that is not a
trusted proxy; then what the named client is: the address of the audit trail (with the proxy
beside it), of the failed-login limiter and of per-source limits.

After every case: the connection was closed within a deadline, the result counter of the case
(``cmdexec_proxy_headers_total{result}``) moved by exactly one and no other did,
``cmdexec_connections_active`` is back to 0; a refused header never reaches the login (no
auth failure counted, nothing audited); an accepted one leads to a working login and run.
Clients bind 127.0.0.N sources: 127.0.0.1 is the trusted proxy, 127.0.0.9 a stranger."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from wirekit_harness import TOKEN, CmdexecHarness, running_cmdexec
from wirekit_testkit import make_test_pki

from wirekit_cmdexec.messages import Auth, Exec, Kind, decode, encode_json
from wirekit_framing import (
    FrameDecoder,
    encode,
    encode_proxy_v1,
    encode_proxy_v2,
    read_frame,
)
from wirekit_servicekit.proxy import PROXY_RESULTS

PROXY = "127.0.0.1"  # the trusted proxy
STRANGER = "127.0.0.9"
TRUSTED = ["127.0.0.1/32"]
DEADLINE_S = 5.0
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
AUTH = encode(encode_json(Kind.AUTH, Auth(token=TOKEN)))
INET = bytes([10, 0, 0, 1, 127, 0, 0, 1]) + struct.pack("!HH", 40000, 7000)
V1 = encode_proxy_v1(("192.0.2.1", 40000), ("127.0.0.1", 7000))
V2 = encode_proxy_v2(("192.0.2.1", 40000), ("127.0.0.1", 7000))
TLS_MODES = ["plain", "tls"]


def v2(ver_cmd: int, fam: int, block: bytes) -> bytes:
    return SIG + struct.pack("!BBH", ver_cmd, fam, len(block)) + block


def exec_frame(*argv: str) -> bytes:
    return encode(encode_json(Kind.EXEC, Exec(argv=list(argv))))


def client_hello() -> bytes:
    """A TLS ClientHello, as a client that forgot the proxy would start."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# -- the servers: one per set of settings, shared by the module's cases -------------------------
# (An in-process server takes 0.5 s to stop: its metrics endpoint's poll.)
pytestmark = pytest.mark.asyncio(loop_scope="module")


class Servers:
    """cmdexec servers behind a trusted proxy at 127.0.0.1, in plaintext or with TLS (the test
    PKI), started on first use, stopped (and checked by the harness) when the module ends."""

    def __init__(self, stack: contextlib.AsyncExitStack, pki: dict[str, Path]) -> None:
        self.stack, self.pki = stack, pki
        self.running: dict[str, CmdexecHarness] = {}

    async def get(self, tls: str = "plain", **overrides: Any) -> CmdexecHarness:
        key = repr((tls, sorted(overrides.items())))
        if key not in self.running:
            settings: dict[str, Any] = {"proxy_protocol": "any", "proxy_trusted": TRUSTED,
                                        "timeout_auth_s": 2.0, **overrides}  # fmt: skip
            if tls == "tls":
                settings["tls_cert_file"] = str(self.pki["server.pem"])
                settings["tls_key_file"] = str(self.pki["server.key"])
            h = await self.stack.enter_async_context(running_cmdexec(**settings))
            if tls == "tls":
                h.tls = ssl.create_default_context(cafile=str(self.pki["ca.pem"]))
            self.running[key] = h
        return self.running[key]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers(pki: dict[str, Path]) -> AsyncIterator[Servers]:
    async with contextlib.AsyncExitStack() as stack:
        yield Servers(stack, pki)


@pytest.fixture(autouse=True)
def nothing_logged_at_error(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Per case, what the harness checks per server: no ERROR, no traceback."""
    yield
    bad = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, "logged: " + "; ".join(f"{r.name}: {r.getMessage()}" for r in bad)


class AuditTrail(logging.Handler):
    """The audit events of a case (the audit logger does not propagate: caplog misses it)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(dict(record.__dict__))


@contextlib.contextmanager
def audit_trail() -> Iterator[AuditTrail]:
    """Call after the server has started (its start replaces the audit logger's handlers)."""
    trail = AuditTrail()
    logger = logging.getLogger("wirekit_cmdexec.audit")
    logger.addHandler(trail)
    try:
        yield trail
    finally:
        logger.removeHandler(trail)


class Ledger:
    """The counters before a case; :meth:`check` waits for the case's result and asserts that
    exactly that result moved, by one, and that no connection or run is left."""

    def __init__(self, h: CmdexecHarness) -> None:
        self.h = h
        self.open = 0  # connections the case keeps open meanwhile
        self.before = self.results()
        self.opened = h.value("cmdexec_connections_opened_total")
        self.failures = self.auth_failures()

    def results(self) -> dict[str, float]:
        return {r: self.h.value("cmdexec_proxy_headers_total", result=r) for r in PROXY_RESULTS}

    def auth_failures(self) -> float:
        return sum(
            s.value
            for metric in self.h.registry.collect()
            for s in metric.samples
            if s.name == "cmdexec_auth_failures_total"
        )

    def changes(self) -> dict[str, float]:
        return {r: v - self.before[r] for r, v in self.results().items() if v != self.before[r]}

    def settled(self) -> bool:
        h = self.h
        return (
            h.value("cmdexec_connections_active") == self.open
            and h.value("cmdexec_runs_active") == 0
        )

    async def check(self, result: str, *, opened: int | None = None) -> None:
        await self.h.wait_for(
            lambda: self.results()[result] >= self.before[result] + 1 and self.settled()
        )
        await asyncio.sleep(0.01)  # a second count would come now
        expected = {**self.before, result: self.before[result] + 1}
        assert self.results() == expected
        assert self.settled()
        if opened is None:
            opened = 1 if result == "accepted" else 0
        assert self.h.value("cmdexec_connections_opened_total") == self.opened + opened
        if result != "accepted":  # a refused header never reaches the login
            assert self.auth_failures() == self.failures
        self.before = expected
        self.opened += opened
        self.failures = self.auth_failures()


async def listener(
    servers: Servers, tls: str = "plain", **overrides: Any
) -> tuple[CmdexecHarness, Ledger]:
    h = await servers.get(tls, **overrides)
    return h, Ledger(h)


# -- a client ---------------------------------------------------------------------------------
def proxy_socket(port: int, source: str = PROXY) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(DEADLINE_S)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


async def dial(port: int, source: str = PROXY) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = proxy_socket(port, source)
    sock.setblocking(False)
    return await asyncio.open_connection(sock=sock)


async def ending(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """Everything the server still sends, and how the connection ended, within the deadline."""
    got = bytearray()
    try:
        async with asyncio.timeout(DEADLINE_S):
            while chunk := await reader.read(1 << 16):
                got += chunk
    except ConnectionResetError:
        return bytes(got), "reset"
    return bytes(got), "eof"


async def answer(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The server's answer to AUTH + EXEC: ("exit", stdout), ("error", message), or
    ("closed", "") when it closed without one."""
    out = bytearray()
    try:
        async with asyncio.timeout(DEADLINE_S):
            while (frame := await read_frame(reader, 1 << 20)) is not None:
                kind, body = decode(frame)
                if kind is Kind.STDOUT:
                    out += body
                elif kind is Kind.EXIT:
                    return "exit", out.decode()
                elif kind is Kind.ERROR:
                    return "error", str(body.message)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    return "closed", ""


async def session(
    h: CmdexecHarness,
    header: bytes,
    *,
    source: str = PROXY,
    token: str = TOKEN,
    word: str = "hello",
) -> tuple[tuple[str, str], int]:
    """Through ``header``, AUTH with ``token`` and EXEC echo ``word`` (plaintext: all in the
    header's segment; TLS: the handshake once the header has been read alone -- see
    test_tls_whose_client_hello_shares_the_headers_segment). The answer, and the local port
    the server saw as the proxy's."""
    sock = proxy_socket(h.port, source)
    port = sock.getsockname()[1]
    login = encode(encode_json(Kind.AUTH, Auth(token=token))) + exec_frame("echo", word)
    if h.tls is None:
        sock.sendall(header + login)
        login = b""
    else:
        sock.sendall(header)
        await asyncio.sleep(0.05)  # read alone
    sock.setblocking(False)
    tls: dict[str, Any] = {} if h.tls is None else {"ssl": h.tls, "server_hostname": "localhost"}
    reader, writer = await asyncio.open_connection(sock=sock, **tls)
    try:
        writer.write(login)
        return await answer(reader), port
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


# -- refusals: the table -----------------------------------------------------------------------
REFUSED = [
    # (what the proxy's peer sends, the listener's proxy_protocol, the result)
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", "any", "signature", id="http"),
    pytest.param(AUTH + exec_frame("true"), "any", "signature", id="auth-without-header"),
    pytest.param(client_hello(), "any", "signature", id="tls-without-header"),
    pytest.param(V1 + AUTH, "v2", "version", id="v1-on-a-v2-listener"),
    pytest.param(V2 + AUTH, "v1", "version", id="v2-on-a-v1-listener"),
    pytest.param(b"PROXY " + b"1" * 101, "any", "too_long", id="v1-no-crlf-in-107"),
    pytest.param(SIG + b"\x21\x11\xff\xff", "any", "too_long", id="v2-len-65535"),
    pytest.param(SIG + b"\x21\x11\x02\x58", "any", "too_long", id="v2-len-600"),
    pytest.param(b"PROXY TCP4 10.0.0.1 127.0.0.1 1 2\n", "any", "malformed", id="v1-lone-lf"),
    pytest.param(b"PROXY TCP4 10.0.0.1 127.0.0.1 01 2\r\n", "any", "malformed",
                 id="v1-leading-zero"),
    pytest.param(b"PROXY TCP4 2001:db8::1 ::1 1 2\r\n", "any", "malformed",
                 id="v1-family-mismatch"),
    pytest.param(v2(0x22, 0x11, INET), "any", "malformed", id="v2-command-2"),
    pytest.param(v2(0x21, 0x41, INET), "any", "malformed", id="v2-family-4"),
    pytest.param(v2(0x21, 0x11, INET + b"\x02\x00\x09abc"), "any", "malformed",
                 id="v2-tlv-overrun"),
]  # fmt: skip


@pytest.mark.parametrize("tls", TLS_MODES)
@pytest.mark.parametrize(("data", "version", "result"), REFUSED)
async def test_a_refused_header_closes_the_connection_before_any_login(
    servers: Servers, tls: str, data: bytes, version: str, result: str
) -> None:
    """Refused: closed with no answer (the AUTH after a bad header is never read), counted
    under its reason; no connection, no login attempt, no audit event. The listener then
    serves a good header."""
    h, ledger = await listener(servers, tls, proxy_protocol=version)
    with audit_trail() as trail:
        reader, writer = await dial(h.port)
        writer.write(data)
        assert (await ending(reader))[0] == b""
        writer.close()
        await ledger.check(result)
    assert trail.events == []
    assert (await session(h, V1 if version == "v1" else V2))[0] == ("exit", "hello\n")
    await ledger.check("accepted")


@pytest.mark.parametrize("tls", TLS_MODES)
@pytest.mark.parametrize("leave", ["fin", "rst"])
@pytest.mark.parametrize(
    ("sent", "result"),
    [
        pytest.param(b"", "empty", id="nothing"),
        pytest.param(V1[:20], "incomplete", id="v1-mid-line"),
        pytest.param(V2[:-1], "incomplete", id="v2-all-but-1"),
    ],
)
async def test_a_peer_leaving_before_the_header_is_complete_is_counted(
    servers: Servers, tls: str, leave: str, sent: bytes, result: str
) -> None:
    h, ledger = await listener(servers, tls)
    reader, writer = await dial(h.port)
    writer.write(sent)
    await asyncio.sleep(0.05)
    if leave == "fin":
        writer.write_eof()
        assert (await ending(reader))[0] == b""
        writer.close()
    else:
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()
    await ledger.check(result)


@pytest.mark.parametrize("tls", TLS_MODES)
async def test_the_header_deadline(servers: Servers, tls: str) -> None:
    """0.5 s for the header: silent, or one byte every 50 ms: closed at it (``timeout``);
    one byte every 4 ms: in time, and the login works."""
    timeout = 0.5
    h, ledger = await listener(servers, tls, timeout_proxy_header_s=timeout)
    loop = asyncio.get_running_loop()
    for pause in (None, 0.05):
        reader, writer = await dial(h.port)
        started = loop.time()
        closed = asyncio.ensure_future(ending(reader))
        sent = 0
        while pause is not None and not closed.done() and sent < len(V1):
            with contextlib.suppress(ConnectionError):
                writer.write(V1[sent : sent + 1])
                sent += 1
            await asyncio.sleep(pause)
        assert (await closed)[0] == b""
        assert timeout <= loop.time() - started < timeout + 1.0
        writer.close()
        await ledger.check("timeout")
    sock = proxy_socket(h.port)
    started = loop.time()
    for i in range(len(V2)):
        sock.send(V2[i : i + 1])
        await asyncio.sleep(0.004)
    assert loop.time() - started < timeout * 0.8, "too slow a host for this case"
    sock.setblocking(False)
    tls_args: dict[str, Any] = {}
    if h.tls is not None:
        tls_args = {"ssl": h.tls, "server_hostname": "localhost"}
    reader, writer = await asyncio.open_connection(sock=sock, **tls_args)
    writer.write(AUTH + exec_frame("echo", "trickled"))
    assert await answer(reader) == ("exit", "trickled\n")
    writer.close()
    await ledger.check("accepted")


@pytest.mark.parametrize("tls", TLS_MODES)
async def test_a_peer_that_is_not_a_trusted_proxy_is_closed_at_once(
    servers: Servers, tls: str
) -> None:
    """From 127.0.0.9, with a valid header and AUTH: closed at the connect, ``untrusted``;
    no login tried, nothing audited."""
    h, ledger = await listener(servers, tls)
    with audit_trail() as trail:
        for data in (b"", V2 + AUTH + exec_frame("true")):
            loop = asyncio.get_running_loop()
            started = loop.time()
            reader, writer = await dial(h.port, STRANGER)
            with contextlib.suppress(ConnectionError):
                writer.write(data)
            assert (await ending(reader))[0] == b""
            assert loop.time() - started < 1.5  # not the header's deadline (3 s)
            writer.close()
            await ledger.check("untrusted")
    assert trail.events == []


@pytest.mark.parametrize("tls", TLS_MODES)
async def test_a_v2_local_header_is_a_health_check_not_a_client(servers: Servers, tls: str) -> None:
    """LOCAL: closed, ``local``, no connection; an AUTH after it is not answered."""
    h, ledger = await listener(servers, tls)
    with audit_trail() as trail:
        for later in (False, True):
            reader, writer = await dial(h.port)
            writer.write(encode_proxy_v2(None, None) + (b"" if later else AUTH))
            if later:
                await asyncio.sleep(0.05)
                with contextlib.suppress(ConnectionError):
                    writer.write(AUTH)
            assert (await ending(reader))[0] == b""
            writer.close()
            await ledger.check("local")
    assert trail.events == []


# -- accepted: the login works, and the client named is the one audited ---------------------------
@pytest.mark.parametrize("tls", TLS_MODES)
@pytest.mark.parametrize(
    ("header", "source"),
    [
        pytest.param(encode_proxy_v2(("10.9.8.7", 40123), ("127.0.0.1", 7000)),
                     "10.9.8.7:40123", id="v2-inet"),
        pytest.param(encode_proxy_v1(("10.9.8.7", 40123), ("127.0.0.1", 7000)),
                     "10.9.8.7:40123", id="v1-tcp4"),
        pytest.param(encode_proxy_v2(("2001:db8::7", 40123), ("::1", 7000)),
                     "[2001:db8::7]:40123", id="v2-inet6"),
        pytest.param(encode_proxy_v2(("::ffff:10.9.8.7", 40123), ("::1", 7000)),
                     "10.9.8.7:40123", id="v2-inet6-mapped"),
        pytest.param(b"PROXY UNKNOWN\r\n", None, id="v1-unknown"),
    ],
)  # fmt: skip
async def test_a_login_through_the_proxy_is_audited_with_the_client_and_the_proxy(
    servers: Servers, tls: str, header: bytes, source: str | None
) -> None:
    """The audit's ``source`` is the client the header named, ``proxy`` the proxy's socket
    (UNKNOWN names no client: the proxy is the source, and there is no proxy field)."""
    h, ledger = await listener(servers, tls)
    with audit_trail() as trail:
        result, port = await session(h, header, word="audited")
        assert result == ("exit", "audited\n")
        await ledger.check("accepted")
    events = [(e["event"], e["decision"], e["source"], e["proxy"]) for e in trail.events]
    proxy = f"{PROXY}:{port}"
    expected: tuple[str, str | None] = (proxy, None) if source is None else (source, proxy)
    assert events == [("auth", "allowed", *expected), ("exec", "allowed", *expected)]


async def test_header_and_login_split_at_every_byte(servers: Servers) -> None:
    """The header, AUTH and EXEC in one segment, then cut in two at every byte of the header
    and the AUTH frame: the command runs every time."""
    h, ledger = await listener(servers)
    data = V2 + AUTH + exec_frame("true")
    for cut in range(len(V2) + len(AUTH) + 1):
        sock = proxy_socket(h.port)
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        if cut:
            writer.write(data[:cut])
            await writer.drain()
            await asyncio.sleep(0.003)
        writer.write(data[cut:])
        assert await answer(reader) == ("exit", ""), cut
        writer.close()
        await ledger.check("accepted")


async def test_tls_whose_client_hello_shares_the_headers_segment(servers: Servers) -> None:
    """A proxy forwards the client's first bytes right behind its header: the ClientHello often
    arrives in the header's segment (HAProxy sends both at once). The handshake must see it."""
    h, ledger = await listener(servers, "tls")
    assert h.tls is not None
    context = h.tls

    def handshake_then_run() -> tuple[str, str]:
        with proxy_socket(h.port) as sock:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.do_handshake()
            sock.sendall(V2 + outgoing.read())  # the header and the ClientHello: one segment
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    sock.sendall(outgoing.read())
                    data = sock.recv(1 << 16)
                    if not data:
                        return "closed", "during the TLS handshake"
                    incoming.write(data)
            tls.write(AUTH + exec_frame("echo", "coalesced"))
            sock.sendall(outgoing.read())
            decoder, out = FrameDecoder(1 << 20), bytearray()
            while data := sock.recv(1 << 16):
                incoming.write(data)
                with contextlib.suppress(ssl.SSLWantReadError):
                    while chunk := tls.read(1 << 16):
                        for frame in decoder.feed(chunk):
                            kind, body = decode(frame)
                            if kind is Kind.STDOUT:
                                out += body
                            elif kind is Kind.EXIT:
                                return "exit", out.decode()
                            elif kind is Kind.ERROR:
                                return "error", str(body.message)
            return "closed", ""

    with audit_trail() as trail:
        result = await asyncio.to_thread(handshake_then_run)
        await ledger.check("accepted")
    denied = [e["reason"] for e in trail.events if e["decision"] == "denied"]
    assert (result, denied) == (("exit", "coalesced\n"), [])


# -- the client named is the one the login limiter counts ------------------------------------------
async def test_failed_logins_are_counted_against_the_client_the_header_names(
    servers: Servers,
) -> None:
    """auth_failure_burst_per_source=2: two wrong tokens from 10.9.8.7 (through the proxy),
    then the right one from 10.9.8.7 is refused, naming it (and as ::ffff:10.9.8.7 too), while
    10.9.8.8 -- through the same proxy -- still gets in."""
    h, ledger = await listener(servers, auth_failure_burst_per_source=2)

    def naming(address: str) -> bytes:
        return encode_proxy_v2((address, 50000), ("::1" if ":" in address else PROXY, 7000))

    token_failures = h.value("cmdexec_auth_failures_total", reason="token")
    limited = h.value("cmdexec_auth_failures_total", reason="rate_limited")
    with audit_trail() as trail:
        for _ in range(2):
            (kind, message), _ = await session(h, naming("10.9.8.7"), token="wrong")
            assert (kind, message.startswith("wrong token")) == ("error", True), message
        for address in ("10.9.8.7", "::ffff:10.9.8.7"):
            (kind, message), _ = await session(h, naming(address))
            assert kind == "error"
            assert message.startswith("too many failed logins from 10.9.8.7;"), message
        assert (await session(h, naming("10.9.8.8")))[0] == ("exit", "hello\n")
        await h.wait_for(lambda: ledger.settled())
    assert h.value("cmdexec_auth_failures_total", reason="token") == token_failures + 2
    assert h.value("cmdexec_auth_failures_total", reason="rate_limited") == limited + 2
    assert ledger.results()["accepted"] == ledger.before["accepted"] + 5
    sources = [(e["source"].rsplit(":", 1)[0], e["decision"]) for e in trail.events]
    assert sources == [("10.9.8.7", "denied")] * 4 + [("10.9.8.8", "allowed")] * 2


async def test_connections_per_source_count_the_client_the_header_names(
    servers: Servers,
) -> None:
    """limit_connections_per_source=1: a logged-in connection naming 10.1.2.3 holds the
    source; another naming 10.1.2.3 (or ::ffff:10.1.2.3) is refused per source, one naming
    10.1.2.4 is served, all through the one proxy address."""
    h, ledger = await listener(servers, limit_connections_per_source=1)
    rejected = h.value("cmdexec_connections_rejected_total", reason="per_source")
    _, writer = await dial(h.port)  # logged in, then idle: it holds the source
    writer.write(encode_proxy_v2(("10.1.2.3", 1), (PROXY, 2)) + AUTH)
    ledger.open = 1
    await ledger.check("accepted")
    for named in (("10.1.2.3", PROXY), ("::ffff:10.1.2.3", "::1")):
        header = encode_proxy_v2((named[0], 1), (named[1], 2))
        assert (await session(h, header))[0] == ("closed", "")
        await ledger.check("accepted", opened=0)
    assert h.value("cmdexec_connections_rejected_total", reason="per_source") == rejected + 2
    assert (await session(h, encode_proxy_v2(("10.1.2.4", 1), (PROXY, 2))))[0] == (
        "exit",
        "hello\n",
    )
    await ledger.check("accepted")
    writer.close()
    ledger.open = 0
    await h.wait_for(ledger.settled)


async def test_many_refused_headers_are_logged_at_most_once_a_second(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    """A flood of bad headers: each counted, the refusal logged (WARNING) at most once a second
    per result, with how many more there were."""
    h, ledger = await listener(servers, proxy_protocol="v2", limit_connections=100)  # its own
    caplog.set_level(logging.WARNING, "wirekit_servicekit.proxy")
    for _ in range(20):
        reader, writer = await dial(h.port)
        writer.write(b"GET /\r\n")
        assert (await ending(reader))[0] == b""
        writer.close()
    await h.wait_for(lambda: ledger.results()["signature"] == ledger.before["signature"] + 20)
    lines = [r for r in caplog.records if r.name == "wirekit_servicekit.proxy"]
    assert 1 <= len(lines) <= 2
    assert all(getattr(r, "result", None) == "signature" for r in lines)
