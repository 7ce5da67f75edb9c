"""The echo service against hostile clients and an unlucky network, each case a repro of a
defect it once had (issue 10): reply streams compared byte for byte with a model, deadlines,
limits, and the drain's guarantee under SIGTERM. After each case: no connection left in the
gauges, no traceback in the log."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from wirekit_harness import EchoHarness, StartEcho
from wirekit_testkit import ServiceProcess, service_process

from wirekit_framing import encode, encode_many

MODES = ["raw", "framed"]


@contextlib.contextmanager
def echo_process(*args: str) -> Iterator[ServiceProcess]:
    ports0 = ("--raw-port", "0", "--framed-port", "0", "--metrics-port", "0")
    with service_process("wirekit_echo", *ports0, *args) as proc:
        yield proc


def connect(port: int, source: str = "127.0.0.1", rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the server sends, and how it ended: ``eof`` (FIN) or ``reset`` (RST)."""
    got = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            got += chunk
    except ConnectionResetError:
        return bytes(got), "reset"
    return bytes(got), "eof"


async def test_whole_frames_then_exactly_one_header_are_echoed_once(echo: EchoHarness) -> None:
    """Defect 1: `00000001 61 00000005`, then `hello` 300 ms later, came back with the second
    header twice (the read was reflected whole, then the frame re-encoded)."""
    reader, writer = await echo.connect("framed")
    writer.write(bytes.fromhex("000000016100000005"))
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.write(b"hello")
    await writer.drain()
    expected = bytes.fromhex("000000016100000005") + b"hello"
    assert await asyncio.wait_for(reader.readexactly(len(expected)), 5) == expected
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # nothing more: no extra header
    writer.close()
    await echo.wait_for(lambda: echo.value("echo_connections_active", mode="framed") == 0)


async def test_frames_before_an_oversize_header_in_the_same_read_are_answered(
    start_echo: StartEcho,
) -> None:
    """Defect 5: frames that preceded an oversize header in one read were never answered."""
    async with start_echo(max_frame_size=100) as h:
        reader, writer = await h.connect("framed")
        good = encode(b"first") + encode(b"") + encode(b"x" * 100)
        writer.write(good + struct.pack("!I", 101) + b"y" * 50)
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(len(good)), 5) == good
        with pytest.raises(ConnectionResetError):  # then a reset: the rest is never answered
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await h.wait_for(lambda: h.value("echo_connections_active", mode="framed") == 0)
        assert h.value("echo_errors_total", mode="framed", kind="frame_too_large") == 1
        assert h.value("echo_frames_total") == 3


async def test_a_whole_read_of_frames_is_bounded_like_any_other(start_echo: StartEcho) -> None:
    """A read that is exactly whole frames is answered without the decoder (the C build's
    shortcut): frames at the limit pass, a whole frame one byte over it is refused as
    always -- the frames before it in the read answered, then a reset."""
    async with start_echo(max_frame_size=100) as h:
        reader, writer = await h.connect("framed")
        at_limit = encode(b"a" * 100) + encode(b"") + encode(b"b" * 7)
        writer.write(at_limit)
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(len(at_limit)), 5) == at_limit
        assert h.value("echo_frames_total") == 3
        writer.write(encode(b"c") + struct.pack("!I", 101) + b"d" * 101)  # whole, but over
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(5), 5) == encode(b"c")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await h.wait_for(lambda: h.value("echo_connections_active", mode="framed") == 0)
        assert h.value("echo_errors_total", mode="framed", kind="frame_too_large") == 1
        assert h.value("echo_frames_total") == 4
        # a header with its top bit set, alone in a read: a large size, never a negative one
        reader, writer = await h.connect("framed")
        writer.write(struct.pack("!I", 2**31))
        await writer.drain()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await h.wait_for(lambda: h.value("echo_connections_active", mode="framed") == 0)
        assert h.value("echo_errors_total", mode="framed", kind="frame_too_large") == 2


