"""One error hierarchy for what a client is told: each class is an ERROR code, and says whether
the connection closes after it. The connection maps them to ERROR messages in one place."""

from __future__ import annotations

from typing import ClassVar

from .messages import ErrorCode


class CmdexecError(Exception):
    """Something to answer with ERROR{code, message}."""

    code: ClassVar[ErrorCode]
    #: The connection is closed after the ERROR (the conversation cannot go on).
    closes: ClassVar[bool] = True


class Unauthorized(CmdexecError):
    code = ErrorCode.UNAUTHORIZED


class AuthTimeout(CmdexecError):
    code = ErrorCode.TIMEOUT


class BadRequest(CmdexecError):
    code = ErrorCode.BAD_REQUEST


class TooLarge(CmdexecError):
    code = ErrorCode.TOO_LARGE


class Forbidden(CmdexecError):
    """The request is well-formed but not allowed; the message says why."""

    code = ErrorCode.FORBIDDEN
    closes = False


class Busy(CmdexecError):
    code = ErrorCode.BUSY
    closes = False


class ShuttingDown(Busy):
    closes = True


class Internal(CmdexecError):
    code = ErrorCode.INTERNAL
    closes = False


class ClientGone(Exception):
    """The client went away or stopped reading (a write missed its deadline): nothing more can
    be told; the connection is reset."""
