"""wirekit_framing: the length-prefixed wire format shared by every wirekit TCP protocol.

A 4-byte unsigned big-endian length precedes each payload, so a receiver always knows where a
message ends (the fix for TCP's "sticky packets"). The codec is sans-I/O (:func:`encode`,
:class:`FrameDecoder`); thin adapters serve blocking sockets and asyncio streams. Servers built on
``asyncio.Protocol`` feed :class:`FrameDecoder` directly from ``data_received``.

Beside it, the other header a TCP service may see first: the PROXY protocol (v1 and v2) that a
load balancer puts before the client's bytes (:class:`ProxyHeaderParser`), sans-I/O too.
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
from ._proxy import (
    MAX_V1_LINE,
    MAX_V2_LENGTH,
    IncompleteProxyHeader,
    MalformedProxyHeader,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    ProxyHeaderTooLong,
    ProxySignatureError,
    encode_proxy_v1,
    encode_proxy_v2,
)
from ._socket import recv_frame, send_frame

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER",
    "HEADER_SIZE",
    "MAX_V1_LINE",
    "MAX_V2_LENGTH",
    "MAX_WIRE_FRAME_SIZE",
    "FrameDecoder",
    "FrameTooLarge",
    "FramingError",
    "IncompleteFrame",
    "IncompleteProxyHeader",
    "MalformedProxyHeader",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderParser",
    "ProxyHeaderTooLong",
    "ProxySignatureError",
    "encode",
    "encode_many",
    "encode_proxy_v1",
    "encode_proxy_v2",
    "read_frame",
    "recv_frame",
    "send_frame",
    "write_frame",
]
