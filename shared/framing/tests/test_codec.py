"""The framing codec: table-driven cases, every split of a stream, limits, end of stream."""

from __future__ import annotations

import itertools
import struct
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wirekit_framing import (
    HEADER_SIZE,
    MAX_WIRE_FRAME_SIZE,
    FrameDecoder,
    FrameTooLarge,
    FramingError,
    IncompleteFrame,
    encode,
    encode_many,
)

ENCODE_CASES = [
    pytest.param(b"", b"\x00\x00\x00\x00", id="empty"),
    pytest.param(b"a", b"\x00\x00\x00\x01a", id="one-byte"),
    pytest.param(b"hello", b"\x00\x00\x00\x05hello", id="ascii"),
    pytest.param(b"\x00" * 256, b"\x00\x00\x01\x00" + b"\x00" * 256, id="256-zero-bytes"),
    pytest.param(
        bytes(range(256)) * 300, struct.pack("!I", 76800) + bytes(range(256)) * 300, id="75KiB"
    ),
]


@pytest.mark.parametrize(("payload", "wire"), ENCODE_CASES)
def test_encode_matches_wire_format(payload: bytes, wire: bytes) -> None:
    assert encode(payload) == wire


@pytest.mark.parametrize(("payload", "wire"), ENCODE_CASES)
def test_decode_whole_stream(payload: bytes, wire: bytes) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(wire) == [payload]
    decoder.close()


DECODE_CASES = [
    pytest.param([b""], id="one-empty"),
    pytest.param([b"", b"", b""], id="three-empty"),
    pytest.param([b"a", b"", b"bc"], id="mixed"),
    pytest.param([b"x" * 70_000, b"y"], id="large-then-small"),
    pytest.param([b"\x00\x00\x00\x05" * 3], id="payload-looks-like-header"),
]


@pytest.mark.parametrize("frames", DECODE_CASES)
def test_byte_at_a_time_equals_whole(frames: list[bytes]) -> None:
    wire = encode_many(frames)
    decoder = FrameDecoder()
    got: list[bytes] = []
    for i in range(len(wire)):
        got.extend(decoder.feed(wire[i : i + 1]))
    assert got == frames
    decoder.close()


@given(
    frames=st.lists(st.binary(max_size=300), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
)
def test_any_split_equals_whole(frames: list[bytes], cuts: list[int]) -> None:
    wire = encode_many(frames)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    decoder = FrameDecoder()
    got: list[bytes] = []
    for a, b in itertools.pairwise(points):
        got.extend(decoder.feed(memoryview(wire)[a:b]))
    assert got == frames
    decoder.close()
    assert decoder.buffered == 0


def test_decoder_keeps_partial_state_and_reports_buffered() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x00") == []
    assert decoder.buffered == 2
    assert decoder.feed(b"\x00\x03ab") == []
    assert decoder.buffered == 6
    assert decoder.feed(b"cd") == [b"abc"]
    assert decoder.buffered == 1


def test_header_claiming_4gib_is_rejected_at_once_without_allocation() -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge) as info:
            decoder.feed(struct.pack("!I", MAX_WIRE_FRAME_SIZE) + b"tail")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.size == MAX_WIRE_FRAME_SIZE
    assert info.value.max_frame_size == 1024
    assert peak < 64 * 1024, f"decoder allocated {peak} bytes for a hostile header"
    assert decoder.buffered == 0
    # The stream cannot be resynchronised: the error sticks.
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\x00\x00\x00\x00")


def test_limit_is_inclusive() -> None:
    decoder = FrameDecoder(max_frame_size=3)
    assert decoder.feed(encode(b"abc")) == [b"abc"]
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\x00\x00\x00\x04")


@pytest.mark.parametrize(
    ("wire", "missing", "buffered"),
    [
        pytest.param(b"\x00", 3, 1, id="mid-header-1"),
        pytest.param(b"\x00\x00\x00", 1, 3, id="mid-header-3"),
        pytest.param(b"\x00\x00\x00\x05", 5, 4, id="header-only"),
        pytest.param(b"\x00\x00\x00\x05ab", 3, 6, id="mid-payload"),
        pytest.param(encode(b"ok") + b"\x00\x00\x00\x02x", 1, 5, id="after-a-whole-frame"),
    ],
)
def test_eof_inside_a_frame_raises_incomplete(wire: bytes, missing: int, buffered: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(wire)
    with pytest.raises(IncompleteFrame) as info:
        decoder.close()
    assert (info.value.missing, info.value.buffered) == (missing, buffered)


def test_encode_refuses_oversize_payload() -> None:
    with pytest.raises(FrameTooLarge) as info:
        encode(b"x" * 11, max_frame_size=10)
    assert info.value.size == 11
    with pytest.raises(FrameTooLarge):
        encode_many([b"ok", b"x" * 11], max_frame_size=10)


def test_every_error_is_a_framing_error() -> None:
    assert issubclass(FrameTooLarge, FramingError)
    assert issubclass(IncompleteFrame, FramingError)


@pytest.mark.parametrize("bad", [-1, MAX_WIRE_FRAME_SIZE + 1])
def test_invalid_limit_rejected(bad: int) -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameDecoder(max_frame_size=bad)


def test_buffer_is_compacted_on_long_streams() -> None:
    """Many frames fed in chunks that never end on a boundary: the buffer stays small."""
    decoder = FrameDecoder()
    chunk = encode(b"z" * 1000) * 200 + b"\x00\x00"  # always leaves a partial header behind
    total = 0
    for _ in range(50):
        frames = decoder.feed(chunk)
        total += len(frames)
        decoder.feed(b"\x03\xe8" + b"z" * 1000)  # complete the dangling frame
        total += 1
        assert len(decoder._buf) < 2 * len(chunk)
    assert total == 50 * 201
    assert HEADER_SIZE == 4


@pytest.mark.parametrize(
    ("pieces", "exact"),
    [
        pytest.param([encode(b"a") + encode(b"bc")], [True], id="whole-frames"),
        pytest.param([encode(b"abc")[:3], encode(b"abc")[3:]], [False, False], id="split-header"),
        pytest.param([encode(b"abc")[:5], encode(b"abc")[5:]], [False, False], id="split-payload"),
        pytest.param([encode(b"a") + b"\x00", b"\x00\x00\x00"], [False, False], id="tail"),
        pytest.param([encode(b"a"), encode(b"")], [True, True], id="one-then-empty"),
    ],
)
def test_exact_tells_when_the_frames_are_the_bytes_fed(
    pieces: list[bytes], exact: list[bool]
) -> None:
    decoder = FrameDecoder()
    seen = []
    for piece in pieces:
        decoder.feed(piece)
        seen.append(decoder.exact)
    assert seen == exact
