"""The PROXY protocol header (HAProxy's ``proxy-protocol.txt``, versions 1 and 2), sans-I/O.

A proxy in front of a server (HAProxy ``send-proxy``/``send-proxy-v2``, nginx ``stream``,
Envoy, cloud load balancers) sends one header before the client's first byte, naming the
client's address. :class:`ProxyHeaderParser` takes the stream's first bytes in any
segmentation and returns the header once it is complete, with the bytes after it (the start of
the client's stream) in :attr:`ProxyHeaderParser.rest`.

Version 1, one line of US-ASCII, at most 107 bytes with its CRLF::

    PROXY TCP4 192.0.2.1 198.51.100.7 56324 7001\\r\\n
    PROXY TCP6 2001:db8::1 2001:db8::2 56324 7001\\r\\n
    PROXY UNKNOWN\\r\\n                       (anything up to the CRLF ignored)

Version 2, binary (``len`` bytes of addresses and TLVs after a 16-byte prefix)::

     0                     12      13      14           16
     +---------------------+-------+-------+------------+---------------------------+
     | signature (12 bytes) |ver|cmd|fam|pro| len (u16)  | addresses, then TLVs (len) |
     +---------------------+-------+-------+------------+---------------------------+
       signature = \\r\\n\\r\\n\\0\\r\\nQUIT\\n; len is big-endian
       ver = 2; cmd 0 LOCAL (the proxy's own connection: a health check), 1 PROXY
       fam 0 UNSPEC, 1 INET (4+4+2+2 bytes), 2 INET6 (16+16+2+2), 3 UNIX (108+108)
       pro 0 UNSPEC, 1 STREAM, 2 DGRAM; TLV = type (u8), length (u16, BE), value

Bounds come first, as in the framing codec: the signature is checked byte by byte (a stream
that is not PROXY protocol fails on its first wrong byte), a v1 line without its CRLF in 107
bytes and a v2 ``len`` over ``max_v2_length`` fail before anything more is buffered, and no more
than the header's own bytes are ever held. Every failure is a :class:`ProxyHeaderError` whose
``reason`` is a short label (a metric's).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from ._errors import FramingError

__all__ = [
    "MAX_V1_LINE",
    "MAX_V2_LENGTH",
    "V2_SIGNATURE",
    "IncompleteProxyHeader",
    "MalformedProxyHeader",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderParser",
    "ProxyHeaderTooLong",
    "ProxySignatureError",
    "encode_proxy_v1",
    "encode_proxy_v2",
]

#: The longest v1 line, CRLF included ("PROXY UNKNOWN" with two full IPv6 addresses).
MAX_V1_LINE = 107
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PREFIX = struct.Struct("!12sBBH")
#: The shortest possible header of either version ("PROXY UNKNOWN\r\n").
_MIN_HEADER = 15
#: Largest v2 address and TLV block: the whole header then fits in the 536 bytes the protocol
#: is designed for (two UNIX addresses and a few TLVs: authority, SSL, unique id).
MAX_V2_LENGTH = 520
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20

_FAMILIES = {0: "UNSPEC", 1: "INET", 2: "INET6", 3: "UNIX"}
_TRANSPORTS = {0: "UNSPEC", 1: "STREAM", 2: "DGRAM"}
#: Address block sizes by family (addresses, then ports for INET/INET6).
_ADDRESS_BYTES = {"INET": 12, "INET6": 36, "UNIX": 216}
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


class ProxyHeaderError(FramingError):
    """The stream does not start with an acceptable PROXY protocol header."""

    reason = "malformed"


class ProxySignatureError(ProxyHeaderError):
    """Not a PROXY header (``signature``), or one of a version not accepted (``version``)."""

    def __init__(self, detail: str, reason: str = "signature") -> None:
        super().__init__(detail)
        self.reason = reason


class ProxyHeaderTooLong(ProxyHeaderError):
    """A v1 line without its CRLF in 107 bytes, or a v2 block over ``max_v2_length``."""

    reason = "too_long"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"PROXY header of {size}+ bytes exceeds {limit}")
        self.size = size
        self.limit = limit


class MalformedProxyHeader(ProxyHeaderError):
    """The header's signature is right, its content is not."""


class IncompleteProxyHeader(ProxyHeaderError):
    """The stream ended before the header was complete (``buffered`` bytes of it, maybe 0)."""

    reason = "incomplete"

    def __init__(self, buffered: int) -> None:
        super().__init__(f"stream ended after {buffered} bytes of a PROXY header")
        self.buffered = buffered


@dataclass(frozen=True)
class ProxyHeader:
    """A complete header. ``source`` is the client (address, port) when the header names one:
    not for LOCAL (the proxy's own connection), UNKNOWN/UNSPEC or UNIX, where the connection's
    own peer is the one to use."""

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    family: str  # INET, INET6, UNIX, UNSPEC
    transport: str  # STREAM, DGRAM, UNSPEC
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def local(self) -> bool:
        return self.command == "LOCAL"

    def tlv(self, kind: int) -> bytes | None:
        return next((value for t, value in self.tlvs if t == kind), None)

    @property
    def authority(self) -> str | None:
        """PP2_TYPE_AUTHORITY: the host name the client asked for (TLS SNI), if sent."""
        value = self.tlv(PP2_TYPE_AUTHORITY)
        return None if value is None else value.decode("utf-8", "replace")


