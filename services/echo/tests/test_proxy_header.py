"""The PROXY protocol gate of the echo listeners (raw and framed) against hostile and unlucky
headers, over real sockets: every refusal of proxy-protocol.txt v1/v2, headers trickled, split
at every byte, cut short, never sent; a health check (v2 LOCAL); headers from a peer that is
not a trusted proxy; and the client a header names as the address of per-source limits. Then
hypothesis: random streams and random splits of valid headers, with the parser's own verdict on
the same bytes as the model.

After every case: the connection was closed within a deadline (EOF or reset), the result
counter of the case (``echo_proxy_headers_total{result}``) moved by exactly one and no other
did, ``echo_connections_active`` is back to 0; and where the header was accepted, the echo
works byte for byte. Clients bind 127.0.0.N sources: 127.0.0.1 is the trusted proxy
(``proxy_trusted=["127.0.0.1/32"]``), 127.0.0.9 a stranger."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan
from wirekit_harness import EchoHarness, running_echo

from wirekit_framing import (
    FrameDecoder,
    FrameTooLarge,
    ProxyHeaderError,
    ProxyHeaderParser,
    encode,
    encode_proxy_v1,
    encode_proxy_v2,
    read_frame,
)
from wirekit_servicekit.proxy import PROXY_RESULTS

MODES = ["raw", "framed"]
PROXY = "127.0.0.1"  # the trusted proxy
STRANGER = "127.0.0.9"  # any other peer
TRUSTED = ["127.0.0.1/32"]
#: Every wait on the server has this deadline: a hang fails the case, it never blocks the run.
DEADLINE_S = 5.0
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
#: A frame, echoed as is by both modes (raw echoes its bytes, framed the frame).
FRAME = encode(b"through the proxy")
LIMIT = 4096  # max_frame_size of the hypothesis server


def v2(ver_cmd: int, fam: int, block: bytes) -> bytes:
    """A v2 header with any command, family and block (the encoder only builds valid ones)."""
    return SIG + struct.pack("!BBH", ver_cmd, fam, len(block)) + block


INET = bytes([10, 0, 0, 1, 127, 0, 0, 1]) + struct.pack("!HH", 40000, 7000)  # a v2 INET block
V1 = encode_proxy_v1(("192.0.2.1", 40000), ("127.0.0.1", 7000))
V2 = encode_proxy_v2(("192.0.2.1", 40000), ("127.0.0.1", 7000))


# -- the servers: one per set of settings, shared by the module's cases ------------------------
# (An in-process server takes 0.5 s to stop: its metrics endpoint's poll. Each case checks
# that what it did is over -- counters, gauges, the log -- and the harness checks the rest when
# the module ends.)
pytestmark = pytest.mark.asyncio(loop_scope="module")


class Servers:
    """Echo servers behind a trusted proxy at 127.0.0.1 (both header versions unless told),
    started on first use, stopped (and checked by the harness) at the end of the module."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self.stack = stack
        self.running: dict[str, EchoHarness] = {}

    async def get(self, **overrides: Any) -> EchoHarness:
        key = repr(sorted(overrides.items()))
        if key not in self.running:
            settings = {"proxy_protocol": "any", "proxy_trusted": TRUSTED, **overrides}
            self.running[key] = await self.stack.enter_async_context(running_echo(**settings))
        return self.running[key]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers() -> AsyncIterator[Servers]:
    async with contextlib.AsyncExitStack() as stack:
        yield Servers(stack)


