"""Socket-level helpers of the TCP protocols: what is queued in each direction, and closing
with a reset (RST) instead of a FIN."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import sys
import termios

__all__ = ["reset", "reset_when_delivered", "undelivered_bytes", "unread_bytes"]

_TIOCOUTQ: int = getattr(termios, "TIOCOUTQ", 0x5411)  # Linux; absent from typeshed


def _queue_bytes(transport: asyncio.BaseTransport, request: int) -> int:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        got = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(got, sys.byteorder, signed=True)


def unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes waiting in the socket's receive queue, not yet read (``FIONREAD``)."""
    return _queue_bytes(transport, termios.FIONREAD)


def undelivered_bytes(transport: asyncio.WriteTransport) -> int:
    """Bytes written to the socket that the peer has not acknowledged yet (``TIOCOUTQ``: unsent
    plus unacknowledged), plus what the transport still buffers."""
    return transport.get_write_buffer_size() + _queue_bytes(transport, _TIOCOUTQ)


def reset(transport: asyncio.Transport) -> None:
    """Close with a TCP reset (RST), not a FIN: the peer learns that what it sent was not all
    answered. Whatever is still queued for it is discarded."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


#: How long replies already written get to reach the peer before a reset that would discard
#: them (:func:`reset_when_delivered`); a peer that does not read is reset after this.
DELIVERY_GRACE_S = 2.0
_DELIVERY_POLL_S = 0.01


def reset_when_delivered(transport: asyncio.Transport, grace_s: float = DELIVERY_GRACE_S) -> None:
    """Stop reading, let what was written reach the peer (acknowledged by its TCP), then reset.
    The peer reads every reply sent before the error, then gets the reset; one that does not
    read gets it after ``grace_s``."""
    transport.pause_reading()
    loop = asyncio.get_running_loop()
    end = loop.time() + grace_s

    def check() -> None:
        if transport.is_closing():
            return
        if not undelivered_bytes(transport) or loop.time() >= end:
            reset(transport)
        else:
            loop.call_later(_DELIVERY_POLL_S, check)

    check()


_LINGER_RESET = struct.pack("ii", 1, 0)
