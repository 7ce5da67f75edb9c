"""A cmdexec connection's states, and what each client message does in each: the one table the
connection and the runner read (as h11 keeps its state machine as tables in ``_state.py``)::

    AUTHENTICATING --AUTH, right credential--> IDLE --EXEC allowed--> RUNNING --EXIT--> IDLE
                                                 |                       |
                                       SIGTERM: DRAINING <---- its EXIT -+ (SIGTERM meanwhile)

A kind a state does not list is out of place: before AUTH it is ``unauthorized``, after it
``bad_request`` (a running command is ended, ``aborted``); both close the connection.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from .messages import Kind

__all__ = ["TABLE", "Act", "State", "act"]


class State(enum.Enum):
    AUTHENTICATING = "authenticating"  # one small frame, the AUTH, within timeout_auth_s
    IDLE = "idle"  # authenticated; EXEC after EXEC
    RUNNING = "running"  # a command runs: the client feeds it and may signal it
    DRAINING = "draining"  # the server stops: nothing new; the connection closes once idle


class Act(enum.Enum):
    HANDLE = "handle"  # the state's business
    DROP = "drop"  # harmless, ignored: the tail of a run that has just ended
    SHUT = "shut"  # a request the server no longer takes: busy, and close
    REFUSE = "refuse"  # out of place: an error, and close


_TAIL = {Kind.STDIN: Act.DROP, Kind.STDIN_EOF: Act.DROP, Kind.SIGNAL: Act.DROP}
TABLE: Mapping[State, Mapping[Kind, Act]] = {
    State.AUTHENTICATING: {Kind.AUTH: Act.HANDLE},
    State.IDLE: {Kind.EXEC: Act.HANDLE, **_TAIL},
    State.RUNNING: {Kind.STDIN: Act.HANDLE, Kind.STDIN_EOF: Act.HANDLE, Kind.SIGNAL: Act.HANDLE},
    State.DRAINING: {Kind.EXEC: Act.SHUT, **_TAIL},
}


def act(state: State, kind: Kind) -> Act:
    return TABLE[state].get(kind, Act.REFUSE)
