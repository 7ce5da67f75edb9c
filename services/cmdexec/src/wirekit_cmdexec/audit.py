"""The audit trail: one JSON event per authentication attempt and per EXEC, on a logger of its
own (``wirekit_cmdexec.audit``), to ``audit_file`` or stderr, never through the operational
log. Never the token; the arguments, yes (an audit trail says what ran). The fields are the
README's (docs/cmdexec.md) audit table: these two functions are the only writers."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import Sequence

from wirekit_servicekit import Peer, TraceContextFilter
from wirekit_servicekit.logs import json_formatter

from .runner import Outcome

__all__ = ["audit", "auth_event", "configure", "exec_event"]

audit = logging.getLogger("wirekit_cmdexec.audit")


def configure(audit_file: str | None, service: str, worker: int | None) -> None:
    """Audit events to ``audit_file`` (JSON lines, reopened when logrotate moves it) or to
    stderr; a second call replaces the first's handler."""
    handler: logging.Handler
    if audit_file:
        handler = logging.handlers.WatchedFileHandler(audit_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter(service, worker))
    handler.addFilter(TraceContextFilter())
    for old in list(audit.handlers):
        audit.removeHandler(old)
        old.close()
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    audit.propagate = False


def _where(peer: Peer) -> dict[str, object]:
    """``source``: the client (address:port); ``proxy``: the proxy it came through (PROXY
    protocol), or null."""
    proxy = None if peer.proxy is None else str(Peer(*peer.proxy))
    return {"source": str(peer), "proxy": proxy}


def auth_event(
    *, identity: str | None, peer: Peer, method: str | None, denied: str | None,
    under_attack: bool = False,
) -> None:  # fmt: skip
    """An authentication attempt: allowed (``denied`` None) or denied and why; whether the
    service was under a login attack (failures answered late) when it failed."""
    fields = {"event": "auth", "identity": identity, **_where(peer), "method": method,
              "decision": "denied" if denied else "allowed", "reason": denied,
              "under_attack": under_attack}  # fmt: skip
    (audit.warning if denied else audit.info)("auth", extra=fields)


def exec_event(
    *, identity: str, peer: Peer, argv: Sequence[str], shell: bool,
    denied: str | None = None, outcome: Outcome | None = None,
) -> None:  # fmt: skip
    """An EXEC: denied (and why), or how the command it ran ended."""
    fields: dict[str, object] = {
        "event": "exec", "identity": identity, **_where(peer), "argv": list(argv),
        "shell": shell, "decision": "denied" if denied else "allowed", "reason": denied,
    }  # fmt: skip
    if outcome is None:
        fields.update(result="denied", exit_code=None, signal=None, duration_s=None, bytes_out=0)
        audit.warning("exec", extra=fields)
        return
    fields.update(
        result=outcome.result, exit_code=outcome.code, signal=outcome.signal,
        duration_s=round(outcome.duration_s, 6),
        bytes_out=outcome.sent["stdout"] + outcome.sent["stderr"],
        timed_out=outcome.timed_out, output_capped=outcome.output_capped,
        aborted=outcome.aborted,
    )  # fmt: skip
    audit.info("exec", extra=fields)