class ProxyHeaderParser:
    """Incremental: :meth:`feed` the stream's first bytes until it returns the header; what
    follows it is :attr:`rest`. ``versions``: the versions accepted (1, 2 or both)."""

    def __init__(
        self, versions: Collection[int] = (1, 2), max_v2_length: int = MAX_V2_LENGTH
    ) -> None:
        self.versions = frozenset(versions)
        self.max_v2_length = max_v2_length
        self._buf = bytearray()
        self._limit = max(MAX_V1_LINE, _V2_PREFIX.size)  # until the version is known
        self.header: ProxyHeader | None = None
        self.rest = b""

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def wanted(self) -> int:
        """How many bytes to read next that cannot go past the end of the header: a reader
        that reads exactly this many at a time (``recv_into`` a buffer of that size) never
        takes a byte of what follows the header off the socket (a TLS ClientHello, say, that
        the next protocol must read itself). The shortest headers are 15 bytes (v1
        ``PROXY UNKNOWN``) and 16 (v2 LOCAL); a v1 line ends with CRLF; a v2 block's length is
        in its prefix."""
        buf = self._buf
        if len(buf) < _MIN_HEADER:
            return _MIN_HEADER - len(buf)
        if buf[:1] == b"\r":  # v2: the prefix, then exactly its block
            return max(1, self._limit - len(buf)) if len(buf) >= _V2_PREFIX.size else (
                _V2_PREFIX.size - len(buf))  # fmt: skip
        return 1 if buf[-1:] == b"\r" else 2  # v1: at least the CRLF is still to come

    def feed(self, data: bytes) -> ProxyHeader | None:
        """The header once complete (then the bytes after it are in :attr:`rest`), else None
        (more is needed). Raises :class:`ProxyHeaderError`."""
        if self.header is not None:
            raise RuntimeError("the header is already complete: read .rest")
        pos = 0
        while True:
            take = min(len(data) - pos, self._limit - len(self._buf))  # never past the header
            self._buf += data[pos : pos + take]
            pos += take
            header, end = self._parse()  # may raise the limit once the version is known
            if header is not None:
                self.header = header
                self.rest = bytes(self._buf[end:]) + bytes(data[pos:])
                self._buf.clear()
                return header
            if pos == len(data):
                return None
            if len(self._buf) >= self._limit:  # more data, and the header cannot complete
                raise ProxyHeaderTooLong(len(self._buf) + 1, self._limit)

    def close(self) -> None:
        """The stream ended: an error unless the header was complete."""
        if self.header is None:
            raise IncompleteProxyHeader(len(self._buf))

    # -- parsing ----------------------------------------------------------------------------
    def _parse(self) -> tuple[ProxyHeader | None, int]:
        buf = self._buf
        if buf[:1] == b"P":
            return self._v1(buf)
        if buf[:1] == b"\r":
            return self._v2(buf)
        if buf:
            raise ProxySignatureError("the stream does not start with a PROXY header")
        return None, 0

    def _want(self, version: int) -> None:
        if version not in self.versions:
            raise ProxySignatureError(
                f"a PROXY protocol v{version} header: this listener takes "
                + " or ".join(f"v{v}" for v in sorted(self.versions)), reason="version",
            )  # fmt: skip

    def _v1(self, buf: bytearray) -> tuple[ProxyHeader | None, int]:
        if not buf.startswith(V1_PREFIX[: len(buf)]):
            raise ProxySignatureError("the stream does not start with a PROXY header")
        if len(buf) < len(V1_PREFIX):
            return None, 0
        self._want(1)
        self._limit = MAX_V1_LINE
        end, cr, lf = buf.find(b"\r\n"), buf.find(b"\r"), buf.find(b"\n")
        complete_but_stray = end >= 0 and (cr, lf) != (end, end + 1)
        # No CRLF yet: any LF is lone; a CR is too, unless it is the last byte (half a CRLF).
        incomplete_but_stray = end < 0 and (lf >= 0 or 0 <= cr < len(buf) - 1)
        if complete_but_stray or incomplete_but_stray:
            raise MalformedProxyHeader("a lone CR or LF in the PROXY line")
        if end < 0:
            if len(buf) >= MAX_V1_LINE:
                raise ProxyHeaderTooLong(len(buf), MAX_V1_LINE)
            return None, 0
        return _v1_line(bytes(buf[:end])), end + 2

    def _v2(self, buf: bytearray) -> tuple[ProxyHeader | None, int]:
        if not V2_SIGNATURE.startswith(bytes(buf[:12])):
            raise ProxySignatureError("the stream does not start with a PROXY header")
        if len(buf) < _V2_PREFIX.size:
            if len(buf) > 12 and buf[12] >> 4 != 2:
                raise MalformedProxyHeader(f"PROXY v2 signature with version {buf[12] >> 4}")
            return None, 0
        _, ver_cmd, fam, length = _V2_PREFIX.unpack_from(buf)
        if ver_cmd >> 4 != 2:
            raise MalformedProxyHeader(f"PROXY v2 signature with version {ver_cmd >> 4}")
        self._want(2)
        if length > self.max_v2_length:
            raise ProxyHeaderTooLong(_V2_PREFIX.size + length, _V2_PREFIX.size + self.max_v2_length)
        self._limit = end = _V2_PREFIX.size + length
        if len(buf) < end:
            return None, 0
        return _v2_block(ver_cmd & 0xF, fam, bytes(buf[_V2_PREFIX.size : end])), end


