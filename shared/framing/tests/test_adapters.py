"""The blocking-socket and asyncio adapters over real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from wirekit_framing import (
    FrameTooLarge,
    IncompleteFrame,
    encode,
    read_frame,
    recv_frame,
    send_frame,
    write_frame,
)


def test_socket_roundtrip_and_clean_eof() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, b"one")
        send_frame(a, b"")
        a.sendall(encode(b"three")[:3])  # a frame delivered in two pieces
        threading.Timer(0.05, lambda: a.sendall(encode(b"three")[3:])).start()
        assert recv_frame(b) == b"one"
        assert recv_frame(b) == b""
        assert recv_frame(b) == b"three"
        a.shutdown(socket.SHUT_WR)
        assert recv_frame(b) is None


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        pytest.param(b"\x00\x00", IncompleteFrame, id="eof-mid-header"),
        pytest.param(b"\x00\x00\x00\x09abc", IncompleteFrame, id="eof-mid-payload"),
        pytest.param(b"\xff\xff\xff\xff", FrameTooLarge, id="too-large"),
    ],
)
def test_socket_errors(wire: bytes, error: type[Exception]) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(wire)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(error):
            recv_frame(b, max_frame_size=1024)


async def test_asyncio_roundtrip_over_tcp() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (frame := await read_frame(reader)) is not None:
            await write_frame(writer, frame[::-1])
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for payload in (b"abc", b"", b"x" * 100_000):
            await write_frame(writer, payload)
            assert await read_frame(reader) == payload[::-1]
        writer.write(b"\x00\x00\x00\x05ab")
        writer.write_eof()
        # The server sees IncompleteFrame, its handler dies, the connection closes.
        assert await reader.read() == b""
        writer.close()


async def test_asyncio_reader_errors() -> None:
    for wire, error in ((b"\x00\x00", IncompleteFrame), (b"\x00\x00\x04\x01", FrameTooLarge)):
        reader = asyncio.StreamReader()
        reader.feed_data(wire)
        reader.feed_eof()
        with pytest.raises(error):
            await read_frame(reader, max_frame_size=1024)
