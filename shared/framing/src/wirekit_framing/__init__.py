"""wirekit_framing: the length-prefixed wire format shared by every wirekit TCP protocol.

A 4-byte unsigned big-endian length precedes each payload, so a receiver always knows where a
message ends (the fix for TCP's "sticky packets"). The codec is sans-I/O (:func:`encode`,
:class:`FrameDecoder`); thin adapters serve blocking sockets and asyncio streams. Servers built on
``asyncio.Protocol`` feed :class:`FrameDecoder` directly from ``data_received``.
"""

from ._asyncio import read_frame, write_frame
from ._codec import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    HEADER_SIZE,
    MAX_WIRE_FRAME_SIZE,
    FrameDecoder,
    encode,
    encode_many,
)
from ._errors import FrameTooLarge, FramingError, IncompleteFrame
from ._socket import recv_frame, send_frame

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER",
    "HEADER_SIZE",
    "MAX_WIRE_FRAME_SIZE",
    "FrameDecoder",
    "FrameTooLarge",
    "FramingError",
    "IncompleteFrame",
    "encode",
    "encode_many",
    "read_frame",
    "recv_frame",
    "send_frame",
    "write_frame",
]
