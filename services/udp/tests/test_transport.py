"""The endpoint's transport, whichever the build uses: the C build's ``_hot.DatagramIO`` (every
bind; ``recvmmsg`` in batches, answers sent at once, source addresses cached as tuples,
``datagram_received`` called in C), else asyncio's (uvloop's) or ``PktinfoTransport`` on a
wildcard bind. Each test runs a real socket on loopback with a recording protocol and checks
what arrives where: queued bursts, more sources than the address cache has slots, IPv6 address
tuples, a protocol that raises, sends the kernel refuses, a transport closed in the middle of a
batch."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from wirekit_udp import _hot
from wirekit_udp.pktinfo import CTransport, PktinfoTransport, open_pktinfo_endpoint

DEADLINE_S = 10.0
MAX_SIZE = 1472
COMPILED = getattr(_hot, "DatagramIO", None) is not None


class Recorder(asyncio.DatagramProtocol):
    """Echoes what it gets (to the address given, or to ``to``), records it, raises on
    b"boom", closes its transport on b"close"."""

    def __init__(self, to: Any = None) -> None:
        self.transport: Any = None
        self.got: list[tuple[bytes, Any]] = []
        self.errors: list[OSError] = []
        self.to = to
        self.changed = asyncio.Event()  # set on each datagram and error

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append((data, addr))
        self.changed.set()
        if data == b"close":
            self.transport.close()
            return
        self.transport.sendto(data, self.to if self.to is not None else addr)
        if data == b"boom":
            raise RuntimeError("boom")

    def error_received(self, exc: Exception) -> None:
        assert isinstance(exc, OSError)
        self.errors.append(exc)
        self.changed.set()

    async def until(self, predicate: Any) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def endpoint(host: str, protocol: Recorder) -> AsyncIterator[int]:
    transport = await open_pktinfo_endpoint(MAX_SIZE)(lambda: protocol, host, 0, False)
    try:
        assert protocol.transport is transport
        if COMPILED:
            assert type(transport) is CTransport
        elif host in ("0.0.0.0", "::"):
            assert type(transport) is PktinfoTransport
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def exchange(
    family: int, server: tuple[Any, ...], payloads: list[bytes], bind: tuple[Any, ...] | None
) -> tuple[tuple[Any, ...], list[bytes]]:
    """Send every payload (all of them before reading), then read as many answers."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(DEADLINE_S)
        if bind is not None:
            s.bind(bind)
        for payload in payloads:
            s.sendto(payload, server)
        answers = [s.recvfrom(MAX_SIZE + 1) for _ in payloads]
        assert all(src[:2] == server[:2] for _, src in answers), answers
        return s.getsockname(), [data for data, _ in answers]


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1", "::"])
async def test_a_burst_queued_before_a_read_is_all_answered_in_order(host: str) -> None:
    """100 datagrams sent before the endpoint reads any: more than a batch (16) and a
    callback's worth (64) of them, each answered once, in order, to its source."""
    protocol = Recorder()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    target = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    payloads = [b"%d " % i + bytes(i) for i in range(100)]
    async with endpoint(host, protocol) as port:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(DEADLINE_S)
            s.bind((target, 0))
            for payload in payloads:  # the loop is not running meanwhile: they all queue
                s.sendto(payload, (target, port))
            answers = await asyncio.to_thread(lambda: [s.recv(MAX_SIZE + 1) for _ in payloads])
            me = s.getsockname()
    assert answers == payloads
    assert [data for data, _ in protocol.got] == payloads
    # the source as Python's socket module gives it: (host, port) or (host, port, 0, 0)
    assert {addr for _, addr in protocol.got} == {me}


async def test_more_sources_than_cached_addresses_each_get_their_own_answers() -> None:
    """600 sources (three addresses x the same 200 ports: more than the C build's 256 cached
    address tuples, so slots are taken over), in two rounds: every answer reaches its own
    source."""
    protocol = Recorder()
    async with endpoint("0.0.0.0", protocol) as port:
        clients = []
        try:
            ports: list[int] = []
            for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
                for i in range(200):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    clients.append(s)
                    # the same 200 ports on each address: only the address tells them apart
                    s.bind((host, ports[i] if len(ports) == 200 else 0))
                    if len(ports) < 200:
                        ports.append(s.getsockname()[1])
                    s.settimeout(DEADLINE_S)
            for round_ in range(2):
                for i, s in enumerate(clients):
                    s.sendto(b"%d %d" % (round_, i), ("127.0.0.1", port))
                    if i % 50 == 49:  # bounded: the socket's buffer holds 50 at once
                        n = round_ * len(clients) + i + 1
                        await protocol.until(lambda n=n: len(protocol.got) >= n)
                got = await asyncio.to_thread(lambda: [s.recv(100) for s in clients])
                assert got == [b"%d %d" % (round_, i) for i in range(len(clients))]
            sources = {addr for _, addr in protocol.got}
            assert sources == {s.getsockname() for s in clients}
        finally:
            for s in clients:
                s.close()


