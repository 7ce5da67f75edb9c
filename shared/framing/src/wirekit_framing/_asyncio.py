"""asyncio adapters: stream helpers for async clients, a reader for ``StreamReader`` users."""

from __future__ import annotations

import asyncio

from ._codec import DEFAULT_MAX_FRAME_SIZE, HEADER, HEADER_SIZE, encode
from ._errors import FrameTooLarge, IncompleteFrame

__all__ = ["read_frame", "write_frame"]


async def read_frame(
    reader: asyncio.StreamReader, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes | None:
    """Read one frame from a ``StreamReader``; ``None`` on clean EOF between frames."""
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise IncompleteFrame(HEADER_SIZE - len(exc.partial), len(exc.partial)) from None
    (size,) = HEADER.unpack(header)
    if size > max_frame_size:
        raise FrameTooLarge(size, max_frame_size)
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise IncompleteFrame(size - len(exc.partial), HEADER_SIZE + len(exc.partial)) from None


async def write_frame(
    writer: asyncio.StreamWriter, payload: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> None:
    """Write one frame (a single ``write``) and wait for the transport's buffer to drain."""
    writer.write(encode(payload, max_frame_size))
    await writer.drain()
