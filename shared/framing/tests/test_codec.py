"""The framing codec: table-driven cases, every split of a stream, limits, end of stream."""

from __future__ import annotations

import itertools
import struct
import traceback
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wirekit_framing import (
    HEADER,
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
    assert HEADER_SIZE == HEADER.size == 4  # the header's size is also a literal constant


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


def test_buffer_holds_only_the_incomplete_frame_on_long_streams() -> None:
    """Chunks that never end on a frame boundary: what stays buffered is the frame in progress
    (never the frames already returned), so memory is bounded by one frame."""
    decoder = FrameDecoder()
    frame = encode(b"z" * 1000)
    stream = frame * 2000
    step = len(frame) * 7 + 3  # every chunk ends inside a different part of a frame
    total = 0
    for pos in range(0, len(stream), step):
        total += len(decoder.feed(stream[pos : pos + step]))
        assert decoder.buffered < len(frame)
    assert total == 2000
    decoder.close()


# -- split invariance, errors included ----------------------------------------------------------
LIMIT = 64


def _model(frames: list[bytes], bad: int | None, tail: bytes) -> tuple[list[bytes], object]:
    """What any split of ``wire(frames, bad, tail)`` must deliver: frames, then the error."""
    if bad is not None:
        return frames, ("too_large", bad)
    if tail:
        return frames, ("incomplete", len(tail))
    return frames, None


def _wire(frames: list[bytes], bad: int | None, tail: bytes) -> bytes:
    out = encode_many(frames, LIMIT)
    if bad is not None:
        return out + struct.pack("!I", bad) + tail  # tail: whatever follows the bad header
    return out + tail


def _deliver(
    wire: bytes, cuts: list[int], kind: str, use_relay: list[bool]
) -> tuple[list[bytes], object]:
    """Feed ``wire`` split at ``cuts`` as ``kind`` buffers; relay() or feed() per chunk."""
    decoder = FrameDecoder(LIMIT)
    frames: list[bytes] = []
    relayed = bytearray()
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    try:
        for i, (a, b) in enumerate(itertools.pairwise(points)):
            chunk = wire[a:b]
            data: bytes | bytearray | memoryview = (
                chunk if kind == "bytes" else bytearray(chunk) if kind == "bytearray"
                else memoryview(chunk)
            )  # fmt: skip
            if use_relay[i % len(use_relay)]:
                count, out = decoder.relay(data)
                got = FrameDecoder(LIMIT).feed(bytes(out))  # the wire bytes are whole frames
                assert len(got) == count
                frames.extend(got)
                relayed += out
            else:
                frames.extend(decoder.feed(data))
        decoder.close()
    except FrameTooLarge as exc:
        return frames + exc.frames, ("too_large", exc.size)
    except IncompleteFrame as exc:
        return frames, ("incomplete", exc.buffered)
    return frames, None


frames_st = st.lists(st.binary(max_size=LIMIT), max_size=12)


@given(
    frames=frames_st,
    bad=st.none() | st.integers(min_value=LIMIT + 1, max_value=MAX_WIRE_FRAME_SIZE),
    tail=st.binary(max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
    kind=st.sampled_from(["bytes", "bytearray", "memoryview"]),
    use_relay=st.lists(st.booleans(), min_size=1, max_size=5),
)
def test_any_split_delivers_the_same_frames_and_the_same_error(
    frames: list[bytes], bad: int | None, tail: bytes, cuts: list[int], kind: str,
    use_relay: list[bool],
) -> None:  # fmt: skip
    if bad is None:
        tail = b""  # an incomplete tail is covered below; here: valid, or broken by a header
    wire = _wire(frames, bad, tail)
    expected = _model(frames, bad, b"")
    assert _deliver(wire, cuts, kind, use_relay) == expected
    assert _deliver(wire, [], kind, use_relay) == expected  # one feed
    assert _deliver(wire, list(range(len(wire))), kind, use_relay) == expected  # byte at a time


@given(frames=frames_st, size=st.integers(min_value=0, max_value=LIMIT), data=st.data())
def test_a_stream_that_stops_inside_a_frame_is_incomplete_whatever_the_split(
    frames: list[bytes], size: int, data: st.DataObject
) -> None:
    partial = encode(b"p" * size, LIMIT)
    tail = partial[: data.draw(st.integers(min_value=1, max_value=len(partial) - 1))]
    wire = encode_many(frames, LIMIT) + tail
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
    for use_relay in ([False], [True], [True, False]):
        assert _deliver(wire, cuts, "bytes", use_relay) == (frames, ("incomplete", len(tail)))


@given(frames=frames_st, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_relay_returns_the_wire_bytes_of_whole_frames_exactly(
    frames: list[bytes], cuts: list[int]
) -> None:
    wire = encode_many(frames, LIMIT)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    decoder = FrameDecoder(LIMIT)
    out = bytearray()
    count = 0
    for a, b in itertools.pairwise(points):
        n, got = decoder.relay(wire[a:b])
        count += n
        out += got
        # Never more than the whole frames received so far, never a byte of a partial frame.
        assert wire[: len(out)] == out
        assert len(wire[:b]) - len(out) == decoder.buffered
    assert (count, bytes(out)) == (len(frames), wire)


@pytest.mark.parametrize(
    ("pieces", "replies"),
    [
        # The defect of issue 10: whole frames followed by exactly one complete header.
        pytest.param(
            [bytes.fromhex("000000016100000005"), b"hello"],
            [bytes.fromhex("0000000161"), bytes.fromhex("00000005") + b"hello"],
            id="frames-then-a-whole-header",
        ),
        pytest.param(
            [encode(b"a") + encode(b"bc")], [encode(b"a") + encode(b"bc")], id="whole-frames"
        ),
        pytest.param([b"\x00\x00\x00", b"\x00"], [b"", b"\x00\x00\x00\x00"], id="split-empty"),
        pytest.param(
            [encode(b"abc")[:5], encode(b"abc")[5:] + encode(b"d")[:2], encode(b"d")[2:]],
            [b"", encode(b"abc"), encode(b"d")],
            id="split-payload-then-header",
        ),
    ],
)
def test_relay_never_returns_a_header_of_a_frame_in_progress(
    pieces: list[bytes], replies: list[bytes]
) -> None:
    decoder = FrameDecoder()
    assert [bytes(decoder.relay(piece)[1]) for piece in pieces] == replies


def test_relay_returns_bytes_input_itself_and_copies_mutable_input() -> None:
    wire = encode(b"abc") + encode(b"")
    assert FrameDecoder().relay(wire)[1] is wire  # whole frames: the very object, no copy
    mutable = bytearray(wire + b"\x00")
    count, out = FrameDecoder().relay(mutable)
    mutable[:] = b"x" * len(mutable)  # the caller reuses its buffer
    assert (count, bytes(out)) == (2, wire)


@pytest.mark.parametrize("size", [LIMIT, LIMIT + 1])
def test_relay_bounds_a_frame_that_is_the_whole_read(size: int) -> None:
    """The one-frame read (relay's shortcut) is checked against the bound like any other: the
    frame of LIMIT bytes is answered, one byte more breaks the stream."""
    wire = struct.pack("!I", size) + bytes(size)
    decoder = FrameDecoder(LIMIT)
    if size <= LIMIT:
        assert decoder.relay(wire) == (1, wire)
        return
    with pytest.raises(FrameTooLarge):
        decoder.relay(wire)
    with pytest.raises(FrameTooLarge):  # and it stays broken
        decoder.relay(encode(b""))


def test_errors_keep_no_reference_to_the_callers_buffer_and_do_not_grow() -> None:
    decoder = FrameDecoder(LIMIT)
    data = bytearray(encode(b"ok", LIMIT) + struct.pack("!I", LIMIT + 1) + b"junk")
    with pytest.raises(FrameTooLarge) as first:
        decoder.feed(data)
    assert first.value.frames == [b"ok"]
    data.extend(b"more")  # resizable: no memoryview of it is alive
    del data[:]
    assert first.value.__traceback__ is not None
    tb, referenced = first.value.__traceback__.tb_next, []  # the frames below this test's
    while tb is not None:
        referenced += [v for v in tb.tb_frame.f_locals.values() if v is data]
        tb = tb.tb_next
    assert referenced == []
    depths = []
    for call in (decoder.feed, decoder.relay, decoder.feed, lambda _: decoder.close()):
        with pytest.raises(FrameTooLarge) as again:
            call(b"\x00")
        assert again.value is not first.value
        assert again.value.frames == []
        depths.append(len(traceback.extract_tb(again.value.__traceback__)))
    assert depths[0] == depths[2]  # no growth from one call to the next