async def test_ipv6_sources_are_four_tuples_as_pythons_socket_gives_them() -> None:
    protocol = Recorder()
    async with endpoint("::", protocol) as port:
        me, answers = await asyncio.to_thread(
            exchange, socket.AF_INET6, ("::1", port, 0, 0), [b"six"], ("::1", 0, 0, 0)
        )
        me4, answers4 = await asyncio.to_thread(
            exchange, socket.AF_INET, ("127.0.0.1", port), [b"four"], ("127.0.0.1", 0)
        )
    assert (answers, answers4) == ([b"six"], [b"four"])
    assert protocol.got == [(b"six", me), (b"four", (f"::ffff:{me4[0]}", me4[1], 0, 0))]
    assert all(type(x) is int for _, addr in protocol.got for x in addr[1:])


async def test_a_protocol_that_raises_loses_no_datagram() -> None:
    """datagram_received raises on the second of five queued datagrams: the loop's exception
    handler hears of it, and all five are handed over and answered."""
    protocol = Recorder()
    loop = asyncio.get_running_loop()
    raised: list[BaseException | None] = []
    loop.set_exception_handler(lambda _, context: raised.append(context.get("exception")))
    try:
        async with endpoint("127.0.0.1", protocol) as port:
            payloads = [b"one", b"boom", b"three", b"four", b"five"]
            _, answers = await asyncio.to_thread(
                exchange, socket.AF_INET, ("127.0.0.1", port), payloads, None
            )
    finally:
        loop.set_exception_handler(None)
    assert answers == payloads
    assert [data for data, _ in protocol.got] == payloads
    assert [type(exc) for exc in raised] == [RuntimeError]


async def test_a_send_the_kernel_refuses_is_reported_and_the_rest_go_on() -> None:
    """Answers to the broadcast address (no SO_BROADCAST: EACCES) are reported to
    error_received, each, and the transport goes on reading and answering."""
    protocol = Recorder(to=("255.255.255.255", 9))
    async with endpoint("127.0.0.1", protocol) as port:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for payload in (b"a", b"b", b"c"):
                s.sendto(payload, ("127.0.0.1", port))
            await protocol.until(lambda: len(protocol.got) == 3)
        assert [exc.errno for exc in protocol.errors] == [13, 13, 13]  # EACCES
        protocol.to = None
        _, answers = await asyncio.to_thread(
            exchange, socket.AF_INET, ("127.0.0.1", port), [b"still here"], None
        )
    assert answers == [b"still here"]


async def test_a_transport_closed_in_the_middle_of_a_batch_reads_and_sends_nothing_more() -> None:
    protocol = Recorder()
    async with endpoint("127.0.0.1", protocol) as port:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.5)
            for payload in (b"first", b"close", b"after"):
                s.sendto(payload, ("127.0.0.1", port))
            await protocol.until(lambda: protocol.transport.is_closing())
            await asyncio.sleep(0.1)
            assert s.recv(100) == b"first"
            with pytest.raises(TimeoutError):
                s.recv(100)
    assert [data for data, _ in protocol.got] == [b"first", b"close"]
    if COMPILED:  # (asyncio's transport raises AttributeError here: its socket is gone)
        protocol.transport.sendto(b"late", ("127.0.0.1", port))  # closed: nothing, no error


def _context() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from wirekit_udp.protocol import UdpContext
    from wirekit_udp.settings import UdpSettings

    return UdpContext.build(UdpSettings(), CollectorRegistry(), TracerProvider().get_tracer("t"),
                            clock=lambda: 0.0)  # fmt: skip