@pytest.mark.parametrize("mode", MODES)
async def test_idle_timeout_never_closes_early(start_echo: StartEcho, mode: str) -> None:
    """Defect 4: with a 2 s timeout, silent connections were closed after 1.6-2.0 s. The
    window is 1.0-1.25 timeouts (checked: never below 1.0; above, only a generous bound)."""
    timeout = 0.8
    async with start_echo(timeout_idle_s=timeout) as h:
        loop = asyncio.get_running_loop()
        for _ in range(3):  # admitted at different phases of the sweeper
            reader, writer = await h.connect(mode)
            opened = loop.time()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            elapsed = loop.time() - opened
            assert elapsed >= timeout, f"closed after {elapsed:.3f} s, before {timeout} s"
            assert elapsed < timeout * 1.25 + 1.0
            writer.close()
            await asyncio.sleep(random.random() * timeout / 4)
        assert h.value("echo_errors_total", mode=mode, kind="idle_timeout") == 3


async def test_a_trickled_frame_is_reset_at_the_frame_deadline(start_echo: StartEcho) -> None:
    """Defect 3: one byte of a 1,000-byte frame every 0.1 s is activity, so the idle timeout
    never fired; the frame deadline does."""
    async with start_echo(timeout_idle_s=30, timeout_frame_s=1.0) as h:
        loop = asyncio.get_running_loop()
        reader, writer = await h.connect("framed")
        writer.write(struct.pack("!I", 1000))
        started = loop.time()
        closed = asyncio.ensure_future(reader.read())
        sent = 0
        while not closed.done() and loop.time() - started < 10:
            with contextlib.suppress(ConnectionError):
                writer.write(b"t")
                sent += 1
            await asyncio.sleep(0.1)
        with pytest.raises(ConnectionResetError):
            await closed
        elapsed = loop.time() - started
        assert 1.0 <= elapsed < 5, elapsed
        assert sent < 1000
        writer.close()
        await h.wait_for(lambda: h.value("echo_connections_active", mode="framed") == 0)
        assert h.value("echo_errors_total", mode="framed", kind="frame_timeout") == 1
        assert h.value("echo_errors_total", mode="framed", kind="idle_timeout") == 0


async def test_tricklers_from_one_address_cannot_deny_service_to_another(
    start_echo: StartEcho,
) -> None:
    """Defect 3: five tricklers held five slots for ever, 1,024 held the listener. Now one
    source holds at most limit_connections_per_source slots, each until its frame deadline."""
    async with start_echo(
        limit_connections=6, limit_connections_per_source=3, timeout_frame_s=1.0
    ) as h:
        port = h.ports["framed"]

        async def trickler() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            sock = connect(port, source="127.0.0.2")
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(struct.pack("!I", 1000) + b"t")
            return reader, writer

        tricklers = [await trickler() for _ in range(10)]
        await h.wait_for(
            lambda: (
                h.value("echo_connections_rejected_total", mode="framed", reason="per_source") == 7
            )
        )
        assert h.value("echo_connections_active", mode="framed") == 3
        # A client from another address is served at once, and again after the deadline.
        for _ in range(2):
            sock = connect(port, source="127.0.0.3")
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(encode(b"good client"))
            assert await asyncio.wait_for(reader.readexactly(15), 5) == encode(b"good client")
            writer.close()
            await h.wait_for(
                lambda: h.value("echo_connections_active", mode="framed") == 0, limit_s=10
            )
        assert h.value("echo_errors_total", mode="framed", kind="frame_timeout") == 3
        for _, writer in tricklers:
            writer.close()


@pytest.mark.parametrize("mode", MODES)
async def test_data_after_the_servers_end_of_stream_is_reset_and_counted(
    start_echo: StartEcho, mode: str
) -> None:
    """The drain half-closes a quiet connection; what the client sends after that FIN can
    never be answered: a reset and `unanswered`, never a silent drop."""
    async with start_echo(timeout_drain_s=10) as h:
        reader, writer = await h.connect(mode)
        message = encode(b"before") if mode == "framed" else b"before"
        writer.write(message)
        assert await asyncio.wait_for(reader.readexactly(len(message)), 5) == message
        h.stop.set()  # the drain: quiet for 0.2 s, then the server's FIN
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.write(message)  # too late
        await h.wait_for(lambda: h.value("echo_errors_total", mode=mode, kind="unanswered") == 1)
        writer.close()