@pytest.fixture(autouse=True)
def nothing_logged_at_error(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Per case, what the harness checks per server: no ERROR, no traceback."""
    yield
    bad = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, "logged: " + "; ".join(f"{r.name}: {r.getMessage()}" for r in bad)


# -- a client and what it sees ---------------------------------------------------------------
async def dial(port: int, source: str = PROXY) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def ending(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """Everything the server still sends, and how the connection ended (``eof`` or ``reset``),
    within the deadline (else TimeoutError: the server kept it open)."""
    got = bytearray()
    try:
        async with asyncio.timeout(DEADLINE_S):
            while chunk := await reader.read(1 << 16):
                got += chunk
    except ConnectionResetError:
        return bytes(got), "reset"
    return bytes(got), "eof"


def rst(writer: asyncio.StreamWriter) -> None:
    """Leave with a reset (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def converse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The echo works on this connection: a frame comes back byte for byte, then EOF answers
    EOF (and the connection is closed)."""
    writer.write(FRAME)
    async with asyncio.timeout(DEADLINE_S):
        assert await reader.readexactly(len(FRAME)) == FRAME
    writer.write_eof()
    assert await ending(reader) == (b"", "eof")
    writer.close()


class Ledger:
    """The counters of one listener before a case; :meth:`check` waits for the case's result
    and asserts that exactly that counter moved, by one, and that no connection is left."""

    def __init__(self, h: EchoHarness, mode: str) -> None:
        self.h, self.mode = h, mode
        self.open = 0  # connections the case keeps open meanwhile
        self.before = self.results()
        self.opened = self.value("echo_connections_opened_total")
        self.bytes_in = self.value("echo_received_bytes_total")
        self.bytes_out = self.value("echo_sent_bytes_total")
        self.spans = len(h.spans.get_finished_spans())

    def received(self) -> float:
        """Bytes the echo received (read from connections it admitted) since the case began."""
        return self.value("echo_received_bytes_total") - self.bytes_in

    def sent(self) -> float:
        return self.value("echo_sent_bytes_total") - self.bytes_out

    def new_spans(self) -> list[ReadableSpan]:
        return list(self.h.spans.get_finished_spans()[self.spans :])

    def value(self, name: str, **labels: str) -> float:
        return self.h.value(name, mode=self.mode, **labels)

    def results(self) -> dict[str, float]:
        return {r: self.value("echo_proxy_headers_total", result=r) for r in PROXY_RESULTS}

    def changes(self) -> dict[str, float]:
        """The results counted since the last check (for failure messages)."""
        return {r: v - self.before[r] for r, v in self.results().items() if v != self.before[r]}

    def moved(self, result: str) -> bool:
        return (
            self.results()[result] >= self.before[result] + 1
            and self.value("echo_connections_active") == self.open
        )

    async def check(self, result: str, *, opened: int | None = None) -> None:
        await self.h.wait_for(lambda: self.moved(result))
        await asyncio.sleep(0.01)  # a second count would come now
        expected = {**self.before, result: self.before[result] + 1}
        assert self.results() == expected
        assert self.value("echo_connections_active") == self.open
        if opened is None:
            opened = 1 if result == "accepted" else 0
        assert self.value("echo_connections_opened_total") == self.opened + opened
        self.before = expected
        self.opened += opened


async def listener(servers: Servers, mode: str, **overrides: Any) -> tuple[EchoHarness, Ledger]:
    h = await servers.get(**overrides)
    return h, Ledger(h, mode)


# -- refusals: the table -----------------------------------------------------------------------
REFUSED = [
    # (what the proxy's peer sends, the listener's proxy_protocol, the result)
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "any", "signature", id="http"),
    pytest.param(FRAME, "any", "signature", id="a-frame-without-header"),
    pytest.param(b"PROXX TCP4", "any", "signature", id="v1-typo"),
    pytest.param(SIG[:11] + b"X" + b"\x21\x11\x00\x0c" + INET, "any", "signature", id="v2-typo"),
    pytest.param(V1 + FRAME, "v2", "version", id="v1-on-a-v2-listener"),
    pytest.param(V2 + FRAME, "v1", "version", id="v2-on-a-v1-listener"),
    pytest.param(encode_proxy_v2(None, None), "v1", "version", id="v2-local-on-a-v1-listener"),
    pytest.param(b"PROXY " + b"1" * 101, "any", "too_long", id="v1-no-crlf-in-107"),
    pytest.param(b"PROXY " + b"1" * 1000, "any", "too_long", id="v1-no-crlf-in-1006"),
    pytest.param(b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n", "any", "too_long", id="v1-108"),
    pytest.param(SIG + b"\x21\x11\xff\xff", "any", "too_long", id="v2-len-65535"),
    pytest.param(SIG + b"\x21\x11\x02\x58", "any", "too_long", id="v2-len-600"),
    pytest.param(v2(0x21, 0x11, INET + bytes(600)), "any", "too_long", id="v2-600-sent"),
    pytest.param(b"PROXY TCP4 10.0.0.1 127.0.0.1 1 2\n", "any", "malformed", id="v1-lone-lf"),
    pytest.param(b"PROXY TCP4 10.0.0.1 127.0.0.1 1 2\rX", "any", "malformed", id="v1-lone-cr"),
    pytest.param(b"PROXY TCP4 10.0.0.1 127.0.0.1 01 2\r\n", "any", "malformed",
                 id="v1-leading-zero-port"),
    pytest.param(b"PROXY TCP4 10.0.0.01 127.0.0.1 1 2\r\n", "any", "malformed",
                 id="v1-leading-zero-address"),
    pytest.param(b"PROXY TCP4 10.0.0.1 127.0.0.1 65536 2\r\n", "any", "malformed",
                 id="v1-port-over"),
    pytest.param(b"PROXY TCP4 2001:db8::1 ::1 1 2\r\n", "any", "malformed",
                 id="v1-tcp4-with-ipv6"),
    pytest.param(b"PROXY TCP6 10.0.0.1 127.0.0.1 1 2\r\n", "any", "malformed",
                 id="v1-tcp6-with-ipv4"),
    pytest.param(b"PROXY TCP6 2001:db8::1 127.0.0.1 1 2\r\n", "any", "malformed",
                 id="v1-tcp6-mixed"),
    pytest.param(b"PROXY UDP4 10.0.0.1 127.0.0.1 1 2\r\n", "any", "malformed", id="v1-udp4"),
    pytest.param(b"PROXY TCP4 10.0.0.1 127.0.0.1 1\r\n", "any", "malformed", id="v1-3-fields"),
    pytest.param(b"PROXY TCP4 10.0.0.1 127.0.0.1 1 2 3\r\n", "any", "malformed",
                 id="v1-5-fields"),
    pytest.param(b"PROXY \r\n", "any", "malformed", id="v1-empty"),
    pytest.param(v2(0x11, 0x11, INET), "any", "malformed", id="v2-version-1"),
    pytest.param(v2(0x22, 0x11, INET), "any", "malformed", id="v2-command-2"),
    pytest.param(v2(0x2F, 0x11, INET), "any", "malformed", id="v2-command-15"),
    pytest.param(v2(0x21, 0x41, INET), "any", "malformed", id="v2-family-4"),
    pytest.param(v2(0x21, 0x13, INET), "any", "malformed", id="v2-protocol-3"),
    pytest.param(v2(0x21, 0x11, INET[:11]), "any", "malformed", id="v2-inet-short"),
    pytest.param(v2(0x21, 0x21, INET), "any", "malformed", id="v2-inet6-short"),
    pytest.param(v2(0x21, 0x11, INET + b"\x02\x00\x09abc"), "any", "malformed",
                 id="v2-tlv-overrun"),
    pytest.param(v2(0x21, 0x11, INET + b"\x02\x00"), "any", "malformed", id="v2-tlv-cut"),
]  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("data", "version", "result"), REFUSED)
async def test_a_refused_header_closes_the_connection_and_is_counted_once(
    servers: Servers, mode: str, data: bytes, version: str, result: str
) -> None:
    """Refused: closed (nothing echoed: not even the bytes after a bad header), counted under
    its reason, never a connection of the echo. The same listener then serves a good header."""
    h, ledger = await listener(servers, mode, proxy_protocol=version)
    reader, writer = await dial(h.ports[mode])
    writer.write(data)
    assert await ending(reader) in ((b"", "reset"), (b"", "eof"))
    writer.close()
    await ledger.check(result)
    assert ledger.received() == 0
    reader, writer = await dial(h.ports[mode])
    writer.write(V1 if version == "v1" else V2)
    await converse(reader, writer)
    await ledger.check("accepted")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("leave", ["fin", "rst"])
@pytest.mark.parametrize(
    ("sent", "result"),
    [
        pytest.param(b"", "empty", id="nothing"),
        pytest.param(b"P", "incomplete", id="v1-1-byte"),
        pytest.param(V1[:20], "incomplete", id="v1-mid-line"),
        pytest.param(V1[:-1], "incomplete", id="v1-all-but-lf"),
        pytest.param(SIG[:5], "incomplete", id="v2-mid-signature"),
        pytest.param(V2[:16], "incomplete", id="v2-prefix-only"),
        pytest.param(V2[:-1], "incomplete", id="v2-all-but-1"),
    ],
)
async def test_a_peer_leaving_before_the_header_is_complete_is_counted(
    servers: Servers, mode: str, leave: str, sent: bytes, result: str
) -> None:
    """Disconnect (FIN or reset) mid-header: ``incomplete``; before any byte: ``empty``."""
    h, ledger = await listener(servers, mode)
    reader, writer = await dial(h.ports[mode])
    if sent:
        writer.write(sent)
    await asyncio.sleep(0.05)  # accepted and read by the server
    if leave == "fin":
        writer.write_eof()
        assert await ending(reader) in ((b"", "reset"), (b"", "eof"))
        writer.close()
    else:
        rst(writer)
    await ledger.check(result)


# -- accepted headers ----------------------------------------------------------------------------
ACCEPTED = [
    # (header, the client it names: the span's client.address, or None: the proxy itself)
    pytest.param(V1, "192.0.2.1", id="v1-tcp4"),
    pytest.param(encode_proxy_v1(("2001:db8::1", 1), ("::1", 2)), "2001:db8::1", id="v1-tcp6"),
    pytest.param(b"PROXY UNKNOWN\r\n", None, id="v1-unknown"),
    pytest.param(b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                 b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n", None,
                 id="v1-unknown-107-bytes"),
    pytest.param(V2, "192.0.2.1", id="v2-inet"),
    pytest.param(encode_proxy_v2(("2001:db8::1", 1), ("::1", 2)), "2001:db8::1", id="v2-inet6"),
    pytest.param(encode_proxy_v2(("192.0.2.1", 1), ("127.0.0.1", 2),
                                 [(0x02, b"echo.example"), (0x05, b"\x00" * 32)]),
                 "192.0.2.1", id="v2-tlvs"),
    pytest.param(v2(0x21, 0x00, b""), None, id="v2-unspec"),
    pytest.param(v2(0x21, 0x31, bytes(216)), None, id="v2-unix"),
    pytest.param(v2(0x21, 0x11, INET + b"\x04\x01\xf9" + bytes(505)), "10.0.0.1",
                 id="v2-block-of-520"),
]  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("header", "client"), ACCEPTED)
async def test_an_accepted_header_hands_the_connection_to_the_echo(
    servers: Servers, mode: str, header: bytes, client: str | None
) -> None:
    """Accepted: the echo works, and its span names the client the header named (the proxy
    is the socket's peer); UNKNOWN, UNSPEC and UNIX name none: the proxy's own address."""
    h, ledger = await listener(servers, mode)
    reader, writer = await dial(h.ports[mode])
    writer.write(header)
    await converse(reader, writer)
    await ledger.check("accepted")
    spans = ledger.new_spans()
    assert len(spans) == 1
    attributes = dict(spans[0].attributes or {})
    assert attributes["client.address"] == (client or PROXY)
    assert attributes["network.peer.address"] == PROXY


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
async def test_header_and_first_frame_split_at_every_byte_are_echoed_exactly(
    servers: Servers, mode: str, header: bytes
) -> None:
    """The header and the first frame in one segment (cut 0), then in two, cut at every byte
    (inside the header, right after it, inside the frame): the frame comes back exact."""
    h, ledger = await listener(servers, mode)
    data = header + FRAME
    for cut in range(len(data)):
        reader, writer = await dial(h.ports[mode])
        if cut:
            writer.write(data[:cut])
            await writer.drain()
            await asyncio.sleep(0.003)  # a read of its own
        writer.write(data[cut:])
        async with asyncio.timeout(DEADLINE_S):
            assert await reader.readexactly(len(FRAME)) == FRAME, cut
        writer.write_eof()
        assert await ending(reader) == (b"", "eof")
        writer.close()
        await ledger.check("accepted")
    assert ledger.sent() == len(data) * len(FRAME)


# -- the deadline --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", V2], ids=["v1", "v2"])
async def test_a_header_trickled_within_the_deadline_is_accepted(
    servers: Servers, mode: str, header: bytes
) -> None:
    """One byte every 4 ms, all of it within the deadline (0.5 s): accepted."""
    timeout = 0.5
    h, ledger = await listener(servers, mode, timeout_proxy_header_s=timeout)
    loop = asyncio.get_running_loop()
    reader, writer = await dial(h.ports[mode])
    started = loop.time()
    for i in range(len(header)):
        writer.write(header[i : i + 1])
        await writer.drain()
        await asyncio.sleep(0.004)
    assert loop.time() - started < timeout * 0.8, "too slow a host for this case"
    await converse(reader, writer)
    await ledger.check("accepted")


@pytest.mark.parametrize("mode", MODES)
async def test_a_header_trickled_past_the_deadline_is_closed_at_it(
    servers: Servers, mode: str
) -> None:
    """One byte every 50 ms is activity, yet the header's deadline holds from the connect."""
    timeout = 0.5
    h, ledger = await listener(servers, mode, timeout_proxy_header_s=timeout)
    loop = asyncio.get_running_loop()
    reader, writer = await dial(h.ports[mode])
    started = loop.time()
    closed = asyncio.ensure_future(ending(reader))
    sent = 0
    while not closed.done() and sent < len(V1):
        with contextlib.suppress(ConnectionError):
            writer.write(V1[sent : sent + 1])
            sent += 1
        await asyncio.sleep(0.05)
    assert (await closed)[0] == b""
    elapsed = loop.time() - started
    assert timeout <= elapsed < timeout + 1.0, elapsed
    assert sent < len(V1)
    writer.close()
    await ledger.check("timeout")


@pytest.mark.parametrize("mode", MODES)
async def test_a_silent_connection_is_closed_at_the_deadline(servers: Servers, mode: str) -> None:
    timeout = 0.5
    h, ledger = await listener(servers, mode, timeout_proxy_header_s=timeout)
    loop = asyncio.get_running_loop()
    reader, writer = await dial(h.ports[mode])
    started = loop.time()
    assert (await ending(reader))[0] == b""
    assert timeout <= loop.time() - started < timeout + 1.0
    writer.close()
    await ledger.check("timeout")


# -- who may send a header -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "data",
    [b"", V1 + FRAME, V2 + FRAME, FRAME],
    ids=["silent", "v1-and-frame", "v2-and-frame", "frame"],
)
async def test_a_peer_that_is_not_a_trusted_proxy_is_closed_at_once(
    servers: Servers, mode: str, data: bytes
) -> None:
    """From 127.0.0.9: closed at the connect (long before the header's deadline), its bytes
    never read (nothing echoed, nothing counted as received), counted ``untrusted``."""
    h, ledger = await listener(servers, mode, timeout_proxy_header_s=30)
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await dial(h.ports[mode], source=STRANGER)
    if data:
        with contextlib.suppress(ConnectionError):
            writer.write(data)
    assert (await ending(reader))[0] == b""
    assert loop.time() - started < 2.0
    writer.close()
    await ledger.check("untrusted")
    assert (ledger.received(), ledger.sent()) == (0, 0)


@pytest.mark.parametrize("mode", MODES)
async def test_a_v2_local_header_is_a_health_check_not_a_client(
    servers: Servers, mode: str
) -> None:
    """LOCAL (the proxy's own connection): closed, ``local``, no connection of the echo; a
    frame after it (same segment, or later) is not echoed."""
    local_inet = v2(0x20, 0x11, INET)  # LOCAL with an address block: discarded
    h, ledger = await listener(servers, mode)
    for header in (encode_proxy_v2(None, None), local_inet):
        reader, writer = await dial(h.ports[mode])
        writer.write(header + FRAME)
        assert (await ending(reader))[0] == b""
        writer.close()
        await ledger.check("local")
        reader, writer = await dial(h.ports[mode])
        writer.write(header)
        await writer.drain()
        await asyncio.sleep(0.05)
        with contextlib.suppress(ConnectionError):
            writer.write(FRAME)
        assert (await ending(reader))[0] == b""
        writer.close()
        await ledger.check("local")
    assert (ledger.received(), ledger.sent()) == (0, 0)
    assert ledger.new_spans() == []


# -- the client a header names is the source of per-source limits -------------------------------
async def held(h: EchoHarness, ledger: Ledger, header: bytes) -> asyncio.StreamWriter:
    """A connection admitted through ``header`` and kept open (its echo checked)."""
    reader, writer = await dial(h.ports[ledger.mode])
    writer.write(header + FRAME)
    try:
        async with asyncio.timeout(DEADLINE_S):
            got = await reader.readexactly(len(FRAME))
    except (asyncio.IncompleteReadError, ConnectionResetError):
        got = b""
    assert got == FRAME, f"{header!r} was not served: {ledger.changes()}"
    ledger.open += 1
    await ledger.check("accepted")
    return writer


async def let_go(h: EchoHarness, ledger: Ledger, writer: asyncio.StreamWriter) -> None:
    writer.close()
    ledger.open -= 1
    await h.wait_for(lambda: ledger.value("echo_connections_active") == ledger.open)


async def refused_per_source(h: EchoHarness, ledger: Ledger, header: bytes) -> None:
    """``header`` is accepted by the gate, then the connection is refused per source."""
    rejected = ledger.value("echo_connections_rejected_total", reason="per_source")
    reader, writer = await dial(h.ports[ledger.mode])
    writer.write(header)
    assert (await ending(reader))[0] == b""
    writer.close()
    await ledger.check("accepted", opened=0)
    assert ledger.value("echo_connections_rejected_total", reason="per_source") == rejected + 1


async def admitted(h: EchoHarness, ledger: Ledger, header: bytes) -> None:
    reader, writer = await dial(h.ports[ledger.mode])
    writer.write(header)
    await converse(reader, writer)
    await ledger.check("accepted")


def v1_tcp6(source: str) -> bytes:
    return f"PROXY TCP6 {source} ::1 40000 7000\r\n".encode()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "mapped",
    [
        pytest.param(encode_proxy_v2(("::ffff:10.1.2.3", 40000), ("::1", 7000)), id="v2-inet6"),
        pytest.param(v1_tcp6("::ffff:a01:203"), id="v1-tcp6-hex"),
        pytest.param(v1_tcp6("::ffff:10.1.2.3"), id="v1-tcp6-dotted"),
    ],
)
async def test_an_ipv4_mapped_client_is_counted_as_its_ipv4_address(
    servers: Servers, mode: str, mapped: bytes
) -> None:
    """A header naming ::ffff:10.1.2.3 is the client 10.1.2.3: with one connection per source,
    a second naming 10.1.2.3 (v1 TCP4, v2 INET) is refused ``per_source``; 10.1.2.4 is not.
    ``::ffff:10.1.2.3`` is RFC 5952's text for it (HAProxy writes a v1 TCP6 line so when the
    client is IPv4 and the server IPv6)."""
    h, ledger = await listener(servers, mode, limit_connections_per_source=1)
    first = await held(h, ledger, mapped)
    await refused_per_source(h, ledger, encode_proxy_v1(("10.1.2.3", 1), ("127.0.0.1", 2)))
    await refused_per_source(h, ledger, encode_proxy_v2(("10.1.2.3", 1), ("127.0.0.1", 2)))
    await admitted(h, ledger, encode_proxy_v1(("10.1.2.4", 1), ("127.0.0.1", 2)))
    await let_go(h, ledger, first)
    clients = {(s.attributes or {}).get("client.address") for s in ledger.new_spans()}
    assert clients == {"10.1.2.3", "10.1.2.4"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("version", [1, 2])
async def test_ipv6_clients_of_one_64_are_one_source(
    servers: Servers, mode: str, version: int
) -> None:
    """2001:db8::1 and 2001:db8::2 (one /64: one host) are one source; 2001:db8:0:1::1 is
    another."""
    encoder = encode_proxy_v1 if version == 1 else encode_proxy_v2
    h, ledger = await listener(servers, mode, limit_connections_per_source=1)
    first = await held(h, ledger, encoder(("2001:db8::1", 1), ("::1", 2)))
    await refused_per_source(h, ledger, encoder(("2001:db8::2", 1), ("::1", 2)))
    await refused_per_source(h, ledger, encoder(("2001:db8::ffff:1:2:3", 1), ("::1", 2)))
    await admitted(h, ledger, encoder(("2001:db8:0:1::1", 1), ("::1", 2)))
    await let_go(h, ledger, first)


@pytest.mark.parametrize("mode", MODES)
async def test_an_unknown_header_counts_as_the_proxys_own_address(
    servers: Servers, mode: str
) -> None:
    """v1 UNKNOWN (and v2 UNSPEC) name no client: the connection is the proxy's, 127.0.0.1,
    for per-source limits; a client the header names is another source."""
    h, ledger = await listener(servers, mode, limit_connections_per_source=1)
    first = await held(h, ledger, b"PROXY UNKNOWN\r\n")
    await refused_per_source(h, ledger, b"PROXY UNKNOWN\r\n")
    await refused_per_source(h, ledger, v2(0x21, 0x00, b""))
    await refused_per_source(h, ledger, encode_proxy_v2((PROXY, 1), ("127.0.0.1", 2)))
    await admitted(h, ledger, encode_proxy_v2(("10.0.0.5", 1), ("127.0.0.1", 2)))
    await let_go(h, ledger, first)


@pytest.mark.parametrize("mode", MODES)
async def test_bytes_after_a_header_refused_per_source_are_never_read(
    servers: Servers, mode: str
) -> None:
    """A connection refused per source (after its header) is closed at once: what came in the
    header's segment is not read, echoed or counted, as for a connection refused without a
    proxy."""
    h, ledger = await listener(servers, mode, limit_connections_per_source=1)
    named = encode_proxy_v2(("10.1.2.3", 1), ("127.0.0.1", 2))
    first = await held(h, ledger, named)
    reader, writer = await dial(h.ports[mode])
    writer.write(named + FRAME)
    assert (await ending(reader))[0] == b""
    writer.close()
    await ledger.check("accepted", opened=0)
    await let_go(h, ledger, first)
    # Only the first connection's frame was received and echoed.
    assert (ledger.received(), ledger.sent()) == (len(FRAME), len(FRAME))


@pytest.mark.parametrize("mode", MODES)
async def test_connections_awaiting_their_header_hold_a_slot(servers: Servers, mode: str) -> None:
    """With limit_connections=1, a connection still sending its header holds the slot: the
    next is closed, counted ``limit`` (header result and rejection reason); then the first
    completes its header and is served."""
    h, ledger = await listener(servers, mode, limit_connections=1)
    rejected = ledger.value("echo_connections_rejected_total", reason="limit")
    reader, writer = await dial(h.ports[mode])
    writer.write(V1[:10])
    await asyncio.sleep(0.05)
    other_reader, other_writer = await dial(h.ports[mode])
    other_writer.write(V2 + FRAME)
    assert (await ending(other_reader))[0] == b""
    other_writer.close()
    await ledger.check("limit")
    assert ledger.value("echo_connections_rejected_total", reason="limit") == rejected + 1
    writer.write(V1[10:])
    await converse(reader, writer)
    await ledger.check("accepted")


# -- hypothesis: the parser's verdict is the server's ---------------------------------------------
addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.just("127.0.0.1")),
    st.tuples(st.ip_addresses(v=6).map(str), st.just("::1")),
)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A valid header (v1 or v2, IPv4 or IPv6, maybe TLVs, maybe UNKNOWN/LOCAL)."""
    (src, dst), sport, dport = draw(addresses), draw(st.integers(0, 65535)), 7000
    kind = draw(st.sampled_from(["v1", "v2", "v2", "unknown", "local"]))
    if kind == "v1":
        return encode_proxy_v1((src, sport), (dst, dport))
    if kind == "unknown":
        return b"PROXY UNKNOWN\r\n"
    if kind == "local":
        return encode_proxy_v2(None, None)
    tlvs = draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=3))
    return encode_proxy_v2((src, sport), (dst, dport), tlvs)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """What a peer of the proxy's address sends: a valid header (maybe damaged) and a frame,
    or random bytes (maybe after a signature's start)."""
    frame = encode(draw(st.binary(max_size=64)))
    shape = draw(st.sampled_from(["valid", "valid", "byte", "cut", "random"]))
    if shape == "random":
        start = draw(st.sampled_from([b"", b"P", b"PROXY ", b"PROXY TCP4 ", SIG, SIG + b"\x21"]))
        return start + draw(st.binary(max_size=140))
    header = draw(headers())
    if shape == "byte":  # one byte changed
        i = draw(st.integers(0, len(header) - 1))
        header = header[:i] + bytes([draw(st.integers(0, 255))]) + header[i + 1 :]
    elif shape == "cut":  # stops short (maybe with the frame after the cut)
        header = header[: draw(st.integers(0, len(header) - 1))]
        return header + draw(st.sampled_from([b"", frame]))
    return header + frame


def verdict(data: bytes) -> tuple[str, bytes]:
    """The model: the result the parser gives the whole stream, and what follows an accepted
    header (the echo's input)."""
    parser = ProxyHeaderParser((1, 2))
    try:
        header = parser.feed(data) if data else None
    except ProxyHeaderError as exc:
        return exc.reason, b""
    if header is None:
        return ("incomplete" if data else "empty"), b""
    return ("local" if header.local else "accepted"), parser.rest


def echoed(rest: bytes) -> bytes:
    """The framed echo's replies to ``rest``: its whole frames, up to an oversize header."""
    try:
        frames = FrameDecoder(LIMIT).feed(rest)
    except FrameTooLarge as exc:
        frames = exc.frames
    return b"".join(encode(f) for f in frames)


def poll(predicate: Callable[[], bool]) -> None:
    end = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < end, "not reached in time"
        time.sleep(0.002)


def exchange(port: int, data: bytes, cuts: list[int]) -> bytes:
    """Send ``data`` cut at ``cuts`` (each piece a segment), then FIN; everything read until
    the server closes (EOF or reset) within the deadline."""
    points = sorted({0, len(data), *(c for c in cuts if 0 < c < len(data))})
    got = bytearray()
    with socket.socket() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(DEADLINE_S)
        sock.bind((PROXY, 0))
        sock.connect(("127.0.0.1", port))
        try:
            for a, b in itertools.pairwise(points):
                sock.sendall(data[a:b])
                time.sleep(0.001)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused meanwhile (a reset, a broken pipe, not connected any more)
        try:
            while chunk := sock.recv(1 << 16):
                got += chunk
        except ConnectionResetError:
            pass
    return bytes(got)


async def test_random_streams_get_the_parsers_verdict(servers: Servers) -> None:
    """Accepted iff the parser accepts the same bytes, and then the frames after the header
    are echoed exactly; otherwise closed, with the parser's reason counted once. (The examples
    run in a thread with blocking sockets; the server stays on this loop.)"""
    h, ledger = await listener(servers, "framed", max_frame_size=LIMIT)
    port = h.ports["framed"]

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=streams(), cuts=st.lists(st.integers(0, 200), max_size=5))
    def check(data: bytes, cuts: list[int]) -> None:
        result, rest = verdict(data)
        event(result)
        before = ledger.results()
        opened = ledger.value("echo_connections_opened_total")
        got = exchange(port, data, cuts)
        poll(
            lambda: (
                ledger.results()[result] == before[result] + 1
                and ledger.value("echo_connections_active") == 0
            )
        )
        assert ledger.results() == {**before, result: before[result] + 1}
        assert got == (echoed(rest) if result == "accepted" else b"")
        expected = opened + (result == "accepted")
        assert ledger.value("echo_connections_opened_total") == expected

    await asyncio.to_thread(check)