async def test_a_datagram_over_the_limit_is_counted_at_its_real_length() -> None:
    """5,000 bytes to a 1,472-byte limit: dropped as oversize, its 5,000 bytes counted (asyncio's
    transport gives the whole datagram; the C build's reads its length with MSG_TRUNC)."""
    from wirekit_udp.protocol import UdpEcho

    ctx = _context()
    transport = await open_pktinfo_endpoint(MAX_SIZE)(lambda: UdpEcho(ctx), "127.0.0.1", 0, False)
    try:
        port = transport.get_extra_info("sockname")[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(bytes(5000), ("127.0.0.1", port))
            s.sendto(b"fits", ("127.0.0.1", port))
            s.settimeout(DEADLINE_S)
            assert await asyncio.to_thread(s.recv, 100) == b"fits"
    finally:
        transport.close()
    stats = ctx.metrics
    assert (stats.dropped["oversize"].n, stats.dropped_bytes.n) == (1, 5000)
    assert (stats.received.n, stats.received_bytes.n) == (2, 5004)


def queued(payloads: list[bytes]) -> tuple[socket.socket, socket.socket]:
    """A bound server socket with ``payloads`` waiting in it, and the client that sent them."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for payload in payloads:
        client.sendto(payload, server.getsockname())
    return server, client


class Raiser(Recorder):
    def __init__(self, raises: dict[bytes, BaseException]) -> None:
        super().__init__()
        self.raises = raises

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append((data, addr))
        if data in self.raises:
            raise self.raises[data]


def test_the_c_transport_raises_an_interrupt_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An Exception lets the batch go on (the first is raised after it); a KeyboardInterrupt or
    SystemExit is raised at once, before the next datagram is handed over (an Exception before
    it is reported as unraisable)."""
    if not COMPILED:
        assert _hot.DatagramIO is None  # the pure build: asyncio's transport
        return
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_type))
    cases: list[tuple[dict[bytes, BaseException], type[BaseException], int, list[Any]]] = [
        ({b"2": RuntimeError("2")}, RuntimeError, 5, []),
        ({b"2": KeyboardInterrupt()}, KeyboardInterrupt, 2, []),
        ({b"2": RuntimeError("2"), b"3": SystemExit(3)}, SystemExit, 3, [RuntimeError]),
        ({b"2": RuntimeError("2"), b"4": ValueError("4")}, RuntimeError, 5, [ValueError]),
    ]
    for raises, want, handed, reported in cases:
        unraisable.clear()
        server, client = queued([b"1", b"2", b"3", b"4", b"5"])
        with server, client:
            protocol = Raiser(raises)
            io = _hot.DatagramIO(server, protocol, MAX_SIZE + 1, False)
            with pytest.raises(want):
                io.read()
            assert [data for data, _ in protocol.got] == [b"1", b"2", b"3", b"4", b"5"][:handed]
            assert unraisable == reported
            io.close()


def test_the_c_transport_holds_its_socket_and_sees_overrides() -> None:
    if not COMPILED:
        assert _hot.DatagramIO is None
        return
    from wirekit_udp.protocol import UdpEcho

    server, client = queued([b"hello"])
    with client:
        io = _hot.DatagramIO(server, Recorder(), MAX_SIZE + 1, False)
        del server
        gc.collect()  # the socket is the IO's too: its fd stays open and its own
        client.settimeout(DEADLINE_S)
        io.sendto(b"still mine", client.getsockname())
        assert client.recv(100) == b"still mine"
        io.close()
    echo = UdpEcho(_context())
    assert _hot.DatagramIO(socket.socket(), echo, 10, False).direct
    seen: list[bytes] = []
    echo.datagram_received = lambda data, addr: seen.append(data)  # type: ignore[method-assign]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert not _hot.DatagramIO(sock, echo, 10, False).direct  # the override is called


def test_the_c_transport_checks_what_it_is_given() -> None:
    if not COMPILED:
        assert _hot.DatagramIO is None  # the pure build: asyncio's transport, tested above
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        io = _hot.DatagramIO(sock, Recorder(), MAX_SIZE + 1, False)
        assert (io.direct, io.pktinfo, io.closing) == (False, False, False)
        with pytest.raises(ValueError, match="not a numeric address"):
            io.sendto(b"x", ("localhost", 9))
        with pytest.raises(OverflowError, match="port must be 0-65535"):
            io.sendto(b"x", ("127.0.0.1", 70000))
        with pytest.raises(TypeError, match="an address is a tuple"):
            io.sendto(b"x", "127.0.0.1")
        with pytest.raises(TypeError):
            io.sendto(b"x", ("127.0.0.1", 9, 0, 0))  # an IPv4 socket's address has two parts
        with pytest.raises(ValueError, match="size must be 1 to 65536"):
            _hot.DatagramIO(sock, Recorder(), 0, False)
        io.close()
        assert io.closing
        io.sendto(b"x", ("127.0.0.1", 9))  # closing: nothing sent, no error
        assert io.read() is None
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix,
        pytest.raises(ValueError, match="family must be AF_INET or AF_INET6"),
    ):
        _hot.DatagramIO(unix, Recorder(), 10, False)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        io = _hot.DatagramIO(sock, Recorder(), MAX_SIZE + 1, True)
        assert io.pktinfo
        with pytest.raises(ValueError, match="not a numeric address"):
            io.sendto(b"x", ("127.0.0.1", 9))  # an IPv6 socket takes IPv6 (or mapped) ones
        with pytest.raises(OverflowError, match="flowinfo"):
            io.sendto(b"x", ("::1", 9, 1 << 20, 0))
