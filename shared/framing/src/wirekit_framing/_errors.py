"""One base error for the framing library; typed subclasses carry the data (h11 ``_util`` style)."""

from __future__ import annotations

from collections.abc import Sequence


class FramingError(Exception):
    """Base of every error the framing library raises. Nothing else escapes ``feed()``."""


class FrameTooLarge(FramingError):
    """A frame's declared (decoder) or actual (encoder) length is over ``max_frame_size``.

    Raised by a decoder, ``frames`` holds the payloads of the frames that the same call
    completed before the bad header (in order), so no split of the stream loses a frame.
    """

    def __init__(self, size: int, max_frame_size: int, frames: Sequence[bytes] = ()) -> None:
        super().__init__(f"frame of {size} bytes exceeds max_frame_size={max_frame_size}")
        self.size = size
        self.max_frame_size = max_frame_size
        self.frames = list(frames)


class IncompleteFrame(FramingError):
    """The stream ended inside a frame (in the header or in the payload)."""

    def __init__(self, missing: int, buffered: int) -> None:
        super().__init__(
            f"stream ended inside a frame: {buffered} bytes buffered, {missing} more expected"
        )
        self.missing = missing
        self.buffered = buffered
