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
from typing import Any, Final, NoReturn

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

#: The length header: network byte order, unsigned 32 bits. (``Final`` and ``n: int`` below are
#: for the compiled build: constants inlined, the scan's arithmetic on machine integers.)
HEADER: Final = struct.Struct("!I")
HEADER_SIZE: Final = 4  # == HEADER.size, as a literal the compiled build inlines
#: The largest length the header can express (4 GiB - 1).
MAX_WIRE_FRAME_SIZE: Final = 2**32 - 1
#: Default bound on one frame's payload: 1 MiB. Large enough for any message of the three
#: services, small enough that a hostile length costs nothing. Every service has it as a setting.
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024

_pack: Final = HEADER.pack
_unpack_from: Final = HEADER.unpack_from

_Buffer = bytes | bytearray | memoryview


def _check_limit(max_frame_size: int) -> None:
    if not 0 <= max_frame_size <= MAX_WIRE_FRAME_SIZE:
        raise ValueError(f"max_frame_size must be within 0..{MAX_WIRE_FRAME_SIZE}")


def encode(payload: _Buffer, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Return ``header + payload`` as one ``bytes`` (one write: no Nagle stall between the two)."""
    size = len(payload)
    if size > max_frame_size:
        raise FrameTooLarge(size, max_frame_size)
    return _pack(size) + payload


def encode_many(payloads: Iterable[_Buffer], max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Encode several frames into one buffer, for one ``write`` per batch."""
    out = bytearray()
    for payload in payloads:
        size = len(payload)
        if size > max_frame_size:
            raise FrameTooLarge(size, max_frame_size)
        out += _pack(size)
        out += payload
    return bytes(out)


def _scan(data: _Buffer, limit: int) -> tuple[int, int, int]:
    """Walk the headers of ``data``, which starts on a frame boundary, without copying anything.

    Returns ``(count, end, need)``: ``count`` whole frames fill ``data[:end]``; ``need`` is the
    wire length (header included) of the frame that starts at ``end`` when its header is
    complete, -1 when it is not, and ``-2 - N`` when that header declares ``N > limit`` (the
    stream is broken at ``end``).
    """
    size = len(data)
    pos = count = 0
    while size - pos >= HEADER_SIZE:
        n: int = _unpack_from(data, pos)[0]
        if n > limit:
            return count, pos, -2 - n
        if size - pos - HEADER_SIZE < n:
            return count, pos, HEADER_SIZE + n
        pos += HEADER_SIZE + n
        count += 1
    return count, pos, -1


def _split(data: _Buffer, limit: int) -> tuple[list[bytes], int, int]:
    """:func:`_scan` that also returns the payloads: ``(frames, end, need)``."""
    if isinstance(data, bytes):
        return _split_sliceable(data, limit)  # slices of bytes are bytes: one copy each
    with memoryview(data) as view:
        views, end, need = _split_sliceable(view, limit)
        return [bytes(v) for v in views], end, need


def _split_sliceable(data: bytes | memoryview, limit: int) -> tuple[list[Any], int, int]:
    size = len(data)
    pos = 0
    frames: list[Any] = []
    while size - pos >= HEADER_SIZE:
        n: int = _unpack_from(data, pos)[0]
        if n > limit:
            return frames, pos, -2 - n
        if size - pos - HEADER_SIZE < n:
            return frames, pos, HEADER_SIZE + n
        pos += HEADER_SIZE
        frames.append(data[pos : pos + n])
        pos += n
    return frames, pos, -1


class FrameDecoder:
    """Incremental decoder: bytes in, frames out, for any split of the stream.

    ``feed(data)`` returns the payloads of the frames ``data`` completes; ``relay(data)`` returns
    how many frames it completed and their bytes exactly as received (headers included), which
    is what a relay or an echo may forward as is. Both may be mixed on one stream.

    State: ``_buf`` holds the bytes of the one incomplete frame at the end of what was fed (its
    header included), so it always starts on a frame boundary; ``_need`` is that frame's wire
    length once its header is complete (-1 before). Whole frames are sliced straight from the
    caller's data when nothing is pending; otherwise the data is appended to ``_buf``, and once
    the frame completes, whatever follows it (at most the new data) is moved to the front: O(n)
    in the bytes fed for any split, byte-at-a-time included.

    Errors. A header over ``max_frame_size`` raises :class:`FrameTooLarge` carrying, in
    ``frames``, the payloads that the same call completed before it: for every split of a
    stream, the frames delivered (returned, then carried by the error) and the error are the
    same. The stream cannot be resynchronised: every later ``feed()``, ``relay()`` or
    ``close()`` raises a new ``FrameTooLarge`` with no frames. An error never refers to the
    caller's buffer. Call ``close()`` at end of stream: it raises :class:`IncompleteFrame` when
    the stream stopped inside a frame.
    """

    __slots__ = ("_broken", "_buf", "_need", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        _check_limit(max_frame_size)
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._need = -1
        self._broken = -1  # the declared size of the header that broke the stream

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame received so far (header bytes included); 0 between
        frames. Whole frames are never buffered: a call returns every frame it completes."""
        return len(self._buf)

    def feed(self, data: _Buffer) -> list[bytes]:
        """Consume ``data``; return the payload of every frame it completes, in order."""
        if self._broken >= 0:
            self._raise([])
        buf = self._buf
        if buf:
            buf += data
            if 0 <= self._need > len(buf):
                return []  # still inside the same frame: nothing to walk
            frames, end, need = _split(buf, self.max_frame_size)
            del buf[:end]
        else:
            # bytes (what a Protocol's data_received gets): sliced directly, one call less
            split = _split_sliceable if type(data) is bytes else _split
            frames, end, need = split(data, self.max_frame_size)  # type: ignore[arg-type]
            if end < len(data) and need > -2:
                buf += memoryview(data)[end:]
        if need <= -2:
            del data  # the error's traceback must not keep the caller's buffer alive
            self._break(need, frames)
        self._need = need
        return frames

    def relay(self, data: _Buffer) -> tuple[int, bytes | memoryview]:
        """Consume ``data``; return ``(count, wire)``: how many frames it completed and their
        bytes exactly as received, headers included (empty when ``count`` is 0).

        This is the question a relay or an echo asks ("what may I forward as is?"), answered
        from the decoder's own state. ``wire`` is ``data`` itself when ``data`` is ``bytes`` made
        of whole frames; a read-only view of ``data`` when such ``bytes`` end inside a frame; a
        copy otherwise (never a view of a buffer that the caller or the decoder may change).
        """
        buf = self._buf
        if not buf and type(data) is bytes and self._broken < 0 and len(data) >= HEADER_SIZE:
            # The common read: exactly one whole frame, nothing pending -- answered without
            # the walk (what _scan would find, in one header read).
            n: int = _unpack_from(data)[0]
            if n + HEADER_SIZE == len(data) and n <= self.max_frame_size:
                self._need = -1
                return 1, data
        if self._broken >= 0:
            self._raise([])
        wire: bytes | memoryview = b""
        if buf:
            buf += data
            if 0 <= self._need > len(buf):
                return 0, wire
            count, end, need = _scan(buf, self.max_frame_size)
            if need <= -2:
                del data
                self._break(need, _split(buf, self.max_frame_size)[0])
            if count:
                wire = bytes(buf[:end])
                del buf[:end]
        else:
            count, end, need = _scan(data, self.max_frame_size)
            if need <= -2:
                frames = _split(data, self.max_frame_size)[0]
                del data
                self._break(need, frames)
            # `elif`, not `if`, after a NoReturn call that follows a `del` of the argument:
            # mypyc 2.4.1 otherwise treats `data` as maybe-deleted and nulls it at entry.
            elif end == len(data):
                wire = data if isinstance(data, bytes) else bytes(data)
            else:
                wire = memoryview(data)[:end] if isinstance(data, bytes) else bytes(data[:end])
                buf += memoryview(data)[end:]
        self._need = need
        return count, wire

    def close(self) -> None:
        """Signal end of stream. Raises :class:`IncompleteFrame` if inside a frame."""
        if self._broken >= 0:
            self._raise([])
        have = len(self._buf)
        if have:
            need = self._need if self._need >= 0 else HEADER_SIZE
            raise IncompleteFrame(missing=need - have, buffered=have)

    # -- internals ----------------------------------------------------------------------------
    def _break(self, need: int, frames: list[bytes]) -> NoReturn:
        """A header declared more than ``max_frame_size``: drop everything, raise from now on."""
        self._broken = -2 - need
        self._buf = bytearray()
        self._need = -1
        self._raise(frames)

    def _raise(self, frames: list[bytes]) -> NoReturn:
        # A new exception each time: no traceback that grows with every call.
        raise FrameTooLarge(self._broken, self.max_frame_size, frames)
