"""What a probe datagram holds, sans-I/O.

    0       4        12       20           28
    | WKP1 | nonce  | seq    | sent (ns)  | zero padding up to the probe's size |

All integers unsigned big-endian. ``nonce`` is random per prober session: a reply carrying
another nonce was sent by someone else (another prober, a spoofer, a session before a
restart) and is ignored. ``seq`` counts from 0 per target; ``sent`` is the sender's monotonic
clock in nanoseconds, echoed back unchanged (the tracker times replies with its own record of
the send and uses this only as a check). An echo that changes any byte is not an echo: a
reply of another length or with a changed header is counted by reason and ignored."""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

MAGIC: Final = b"WKP1"
HEADER: Final = struct.Struct(">4sQQQ")
#: The smallest probe: the header alone.
MIN_SIZE: Final = HEADER.size
#: The largest probe: what one IPv4 datagram carries without fragments on a 1500-byte MTU.
MAX_SIZE: Final = 1472

_ZEROS: Final = bytes(MAX_SIZE - MIN_SIZE)

#: Why a datagram is not a reply to one of our probes: the ``reason`` of invalid replies.
INVALID_REASONS: Final = ("short", "magic", "nonce", "size", "wrong_source", "unknown")


class NotAReply(ValueError):
    """A datagram that is not an echo of one of this session's probes; ``reason`` is one of
    INVALID_REASONS."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Probe(NamedTuple):
    seq: int
    sent_ns: int


def encode(nonce: int, seq: int, sent_ns: int, size: int) -> bytes:
    """One probe of ``size`` bytes (MIN_SIZE..MAX_SIZE)."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"probe size {size} outside {MIN_SIZE}..{MAX_SIZE}")
    return HEADER.pack(MAGIC, nonce, seq, sent_ns) + _ZEROS[: size - MIN_SIZE]


def decode(data: bytes, nonce: int, size: int) -> Probe:
    """The probe ``data`` echoes, or NotAReply: shorter than a header (``short``), not a probe
    (``magic``), another session's (``nonce``), not the length we send (``size``)."""
    if len(data) < MIN_SIZE:
        raise NotAReply("short")
    magic, got_nonce, seq, sent_ns = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise NotAReply("magic")
    if got_nonce != nonce:
        raise NotAReply("nonce")
    if len(data) != size:
        raise NotAReply("size")
    return Probe(seq, sent_ns)