async def test_random_splits_of_a_valid_header_and_frame_are_echoed(
    servers: Servers,
) -> None:
    h, ledger = await listener(servers, "framed", max_frame_size=LIMIT)
    port = h.ports["framed"]

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        header=headers().filter(lambda b: b != encode_proxy_v2(None, None)),
        payload=st.binary(max_size=200),
        cuts=st.lists(st.integers(0, 300), max_size=8),
    )
    def check(header: bytes, payload: bytes, cuts: list[int]) -> None:
        data = header + encode(payload)
        assert verdict(data) == ("accepted", encode(payload))
        accepted = ledger.results()["accepted"]
        assert exchange(port, data, cuts) == encode(payload)
        poll(
            lambda: (
                ledger.results()["accepted"] == accepted + 1
                and ledger.value("echo_connections_active") == 0
            )
        )

    await asyncio.to_thread(check)


async def test_the_server_can_still_read_a_frame_after_the_header_with_read_frame(
    servers: Servers,
) -> None:
    """The framing client's own reader works behind the header (read_frame)."""
    h, ledger = await listener(servers, "framed")
    reader, writer = await dial(h.ports["framed"])
    writer.write(V2 + encode(b"one") + encode(b"two"))
    async with asyncio.timeout(DEADLINE_S):
        assert await read_frame(reader) == b"one"
        assert await read_frame(reader) == b"two"
    writer.write_eof()
    assert await ending(reader) == (b"", "eof")
    writer.close()
    await ledger.check("accepted")
