"""The echo service over real loopback sockets (in-process server, asyncio clients)."""

from __future__ import annotations

import asyncio
import random
import socket
import struct

import pytest
from opentelemetry.trace import SpanKind, StatusCode
from wirekit_harness import EchoHarness, StartEcho

from wirekit_framing import encode, read_frame, write_frame

CLIENTS = 100


async def _client_session(h: EchoHarness, mode: str, seed: int) -> int:
    """Send random payloads, check each echo byte for byte; return bytes sent."""
    rng = random.Random(seed)
    reader, writer = await h.connect(mode)
    sent = 0
    try:
        for _ in range(5):
            payload = rng.randbytes(rng.choice([0, 1, 100, 1500, 20_000, 70_000]))
            if mode == "framed":
                await write_frame(writer, payload)
                assert await read_frame(reader) == payload
                sent += len(payload) + 4
            elif payload:
                writer.write(payload)
                await writer.drain()
                assert await reader.readexactly(len(payload)) == payload
                sent += len(payload)
    finally:
        writer.close()
        await writer.wait_closed()
    return sent


@pytest.mark.parametrize("mode", ["raw", "framed"])
async def test_concurrent_clients_each_get_their_own_bytes(
    start_echo: StartEcho, mode: str
) -> None:
    async with start_echo(limit_connections_per_source=CLIENTS) as echo:  # all from 127.0.0.1
        totals = await asyncio.wait_for(
            asyncio.gather(*(_client_session(echo, mode, seed) for seed in range(CLIENTS))), 60
        )
        total = sum(totals)
        await echo.wait_for(lambda: echo.value("echo_connections_active", mode=mode) == 0)
        assert echo.value("echo_connections_opened_total", mode=mode) == CLIENTS
        assert echo.value("echo_received_bytes_total", mode=mode) == total
        assert echo.value("echo_sent_bytes_total", mode=mode) == total
        if mode == "framed":
            assert echo.value("echo_frames_total") == CLIENTS * 5
            assert echo.value("echo_handling_seconds_count") > 0


@pytest.mark.parametrize("how", ["reset", "eof"])
async def test_client_vanishing_mid_frame_does_not_disturb_others(
    echo: EchoHarness, how: str
) -> None:
    reader, writer = await echo.connect("framed")
    await write_frame(writer, b"warm-up")
    assert await read_frame(reader) == b"warm-up"
    others = asyncio.gather(*(_client_session(echo, "framed", s) for s in range(10)))
    writer.write(struct.pack("!I", 1000) + b"only part of it")
    await writer.drain()
    await asyncio.sleep(0.05)
    if how == "reset":
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        kind = "reset"
    else:
        writer.write_eof()
        kind = "incomplete_frame"
    await asyncio.wait_for(others, 30)
    await echo.wait_for(lambda: echo.value("echo_errors_total", mode="framed", kind=kind) == 1)
    writer.close()


async def test_oversize_frame_resets_that_connection_and_counts(start_echo: StartEcho) -> None:
    async with start_echo(max_frame_size=1024) as h:
        good_r, good_w = await h.connect("framed")
        bad_r, bad_w = await h.connect("framed")
        bad_w.write(struct.pack("!I", 2**32 - 1) + b"x" * 100)
        await bad_w.drain()
        with pytest.raises(ConnectionResetError):  # reset: nothing of it will be answered
            await asyncio.wait_for(bad_r.read(), 5)
        await write_frame(good_w, b"y" * 1024)
        assert await read_frame(good_r, 1024) == b"y" * 1024
        assert h.value("echo_errors_total", mode="framed", kind="frame_too_large") == 1
        for w in (good_w, bad_w):
            w.close()


async def test_idle_timeout_closes_silent_and_stalled_peers_but_not_active_ones(
    start_echo: StartEcho,
) -> None:
    async with start_echo(timeout_idle_s=0.4) as h:
        loop = asyncio.get_running_loop()
        silent_r, silent_w = await h.connect("raw")
        stalled_r, stalled_w = await h.connect("framed")
        stalled_w.write(b"\x00\x00\x00\x10half")  # a frame that never completes
        active_r, active_w = await h.connect("framed")
        start = loop.time()
        for _ in range(12):  # 1.2 s of traffic: three idle timeouts
            await write_frame(active_w, b"ping")
            assert await read_frame(active_r) == b"ping"
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(silent_r.read(), 5) == b""  # nothing lost: FIN
        with pytest.raises(ConnectionResetError):  # a frame left unanswered: RST
            await asyncio.wait_for(stalled_r.read(), 5)
        assert loop.time() - start < 5
        await write_frame(active_w, b"still here")
        assert await read_frame(active_r) == b"still here"
        assert h.value("echo_errors_total", mode="raw", kind="idle_timeout") == 1
        assert h.value("echo_errors_total", mode="framed", kind="idle_timeout") == 1
        for w in (silent_w, stalled_w, active_w):
            w.close()