def _v1_line(line: bytes) -> ProxyHeader:
    if any(b < 0x20 or b > 0x7E for b in line):
        raise MalformedProxyHeader("a PROXY line is printable US-ASCII")
    parts = line.split(b" ")
    family = parts[1] if len(parts) > 1 else b""
    if family == b"UNKNOWN":
        return ProxyHeader(1, "PROXY", "UNSPEC", "UNSPEC", None, None)
    if family not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise MalformedProxyHeader("a PROXY line is PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    kind = ipaddress.IPv4Address if family == b"TCP4" else ipaddress.IPv6Address
    src, dst = (_v1_address(kind, p) for p in parts[2:4])
    sport, dport = (_v1_port(p) for p in parts[4:6])
    name = "INET" if family == b"TCP4" else "INET6"
    return ProxyHeader(1, "PROXY", name, "STREAM", (src, sport), (dst, dport))


def _v1_address(kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address], raw: bytes) -> str:
    text = raw.decode("ascii")
    if "%" in text:  # (IPv4-mapped IPv6 in its dotted form, ::ffff:192.0.2.1, is fine)
        raise MalformedProxyHeader(f"not a canonical address: {text!r}")
    try:
        return str(kind(text))
    except ValueError:
        raise MalformedProxyHeader(f"not a canonical address: {text!r}") from None


def _v1_port(raw: bytes) -> int:
    if not _PORT.fullmatch(raw) or int(raw) > 65535:
        raise MalformedProxyHeader(f"not a port: {raw.decode('ascii')!r}")
    return int(raw)


def _v2_block(command: int, fam: int, block: bytes) -> ProxyHeader:
    if command not in (0, 1):
        raise MalformedProxyHeader(f"PROXY v2 command {command} is not LOCAL or PROXY")
    family, transport = _FAMILIES.get(fam >> 4), _TRANSPORTS.get(fam & 0xF)
    if family is None or transport is None:
        raise MalformedProxyHeader(f"PROXY v2 family/protocol byte {fam:#04x} is not defined")
    if command == 0:  # LOCAL: the proxy's own connection; the block is discarded
        return ProxyHeader(2, "LOCAL", family, transport, None, None)
    need = _ADDRESS_BYTES.get(family, 0) if transport != "UNSPEC" else 0
    if len(block) < need:
        raise MalformedProxyHeader(f"PROXY v2 {family} addresses need {need} bytes")
    source = destination = None
    if need and family in ("INET", "INET6"):
        size = 4 if family == "INET" else 16
        kind = ipaddress.IPv4Address if family == "INET" else ipaddress.IPv6Address
        src, dst = kind(block[:size]), kind(block[size : 2 * size])
        sport, dport = struct.unpack_from("!HH", block, 2 * size)
        source, destination = (str(src), sport), (str(dst), dport)
    return ProxyHeader(2, "PROXY", family, transport, source, destination, _tlvs(block[need:]))


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    """The TLVs after the addresses; each must fit in what is left."""
    out, pos = [], 0
    while pos < len(data):
        if pos + 3 > len(data):
            raise MalformedProxyHeader("a PROXY v2 TLV is cut short")
        kind, size = data[pos], int.from_bytes(data[pos + 1 : pos + 3], "big")
        if pos + 3 + size > len(data):
            raise MalformedProxyHeader(f"a PROXY v2 TLV of type {kind:#04x} overruns the header")
        out.append((kind, data[pos + 3 : pos + 3 + size]))
        pos += 3 + size
    return tuple(out)


# -- encoders (for clients and tests: what a proxy sends) -----------------------------------


def encode_proxy_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 line; ``None`` addresses make ``PROXY UNKNOWN``."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP4" if ipaddress.ip_address(source[0]).version == 4 else "TCP6"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def encode_proxy_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    tlvs: Collection[tuple[int, bytes]] = (),
) -> bytes:
    """A v2 header; ``None`` addresses make a LOCAL one (a health check's)."""
    if source is None or destination is None:
        return _V2_PREFIX.pack(V2_SIGNATURE, 0x20, 0x00, 0)
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    fam = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    block += b"".join(bytes((kind,)) + len(value).to_bytes(2, "big") + value
                      for kind, value in tlvs)  # fmt: skip
    return _V2_PREFIX.pack(V2_SIGNATURE, 0x21, fam, len(block)) + block
