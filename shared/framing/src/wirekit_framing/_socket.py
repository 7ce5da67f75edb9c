"""Blocking-socket helpers for simple clients: one frame per call."""

from __future__ import annotations

import socket

from ._codec import DEFAULT_MAX_FRAME_SIZE, HEADER, HEADER_SIZE, encode
from ._errors import FrameTooLarge, IncompleteFrame

__all__ = ["recv_frame", "send_frame"]


def send_frame(
    sock: socket.socket, payload: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> None:
    """Send one frame with a single ``sendall`` (header and payload together)."""
    sock.sendall(encode(payload, max_frame_size))


def _recv_exactly(sock: socket.socket, n: int, got_before: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise IncompleteFrame(missing=n - got, buffered=got_before + got)
        got += k
    return buf


def recv_frame(sock: socket.socket, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes | None:
    """Receive one frame. ``None`` on a clean end of stream (EOF between frames).

    Raises :class:`IncompleteFrame` on EOF inside a frame, :class:`FrameTooLarge` (before reading
    the payload) when the header claims more than ``max_frame_size``.
    """
    first = sock.recv(HEADER_SIZE)
    if not first:
        return None
    header = first + _recv_exactly(sock, HEADER_SIZE - len(first), len(first))
    (size,) = HEADER.unpack(header)
    if size > max_frame_size:
        raise FrameTooLarge(size, max_frame_size)
    return bytes(_recv_exactly(sock, size, HEADER_SIZE)) if size else b""
