"""The wire format and its sans-I/O codec: bytes in, frames out.

Every frame is a 4-byte unsigned big-endian length N followed by N payload bytes::

     0               4                          4+N
     +---------------+--------------------------+
     | N (u32, BE)   |  payload (N bytes)       |
     +---------------+--------------------------+

``N = 0`` is a legal, empty frame. ``N`` is checked against ``max_frame_size`` the moment the
four header bytes are complete, before any byte of the payload is buffered; a peer that claims
4 GiB costs the receiver nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from ._errors import FrameTooLarge, IncompleteFrame

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER",
    "HEADER_SIZE",
    "MAX_WIRE_FRAME_SIZE",
    "FrameDecoder",
    "encode",
    "encode_many",
]

#: The length header: network byte order, unsigned 32 bits.
HEADER = struct.Struct("!I")
HEADER_SIZE = HEADER.size
#: The largest length the header can express (4 GiB - 1).
MAX_WIRE_FRAME_SIZE = 2**32 - 1
#: Default bound on one frame's payload: 1 MiB. Large enough for any message of the three
#: services, small enough that a hostile length costs nothing. Every service has it as a setting.
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024
#: Consumed bytes at the front of the buffer are dropped once they pass this many (and half the
#: buffer), so compaction is amortised O(1) per byte and the buffer never grows without bound.
_COMPACT_THRESHOLD = 64 * 1024

_pack = HEADER.pack
_unpack_from = HEADER.unpack_from


def _check_limit(max_frame_size: int) -> None:
    if not 0 <= max_frame_size <= MAX_WIRE_FRAME_SIZE:
        raise ValueError(f"max_frame_size must be within 0..{MAX_WIRE_FRAME_SIZE}")


def encode(
    payload: bytes | bytearray | memoryview, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes:
    """Return ``header + payload`` as one ``bytes`` (one write: no Nagle stall between the two)."""
    size = len(payload)
    if size > max_frame_size:
        raise FrameTooLarge(size, max_frame_size)
    return _pack(size) + payload


def encode_many(
    payloads: Iterable[bytes | bytearray | memoryview], max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes:
    """Encode several frames into one buffer, for one ``write`` per batch."""
    out = bytearray()
    for payload in payloads:
        size = len(payload)
        if size > max_frame_size:
            raise FrameTooLarge(size, max_frame_size)
        out += _pack(size)
        out += payload
    return bytes(out)


class FrameDecoder:
    """Incremental decoder. ``feed(data)`` returns the frames completed by ``data``.

    Partial state (a header or payload not yet complete) is kept between calls, so any split of
    a byte stream, byte-at-a-time included, yields exactly the frames of the whole. Buffering is
    one ``bytearray`` plus a read offset (O(n) in the bytes fed). Call ``close()`` at end of
    stream: it raises :class:`IncompleteFrame` if the stream stopped inside a frame.

    After :class:`FrameTooLarge` the stream is unrecoverable (the decoder cannot resynchronise);
    the caller closes the connection. Further ``feed()`` calls raise the same error again.
    """

    __slots__ = ("_buf", "_error", "_need", "_pos", "exact", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        _check_limit(max_frame_size)
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._pos = 0
        # Length of the payload whose header has been read, or -1 while reading a header.
        self._need = -1
        self._error: FrameTooLarge | None = None
        #: True when the last ``feed()`` consumed whole frames only, with nothing pending before
        #: or after: its frames are then exactly the bytes fed (a relay may forward them as is).
        self.exact = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame (header bytes included)."""
        pending = len(self._buf) - self._pos
        return pending + (HEADER_SIZE if self._need >= 0 else 0)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume ``data``; return every frame it completes, in order (maybe none)."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        if not buf and self._need < 0:
            # Fast path, the usual case on a healthy stream: nothing pending, so frames are
            # sliced straight out of ``data``; only an incomplete tail is buffered.
            return self._feed_fresh(data)
        self.exact = False
        buf += data
        frames: list[bytes] = []
        pos = self._pos
        need = self._need
        end = len(buf)
        limit = self.max_frame_size
        while True:
            if need < 0:
                if end - pos < HEADER_SIZE:
                    break
                (need,) = _unpack_from(buf, pos)
                pos += HEADER_SIZE
                if need > limit:
                    self._error = FrameTooLarge(need, limit)
                    # Drop everything: nothing after a bad header can be trusted.
                    self._buf = bytearray()
                    self._pos = 0
                    self._need = -1
                    raise self._error
            if end - pos < need:
                break
            frames.append(bytes(buf[pos : pos + need]))
            pos += need
            need = -1
        self._need = need
        if pos == end:
            buf.clear()
            pos = 0
        elif pos > _COMPACT_THRESHOLD and pos * 2 > end:
            del buf[:pos]
            pos = 0
        self._pos = pos
        return frames

    def _feed_fresh(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        end = len(data)
        pos = 0
        limit = self.max_frame_size
        frames: list[bytes] = []
        # Slicing bytes gives bytes (one copy); other buffers go through a memoryview.
        whole = isinstance(data, bytes)
        view = data if whole else memoryview(data)
        while end - pos >= HEADER_SIZE:
            (need,) = _unpack_from(view, pos)
            if need > limit:
                self._error = FrameTooLarge(need, limit)
                raise self._error
            pos += HEADER_SIZE
            if end - pos < need:
                self._need = need  # the header is consumed; its payload is pending
                break
            frames.append(view[pos : pos + need] if whole else bytes(view[pos : pos + need]))  # type: ignore[arg-type]
            pos += need
        if pos < end:
            self._buf += view[pos:]
        self.exact = pos == end
        return frames

    def close(self) -> None:
        """Signal end of stream. Raises :class:`IncompleteFrame` if inside a frame."""
        pending = len(self._buf) - self._pos
        if self._need >= 0:
            raise IncompleteFrame(missing=self._need - pending, buffered=pending + HEADER_SIZE)
        if pending:
            raise IncompleteFrame(missing=HEADER_SIZE - pending, buffered=pending)
