"""cmdexec messages, carried one per frame: first byte = kind, the rest = body.

Control messages have a JSON object body, validated by the pydantic models below; data messages
(STDIN, STDOUT, STDERR) carry raw bytes. The full specification is in docs/protocol.md.
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "SIGNALS",
    "Auth",
    "BadMessage",
    "ErrorCode",
    "Exec",
    "Exit",
    "Kind",
    "Signal",
    "decode",
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


class ErrorCode(enum.StrEnum):
    UNAUTHORIZED = "unauthorized"  # missing or wrong token; the connection closes
    FORBIDDEN = "forbidden"  # not on the allowlist, or an argument fails its pattern
    BAD_REQUEST = "bad_request"  # unknown or malformed message; the connection closes
    BUSY = "busy"  # the server's concurrency cap is reached; try again later
    TOO_LARGE = "too_large"  # frame or EXEC over its limit; the connection closes
    TIMEOUT = "timeout"  # reserved: a run's timeout is reported in EXIT
    INTERNAL = "internal"  # the command could not be started


#: Signals a client may send to its running command (the whole process group).
SIGNALS = ("HUP", "INT", "QUIT", "TERM", "KILL", "USR1", "USR2")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Auth(_Body):
    token: str  # any length: only its SHA-256 digest is compared


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
    truncated: dict[str, bool] = Field(default_factory=lambda: {"stdout": False, "stderr": False})


_MODELS: dict[Kind, type[_Body]] = {
    Kind.AUTH: Auth,
    Kind.EXEC: Exec,
    Kind.SIGNAL: Signal,
    Kind.EXIT: Exit,
}
_DATA = frozenset({Kind.STDIN, Kind.STDOUT, Kind.STDERR})
_EMPTY = frozenset({Kind.STDIN_EOF})


class BadMessage(Exception):
    """A frame that is not a valid message (unknown kind, bad JSON, wrong fields)."""


def encode_json(kind: Kind, body: BaseModel | dict[str, Any]) -> bytes:
    """Payload of a control message (frame it with wirekit_framing.encode)."""
    data = (
        body.model_dump_json(exclude_none=True) if isinstance(body, BaseModel) else json.dumps(body)
    )
    return bytes((kind,)) + data.encode()


def encode_data(kind: Kind, data: bytes) -> bytes:
    return bytes((kind,)) + data


def decode(payload: bytes) -> tuple[Kind, Any]:
    """(kind, body): a model for control messages, bytes for data, None for STDIN_EOF;
    a dict ``{"code", "message"}`` for ERROR."""
    if not payload:
        raise BadMessage("empty message")
    try:
        kind = Kind(payload[0])
    except ValueError:
        raise BadMessage(f"unknown message kind 0x{payload[0]:02x}") from None
    body = payload[1:]
    if kind in _DATA:
        return kind, body
    if kind in _EMPTY:
        if body:
            raise BadMessage(f"{kind.name} carries no body")
        return kind, None
    if kind is Kind.ERROR:
        try:
            err = json.loads(body)
        except ValueError:
            raise BadMessage("ERROR body is not JSON") from None
        if not isinstance(err, dict):
            raise BadMessage("ERROR body is not an object")
        return kind, err
    try:
        return kind, _MODELS[kind].model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadMessage(f"{kind.name}: {where}: {first['msg']}") from None
