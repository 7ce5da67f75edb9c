"""cmdexec messages, carried one per frame: first byte = kind, the rest = body.

Control messages have a JSON object body, validated by the strict pydantic models below (no
coercion: ``"yes"`` is not a boolean, ``"0.5"`` not a number; unknown fields refused; the JSON
parser refuses nesting deeper than ~200 levels); data messages (STDIN, STDOUT, STDERR) carry raw
bytes. Each side decodes only the kinds the other side may send. The full specification is in
docs/protocol.md.
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "CLIENT_KINDS",
    "SERVER_KINDS",
    "SIGNALS",
    "Auth",
    "BadMessage",
    "Error",
    "ErrorCode",
    "Exec",
    "Exit",
    "Kind",
    "Signal",
    "decode",
    "decode_client",
    "encode_data",
    "encode_json",
]


class Kind(enum.IntEnum):
    # client -> server
    AUTH = 0x01
    EXEC = 0x02
    STDIN = 0x03
    STDIN_EOF = 0x04
    SIGNAL = 0x05
    # server -> client
    STDOUT = 0x81
    STDERR = 0x82
    EXIT = 0x83
    ERROR = 0x84


CLIENT_KINDS = frozenset({Kind.AUTH, Kind.EXEC, Kind.STDIN, Kind.STDIN_EOF, Kind.SIGNAL})
SERVER_KINDS = frozenset({Kind.STDOUT, Kind.STDERR, Kind.EXIT, Kind.ERROR})


class ErrorCode(enum.StrEnum):
    UNAUTHORIZED = "unauthorized"  # before AUTH succeeded: anything but a right token; closes
    FORBIDDEN = "forbidden"  # not on the allowlist, or an argument fails its pattern
    BAD_REQUEST = "bad_request"  # unknown or malformed message, or one out of place; closes
    BUSY = "busy"  # limit_runs commands are running (or the server is shutting down)
    TOO_LARGE = "too_large"  # frame or EXEC over its limit; closes
    TIMEOUT = "timeout"  # no AUTH within timeout_auth_s; closes
    INTERNAL = "internal"  # the command could not be started


#: Signals a client may send to its running command (the whole process group).
SIGNALS = ("HUP", "INT", "QUIT", "TERM", "KILL", "USR1", "USR2")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Auth(_Body):
    token: str  # any length within the pre-auth frame limit: only its digest is compared


class Exec(_Body):
    argv: Annotated[list[Annotated[str, Field(max_length=65536)]], Field(min_length=1)]
    timeout_s: Annotated[float, Field(gt=0)] | None = None
    stdin: bool = False  # the client will send STDIN messages (else the child reads /dev/null)
    shell: bool = False  # argv[0] is a /bin/sh -c string: refused unless allow_shell is on
    traceparent: Annotated[str, Field(max_length=256)] | None = None
    tracestate: Annotated[str, Field(max_length=512)] | None = None


class Signal(_Body):
    name: Literal["HUP", "INT", "QUIT", "TERM", "KILL", "USR1", "USR2"]


class Exit(_Body):
    code: int | None = None  # exit status, when the command exited
    signal: str | None = None  # signal name (e.g. "KILL"), when a signal ended it
    duration_s: float
    timed_out: bool = False
    output_capped: bool = False  # ended by the server: a stream passed limit_output_bytes
    truncated: dict[str, bool] = Field(default_factory=lambda: {"stdout": False, "stderr": False})


class Error(_Body):
    code: str
    message: str


_MODELS: dict[Kind, type[_Body]] = {
    Kind.AUTH: Auth,
    Kind.EXEC: Exec,
    Kind.SIGNAL: Signal,
    Kind.EXIT: Exit,
    Kind.ERROR: Error,
}
_DATA = frozenset({Kind.STDIN, Kind.STDOUT, Kind.STDERR})
_EMPTY = frozenset({Kind.STDIN_EOF})


class BadMessage(Exception):
    """A frame that is not a valid message from the sending side (unknown kind, a kind the
    sender may not send, bad JSON, wrong fields or types)."""


def encode_json(kind: Kind, body: BaseModel | dict[str, Any]) -> bytes:
    """Payload of a control message (frame it with wirekit_framing.encode)."""
    data = (
        body.model_dump_json(exclude_none=True) if isinstance(body, BaseModel) else json.dumps(body)
    )
    return bytes((kind,)) + data.encode()


def encode_data(kind: Kind, data: bytes) -> bytes:
    return bytes((kind,)) + data


def decode(payload: bytes, allowed: frozenset[Kind] = SERVER_KINDS) -> tuple[Kind, Any]:
    """(kind, body) of a message from the side that may send ``allowed`` kinds: a model for
    control messages, bytes for data, None for STDIN_EOF. Raises :class:`BadMessage` and
    nothing else, whatever the payload."""
    if not payload:
        raise BadMessage("empty message")
    try:
        kind = Kind(payload[0])
    except ValueError:
        raise BadMessage(f"unknown message kind 0x{payload[0]:02x}") from None
    if kind not in allowed:
        raise BadMessage(f"{kind.name} is not a message this side may send")
    body = payload[1:]
    if kind in _DATA:
        return kind, body
    if kind in _EMPTY:
        if body:
            raise BadMessage(f"{kind.name} carries no body")
        return kind, None
    try:
        return kind, _MODELS[kind].model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadMessage(f"{kind.name}: {where}: {first['msg']}") from None
    except Exception as exc:  # never anything else, whatever the bytes: a typed refusal
        raise BadMessage(f"{kind.name}: unreadable body ({type(exc).__name__})") from None


def decode_client(payload: bytes) -> tuple[Kind, Any]:
    """A message from a client: server kinds (STDOUT, ERROR, ...) are refused."""
    return decode(payload, CLIENT_KINDS)