# -- the drain under slow, pipelining readers -------------------------------------------------
@dataclass
class Pipeliner:
    """A client that sends ``frames`` as fast as the server takes them, reading slowly (a small
    receive buffer, one read of at most ``rcvbuf`` bytes every 20 ms) in another thread."""

    port: int
    mode: str
    frames: list[bytes]
    rcvbuf: int
    wire: bytes = b""
    got: bytes = b""
    ending: str = ""
    send_reset: bool = False
    error: BaseException | None = None
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.wire = encode_many(self.frames) if self.mode == "framed" else b"".join(self.frames)
        self.sock = connect(self.port, rcvbuf=self.rcvbuf)
        self.threads = [threading.Thread(target=self._send), threading.Thread(target=self._read)]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        try:
            self.sock.sendall(self.wire)
        except (ConnectionResetError, BrokenPipeError):
            # The reset reached this thread first (the kernel reports it once per socket).
            self.send_reset = True

    def _read(self) -> None:
        got = bytearray()
        try:
            while True:
                time.sleep(0.02)
                chunk = self.sock.recv(self.rcvbuf)
                if not chunk:
                    self.ending = "eof"
                    break
                got += chunk
        except ConnectionResetError:
            self.ending = "reset"
        except BaseException as exc:  # a timeout: the test fails with it
            self.error = exc
        self.got = bytes(got)

    def join(self) -> None:
        for t in self.threads:
            t.join(60)
        self.sock.close()
        if self.send_reset:
            self.ending = "reset"


DRAIN_CASES = [
    # (drain deadline, clients, frames of 16 KiB per client, client receive buffer, seed)
    pytest.param(10.0, 50, (20, 60), 4096, 1, id="50-clients-all-answered"),
    # More than the kernel's socket buffers hold (~4 MiB each way): reading is paused by
    # back-pressure when the signal comes. Time enough to answer all...
    pytest.param(10.0, 8, (400, 500), 65536, 2, id="8-clients-paused-all-answered"),
    # ... or not: the deadline comes first.
    pytest.param(0.5, 8, (400, 500), 4096, 3, id="8-clients-paused-deadline-first"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("drain_s", "count", "frames", "rcvbuf", "seed"), DRAIN_CASES)
def test_sigterm_with_slow_pipelining_readers_answers_all_or_resets(
    mode: str, drain_s: float, count: int, frames: tuple[int, int], rcvbuf: int, seed: int
) -> None:
    """Defect 2: 50 slow pipelining clients, then SIGTERM: thousands of frames sent before the
    signal got no reply, yet every client saw a clean EOF. Now a client either reads every
    reply and then EOF, or is reset (and the server counts it); never EOF after a loss."""
    rng = random.Random(seed)
    args = ("--timeout-drain-s", str(drain_s), "--limit-connections-per-source", "100")
    with echo_process(*args) as proc:
        port = proc.ports[mode]
        clients = [
            Pipeliner(
                port, mode, [rng.randbytes(16384) for _ in range(rng.randint(*frames))], rcvbuf
            )
            for _ in range(count)
        ]
        for c in clients:
            c.start()
        time.sleep(rng.uniform(0.1, 1.5))  # SIGTERM at a random moment of the exchange
        proc.popen.send_signal(signal.SIGTERM)
        for c in clients:
            c.join()
        assert proc.popen.wait(30) == 0
        time.sleep(0.1)  # the last log lines
        proc.assert_clean_log()
    resets = 0
    for c in clients:
        assert c.error is None, c.error
        assert c.wire.startswith(c.got), "a reply that was not sent, or out of order"
        if c.ending == "eof":
            assert c.got == c.wire, f"EOF after {len(c.got)} of {len(c.wire)} bytes"
        else:
            assert c.ending == "reset"
            resets += 1
    counted = [line for line in proc.lines if '"connection error"' in line
               and ('"shutdown"' in line or '"unanswered"' in line)]  # fmt: skip
    assert len(counted) == resets
    if drain_s >= 10:
        assert resets == 0  # time enough for every reply
    else:
        assert resets > 0  # the deadline came first for some: they were told
