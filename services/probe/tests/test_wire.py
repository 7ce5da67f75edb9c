from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wirekit_probe.wire import MAX_SIZE, MIN_SIZE, NotAReply, Probe, decode, encode

NONCE = 0x0123456789ABCDEF


@given(
    seq=st.integers(0, 2**64 - 1),
    sent=st.integers(0, 2**64 - 1),
    size=st.integers(MIN_SIZE, MAX_SIZE),
)
def test_round_trip(seq: int, sent: int, size: int) -> None:
    data = encode(NONCE, seq, sent, size)
    assert len(data) == size
    assert decode(data, NONCE, size) == Probe(seq, sent)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", "short", id="empty"),
        pytest.param(encode(NONCE, 1, 2, 64)[: MIN_SIZE - 1], "short", id="short"),
        pytest.param(b"XXXX" + encode(NONCE, 1, 2, 64)[4:], "magic", id="magic"),
        pytest.param(encode(NONCE + 1, 1, 2, 64), "nonce", id="other-session"),
        pytest.param(encode(NONCE, 1, 2, 64) + b"!", "size", id="longer"),
        pytest.param(encode(NONCE, 1, 2, 63), "size", id="shorter"),
    ],
)
def test_not_a_reply(data: bytes, reason: str) -> None:
    with pytest.raises(NotAReply) as e:
        decode(data, NONCE, 64)
    assert e.value.reason == reason


@pytest.mark.parametrize("size", [0, MIN_SIZE - 1, MAX_SIZE + 1])
def test_sizes_out_of_range_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="probe size"):
        encode(NONCE, 0, 0, size)
