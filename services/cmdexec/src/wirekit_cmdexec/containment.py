"""No process outlives its run, whatever it does: background children, ``setsid`` daemons,
double forks.

Every command starts in a session of its own (``start_new_session``: session id = its pid).
The service is a child subreaper (``PR_SET_CHILD_SUBREAPER``): whatever a command leaves behind
is re-parented to the service, not to PID 1, once its parent dies. A process can leave its
run's process group but never re-enter another session than its own, so the session tells
where a child of ours comes from:

- a run's main process, or a process in a live run's session: left alone;
- a process in the service's own session: not a run's (tests spawn such children);
- anything else -- a process of an ended run, or one that called ``setsid`` to escape its run
  (a daemon) -- is killed (SIGKILL) and reaped.

:meth:`Containment.sweep` applies that to the service's direct children: at the end of every
run (before EXIT is sent) and every ``SWEEP_S`` (an escape during a run). What a killed process
leaves behind is re-parented to the service in turn and goes at the next sweep.

A cgroup v2 per run with ``cgroup.kill`` would be the kernel's own way; it is not used: the
images run with a read-only ``/sys/fs/cgroup`` and no capability, where it is impossible, and
placing a command in its cgroup before its first instruction costs one more exec per run
(~1 ms here, as much as the whole spawn).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

#: How often the service looks for escaped processes while runs go on (seconds).
SWEEP_S = 0.25
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_DUMPABLE = 4


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def make_undumpable() -> bool:
    """``PR_SET_DUMPABLE 0``: the process's ``/proc`` files (environ, mem, fds) become root's,
    so commands running as the same user cannot read the token from them. Linux only."""
    return _prctl(_PR_SET_DUMPABLE, 0)


def _children() -> list[int]:
    """The direct children of the calling thread. Commands are spawned from the event loop's
    thread, and their orphans are re-parented to that same thread (the kernel hands them to a
    live thread of the subreaper, starting with the one that forked their ancestor): one read,
    no walk over every thread."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/children") as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:
        return []


def _stat(pid: int) -> tuple[bytes, int] | None:
    """(state, session id) of a process, None when it is gone. After the command name come
    state, ppid, pgrp, session (proc(5))."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[3])
    except (OSError, IndexError, ValueError):
        return None


class Containment:
    """Process-wide (the subreaper is a property of the process): the sessions of live runs,
    and the sweep that kills whatever belongs to none."""

    def __init__(self) -> None:
        self.subreaper = _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        self.own_session = os.getsid(0)
        self.live: set[int] = set()  # session ids (= main pids) of runs in progress
        self.killed = 0  # processes killed by a sweep (escaped or left behind)
        self._spawning = 0

    @contextlib.contextmanager
    def spawning(self) -> Iterator[None]:
        """While a run is being spawned its session is not registered yet: no sweep."""
        self._spawning += 1
        try:
            yield
        finally:
            self._spawning -= 1

    def sweep(self) -> int:
        """Kill and reap our children that belong to no live run; return how many were killed."""
        if self._spawning:
            return 0
        killed = 0
        for pid in _children():
            if pid in self.live:
                continue
            stat = _stat(pid)
            if stat is None:
                continue
            state, session = stat
            if session == self.own_session or session in self.live:
                continue
            if state != b"Z":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # our unreaped child: the pid cannot be reused
                killed += 1
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        self.killed += killed
        return killed


_instance: Containment | None = None


def containment() -> Containment:
    """The one instance of this process, made (and the process made a subreaper) on first use."""
    global _instance
    if _instance is None:
        _instance = Containment()
    return _instance
