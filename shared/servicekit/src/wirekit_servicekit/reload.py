"""SIGHUP, the reload signal, safe from the first instant of a service that reloads.

SIGHUP's default action ends a process, and config reloaders fire exactly when a service starts
(a sidecar that just wrote the file, ``docker kill -s HUP`` in a deploy script, a supervisor
forwarding to a worker that is still starting). So a service that reloads blocks SIGHUP before
anything slow -- :func:`hold`, the first statement of its ``__main__``, before the imports of
pydantic and OpenTelemetry -- and releases it only once its handler is installed
(:func:`release`): a SIGHUP that came in between was kept pending by the kernel and is taken
then, and the configuration is read again. Blocked signals stay blocked across ``exec``: a
supervisor starts its workers with SIGHUP blocked (:func:`held`), so a worker is covered from
its first instruction. What is left is the interpreter's own start, before any code of the
service runs (a few milliseconds; nginx and HAProxy have the same window before their handlers).

Imports nothing but :mod:`signal`: it runs before everything else (contextlib alone would
cost 9 ms here).
"""

from __future__ import annotations

import signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["RELOAD_SIGNAL", "held", "hold", "release", "restore"]

RELOAD_SIGNAL = signal.SIGHUP
_SET = {RELOAD_SIGNAL}


def hold() -> bool:
    """Block SIGHUP in this thread (threads and children started from it inherit the block);
    return whether it was blocked already."""
    return RELOAD_SIGNAL in signal.pthread_sigmask(signal.SIG_BLOCK, _SET)


def release() -> bool:
    """Once SIGHUP has its handler: take a SIGHUP that came while it was blocked (True when
    there was one: the caller reloads now) and unblock it."""
    import threading  # not at import time: hold() comes first

    pending = False
    if threading.current_thread() is threading.main_thread():
        if RELOAD_SIGNAL in signal.sigpending():
            pending = signal.sigtimedwait(_SET, 0) is not None
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SET)
    return pending


def restore(was_blocked: bool) -> None:
    """Put SIGHUP's block back as it was (blocked at the end of a service's life: a late
    SIGHUP waits, harmless, instead of ending a process that is exiting cleanly). Unblocking, a
    SIGHUP that came while it was held is dropped: the reload it asked for is moot."""
    if was_blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SET)
        return
    if RELOAD_SIGNAL in signal.sigpending():
        signal.sigtimedwait(_SET, 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SET)


class held:  # a context manager, named as what it does
    """SIGHUP blocked for what is started inside (a worker: blocked from its first
    instruction until it has its handler); the block as it was after."""

    def __enter__(self) -> None:
        self._was_blocked = hold()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        restore(self._was_blocked)