async def test_over_the_connection_limit_a_client_is_refused_and_counted(
    start_echo: StartEcho,
) -> None:
    async with start_echo(limit_connections=3) as h:
        conns = [await h.connect("raw") for _ in range(3)]
        await h.wait_for(lambda: h.value("echo_connections_active", mode="raw") == 3)
        extra_r, extra_w = await h.connect("raw")
        assert await asyncio.wait_for(extra_r.read(), 5) == b""
        assert h.value("echo_connections_rejected_total", mode="raw", reason="limit") == 1
        for reader, writer in conns:  # the admitted ones are unaffected
            writer.write(b"ok")
            assert await reader.readexactly(2) == b"ok"
            writer.close()
        extra_w.close()
        # Once they are gone, a new client is admitted again.
        await h.wait_for(lambda: h.value("echo_connections_active", mode="raw") == 0)
        reader, writer = await h.connect("raw")
        writer.write(b"again")
        assert await reader.readexactly(5) == b"again"
        writer.close()


async def test_back_pressure_pauses_reading_instead_of_buffering(echo: EchoHarness) -> None:
    """A client that writes and never reads: the server stops reading; nothing piles up."""
    reader, writer = await echo.connect("raw")
    chunk = b"z" * 65536
    total = 64 * 1024 * 1024
    written = 0

    async def pump() -> None:
        nonlocal written
        while written < total:
            writer.write(chunk)
            written += len(chunk)
            await writer.drain()

    pumping = asyncio.create_task(pump())
    await asyncio.sleep(1.0)
    stalled_at = echo.value("echo_received_bytes_total", mode="raw")
    assert not pumping.done()
    # Bounded by socket buffers and the transport's high-water mark, far below what was offered.
    assert stalled_at < 16 * 1024 * 1024
    await asyncio.sleep(0.3)
    assert echo.value("echo_received_bytes_total", mode="raw") == stalled_at
    # Now read: everything comes back and the writer finishes.
    got = 0
    while got < total:
        data = await asyncio.wait_for(reader.read(1 << 20), 10)
        assert data
        assert data == b"z" * len(data)
        got += len(data)
    await asyncio.wait_for(pumping, 10)
    writer.close()


async def test_connection_span_is_recorded_with_network_attributes(echo: EchoHarness) -> None:
    reader, writer = await echo.connect("framed")
    await write_frame(writer, b"traced")
    assert await read_frame(reader) == b"traced"
    local_port = writer.get_extra_info("sockname")[1]
    writer.close()
    await echo.wait_for(lambda: len(echo.spans.get_finished_spans()) == 1)
    span = echo.spans.get_finished_spans()[0]
    assert span.name == "echo.framed connection"
    assert span.kind == SpanKind.SERVER
    attrs = dict(span.attributes or {})
    assert attrs["network.transport"] == "tcp"
    assert attrs["network.peer.address"] == "127.0.0.1"
    assert attrs["network.peer.port"] == local_port
    assert attrs["server.port"] == echo.ports["framed"]
    assert attrs["wirekit.echo.mode"] == "framed"
    assert attrs["wirekit.received_bytes"] == len(encode(b"traced"))
    assert span.status.status_code != StatusCode.ERROR


async def test_drain_delivers_in_flight_replies_then_closes(start_echo: StartEcho) -> None:
    """In-process drain: a large reply being written and a half-received frame both complete."""
    async with start_echo(timeout_drain_s=5.0) as h:
        big = random.Random(1).randbytes(4 * 1024 * 1024 // 4)
        r1, w1 = await h.connect("framed")
        await write_frame(w1, big)
        first = await r1.readexactly(4)  # the reply has started; the rest sits in buffers
        r2, w2 = await h.connect("framed")
        frame = encode(b"second half arrives after the signal")
        w2.write(frame[:10])
        await w2.drain()
        await asyncio.sleep(0.1)
        h.stop.set()
        await asyncio.sleep(0.1)
        w2.write(frame[10:])
        assert await asyncio.wait_for(read_frame(r2), 5) == frame[4:]
        assert await asyncio.wait_for(r2.read(), 5) == b""  # then EOF
        assert first == struct.pack("!I", len(big))
        assert await asyncio.wait_for(r1.readexactly(len(big)), 5) == big
        assert await asyncio.wait_for(r1.read(), 5) == b""
        for w in (w1, w2):
            w.close()
        assert h.task is not None
        assert await asyncio.wait_for(h.task, 5) == 0


async def test_framed_stream_of_sticky_frames_in_random_chunks(echo: EchoHarness) -> None:
    """Many frames in arbitrary chunks (reads end mid-header, mid-payload, on boundaries):
    the replies are exactly the frames, in order."""
    rng = random.Random(7)
    frames = [rng.randbytes(rng.choice([0, 1, 3, 4, 5, 100, 5000])) for _ in range(300)]
    wire = b"".join(encode(f) for f in frames)
    reader, writer = await echo.connect("framed")
    pos = 0
    while pos < len(wire):
        step = rng.choice([1, 2, 3, 4, 5, 7, 64, 1000, 9000])
        writer.write(wire[pos : pos + step])
        await writer.drain()
        pos += step
        if rng.random() < 0.3:
            await asyncio.sleep(0.001)  # let the server read this piece on its own
    got = [await asyncio.wait_for(read_frame(reader), 10) for _ in frames]
    assert got == frames
    writer.close()
