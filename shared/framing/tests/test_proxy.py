"""The PROXY protocol parser: every header of the spec, every refusal, and the same result for
any segmentation of the stream (byte by byte included)."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wirekit_framing import (
    MAX_V1_LINE,
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

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(ver_cmd: int, fam: int, block: bytes) -> bytes:
    return SIG + struct.pack("!BBH", ver_cmd, fam, len(block)) + block


def parse_split(data: bytes, cuts: list[int], versions: tuple[int, ...] = (1, 2)
                ) -> tuple[ProxyHeader | None, bytes]:  # fmt: skip
    """Feed ``data`` cut at ``cuts``; the header and what followed it."""
    parser = ProxyHeaderParser(versions)
    bounds = [0, *sorted(c for c in set(cuts) if 0 < c < len(data)), len(data)]
    header = None
    for start, end in itertools.pairwise(bounds):
        if header is not None:
            return header, parser.rest + data[start:]
        header = parser.feed(data[start:end])
    return header, parser.rest if header is not None else b""


TCP4 = ProxyHeader(1, "PROXY", "INET", "STREAM", ("192.0.2.1", 56324), ("198.51.100.7", 7001))

GOOD = [
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 7001\r\n", TCP4, id="v1-tcp4"),
    pytest.param(
        b"PROXY TCP6 2001:db8::1 2001:db8::2 0 65535\r\n",
        ProxyHeader(1, "PROXY", "INET6", "STREAM", ("2001:db8::1", 0), ("2001:db8::2", 65535)),
        id="v1-tcp6",
    ),
    pytest.param(
        b"PROXY UNKNOWN\r\n",
        ProxyHeader(1, "PROXY", "UNSPEC", "UNSPEC", None, None),
        id="v1-unknown",
    ),
    pytest.param(
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "  # 107 bytes
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        ProxyHeader(1, "PROXY", "UNSPEC", "UNSPEC", None, None),
        id="v1-unknown-107",
    ),
    pytest.param(
        encode_proxy_v2(("192.0.2.1", 56324), ("198.51.100.7", 7001)),
        ProxyHeader(2, "PROXY", "INET", "STREAM", ("192.0.2.1", 56324), ("198.51.100.7", 7001)),
        id="v2-inet",
    ),
    pytest.param(
        encode_proxy_v2(("2001:db8::1", 1), ("::1", 2)),
        ProxyHeader(2, "PROXY", "INET6", "STREAM", ("2001:db8::1", 1), ("::1", 2)),
        id="v2-inet6",
    ),
    pytest.param(
        encode_proxy_v2(None, None),
        ProxyHeader(2, "LOCAL", "UNSPEC", "UNSPEC", None, None),
        id="v2-local",
    ),
    pytest.param(
        v2(0x20, 0x11, b"\x01" * 12 + b"garbage"),  # LOCAL: the block is discarded
        ProxyHeader(2, "LOCAL", "INET", "STREAM", None, None),
        id="v2-local-with-block",
    ),
    pytest.param(
        v2(0x21, 0x00, b""), ProxyHeader(2, "PROXY", "UNSPEC", "UNSPEC", None, None), id="v2-unspec"
    ),
    pytest.param(
        v2(0x21, 0x31, b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")),
        ProxyHeader(2, "PROXY", "UNIX", "STREAM", None, None),
        id="v2-unix",
    ),
    pytest.param(
        encode_proxy_v2(
            ("192.0.2.1", 5),
            ("192.0.2.2", 6),
            [(0x02, b"svc.example"), (0x04, b""), (0xE0, b"x" * 40)],
        ),
        ProxyHeader(
            2,
            "PROXY",
            "INET",
            "STREAM",
            ("192.0.2.1", 5),
            ("192.0.2.2", 6),
            ((0x02, b"svc.example"), (0x04, b""), (0xE0, b"x" * 40)),
        ),
        id="v2-tlvs",
    ),
]


@pytest.mark.parametrize(("wire", "want"), GOOD)
def test_every_kind_of_header_is_read(wire: bytes, want: ProxyHeader) -> None:
    header, rest = parse_split(wire + b"client bytes", [])
    assert header == want
    assert rest == b"client bytes"


@pytest.mark.parametrize(("wire", "want"), GOOD)
def test_any_split_gives_the_same_header_and_rest(wire: bytes, want: ProxyHeader) -> None:
    data = wire + b"\x00\x00\x00\x05hello"
    for cut in range(len(data) + 1):
        assert parse_split(data, [cut]) == (want, b"\x00\x00\x00\x05hello")
    assert parse_split(data, list(range(len(data)))) == (want, b"\x00\x00\x00\x05hello")


def test_the_authority_tlv_is_read() -> None:
    header, _ = parse_split(encode_proxy_v2(("192.0.2.1", 5), ("192.0.2.2", 6),
                                            [(0x02, "bücher.example".encode())]), [])  # fmt: skip
    assert header is not None
    assert header.authority == "bücher.example"
    assert header.tlv(0x20) is None


BAD = [
    # (bytes, versions, error class, reason)
    pytest.param(b"GET / HTTP/1.1\r\n", (1, 2), ProxySignatureError, "signature", id="http"),
    pytest.param(b"\x00\x00\x00\x05hello", (1, 2), ProxySignatureError, "signature",
                 id="a-frame"),
    pytest.param(b"PROXX TCP4", (1, 2), ProxySignatureError, "signature", id="v1-typo"),
    pytest.param(b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x00", (1, 2), ProxySignatureError,
                 "signature", id="v2-typo"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", (2,), ProxySignatureError, "version",
                 id="v1-on-a-v2-listener"),
    pytest.param(encode_proxy_v2(None, None), (1,), ProxySignatureError, "version",
                 id="v2-on-a-v1-listener"),
    pytest.param(b"PROXY " + b"A" * 200, (1, 2), ProxyHeaderTooLong, "too_long",
                 id="v1-no-crlf-in-107"),
    pytest.param(b"PROXY UNKNOWN " + b"f" * (MAX_V1_LINE - 15) + b"\r\n", (1, 2),
                 ProxyHeaderTooLong, "too_long", id="v1-108-bytes"),
    pytest.param(v2(0x21, 0x11, b"\x00" * 600), (1, 2), ProxyHeaderTooLong, "too_long",
                 id="v2-len-over-bound"),
    pytest.param(SIG + b"\x21\x11\xff\xff", (1, 2), ProxyHeaderTooLong, "too_long",
                 id="v2-len-65535"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", (1, 2), MalformedProxyHeader,
                 "malformed", id="v1-lf-only"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", (1, 2), MalformedProxyHeader,
                 "malformed", id="v1-cr-cr-lf"),
    pytest.param(b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", (1, 2), MalformedProxyHeader,
                 "malformed", id="v1-two-spaces"),
    pytest.param(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", (1, 2), MalformedProxyHeader,
                 "malformed", id="v1-leading-zero-address"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", (1, 2), MalformedProxyHeader,
                 "malformed", id="v1-leading-zero-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", (1, 2), MalformedProxyHeader,
                 "malformed", id="v1-port-over"),
    pytest.param(b"PROXY TCP4 ::1 ::2 1 2\r\n", (1, 2), MalformedProxyHeader, "malformed",
                 id="v1-family-mismatch"),
    pytest.param(b"PROXY TCP6 fe80::1%eth0 ::2 1 2\r\n", (1, 2), MalformedProxyHeader,
                 "malformed", id="v1-scope-id"),
    pytest.param(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", (1, 2), MalformedProxyHeader,
                 "malformed", id="v1-udp"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", (1, 2), MalformedProxyHeader,
                 "malformed", id="v1-missing-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", (1, 2), MalformedProxyHeader,
                 "malformed", id="v1-extra-field"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xff\r\n", (1, 2), MalformedProxyHeader,
                 "malformed", id="v1-not-ascii"),
    pytest.param(v2(0x11, 0x11, b"\x00" * 12), (1, 2), MalformedProxyHeader, "malformed",
                 id="v2-version-1"),
    pytest.param(v2(0x22, 0x11, b"\x00" * 12), (1, 2), MalformedProxyHeader, "malformed",
                 id="v2-command-2"),
    pytest.param(v2(0x21, 0x41, b"\x00" * 12), (1, 2), MalformedProxyHeader, "malformed",
                 id="v2-family-4"),
    pytest.param(v2(0x21, 0x13, b"\x00" * 12), (1, 2), MalformedProxyHeader, "malformed",
                 id="v2-protocol-3"),
    pytest.param(v2(0x21, 0x11, b"\x00" * 11), (1, 2), MalformedProxyHeader, "malformed",
                 id="v2-inet-short"),
    pytest.param(v2(0x21, 0x21, b"\x00" * 35), (1, 2), MalformedProxyHeader, "malformed",
                 id="v2-inet6-short"),
    pytest.param(v2(0x21, 0x11, b"\x00" * 12 + b"\x02\x00"), (1, 2), MalformedProxyHeader,
                 "malformed", id="v2-tlv-cut"),
    pytest.param(v2(0x21, 0x11, b"\x00" * 12 + b"\x02\x00\x09abc"), (1, 2),
                 MalformedProxyHeader, "malformed", id="v2-tlv-overrun"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "versions", "error", "reason"), BAD)
def test_what_is_not_an_acceptable_header_is_refused_at_any_split(
    data: bytes, versions: tuple[int, ...], error: type[ProxyHeaderError], reason: str
) -> None:
    for cuts in ([], list(range(len(data)))):
        with pytest.raises(error) as raised:
            parse_split(data, cuts, versions)
        assert raised.value.reason == reason


def test_a_non_proxy_stream_fails_on_its_first_wrong_byte() -> None:
    parser = ProxyHeaderParser()
    with pytest.raises(ProxySignatureError):
        parser.feed(b"G")
    assert parser.buffered == 1


def test_no_more_than_the_header_is_ever_buffered() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY ") is None
    with pytest.raises(ProxyHeaderTooLong):
        parser.feed(b"1" * 1_000_000)
    assert parser.buffered <= MAX_V1_LINE
    parser = ProxyHeaderParser()
    assert parser.feed(SIG + b"\x21\x11\x01\x00") is None  # 256 bytes announced, within bound
    assert parser.feed(b"\x00" * 100) is None
    assert parser.buffered == 116


@pytest.mark.parametrize(
    "prefix",
    [b"", b"PROX", b"PROXY TCP4 1.2.3.4", SIG, SIG + b"\x21"],
    ids=["nothing", "v1-signature", "v1-line", "v2-signature", "v2-byte"],
)
def test_the_end_of_the_stream_inside_a_header_is_incomplete(prefix: bytes) -> None:
    parser = ProxyHeaderParser()
    if prefix:
        assert parser.feed(prefix) is None
    with pytest.raises(IncompleteProxyHeader) as raised:
        parser.close()
    assert raised.value.buffered == len(prefix)
    assert raised.value.reason == "incomplete"


def test_close_after_a_complete_header_is_fine_and_feed_after_it_is_a_bug() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(encode_proxy_v1(("192.0.2.1", 1), ("192.0.2.2", 2))) is not None
    parser.close()
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


addresses = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
ports = st.integers(0, 65535)


@settings(max_examples=300, deadline=None)
@given(
    version=st.sampled_from([1, 2]), src=addresses, sport=ports, dport=ports,
    payload=st.binary(max_size=64), cuts=st.lists(st.integers(0, 200), max_size=8),
)  # fmt: skip
def test_a_sender_s_header_round_trips_in_any_segmentation(
    version: int, src: str, sport: int, dport: int, payload: bytes, cuts: list[int]
) -> None:
    dst = "192.0.2.9" if ":" not in src else "2001:db8::9"
    encode = encode_proxy_v1 if version == 1 else encode_proxy_v2
    header, rest = parse_split(encode((src, sport), (dst, dport)) + payload, cuts)
    assert header is not None
    assert header.source == (src, sport)
    assert header.destination == (dst, dport)
    assert rest == payload


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_no_input_escapes_as_anything_but_a_header_or_a_typed_error(
    data: bytes, cuts: list[int]
) -> None:
    """Random bytes, and random bytes after a right signature: a header or a ProxyHeaderError,
    the same for every segmentation, and never more than a header's bytes held."""
    for stream in (data, b"PROXY " + data, SIG + data):
        outcomes: set[tuple[object, ...]] = set()
        for split in ([], cuts):
            try:
                header, rest = parse_split(stream, split)
                outcomes.add(("ok", header, rest) if header else ("more",))
            except ProxyHeaderError as exc:
                outcomes.add(("error", type(exc).__name__))
        assert len(outcomes) == 1, outcomes
