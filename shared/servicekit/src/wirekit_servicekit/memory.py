"""Memory handed back after a burst.

A burst of connections with large frames leaves the process with its peak RSS: Python gives
its small-object arenas back when they empty, but the large buffers (reads, frames, write
queues) come from the C allocator, and glibc keeps what was freed for later -- on this machine
213 MiB of a 240 MiB peak stayed after a 1,000-connection soak. ``malloc_trim(0)`` returns the
free pages of every arena to the system (the top of the heap, and whole free pages inside it,
with ``MADV_DONTNEED``).

:class:`Trimmer` calls it when a listener has had no connection for ``QUIET_S`` and the RSS has
grown by ``GROWTH_BYTES`` or more since the last trim (or the start): a quiet service after a
burst, not a busy one (a trim of a large heap takes milliseconds and holds the loop). Where
there is no glibc (musl, other systems) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

__all__ = ["QUIET_S", "Trimmer", "malloc_trim", "rss_bytes"]

log = logging.getLogger(__name__)

#: How long a listener must have been without connections before memory is trimmed.
QUIET_S = 1.0
#: How much the RSS must have grown since the last trim for another to be worth its time.
GROWTH_BYTES = 16 * 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _load() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # no libc by that name, or not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load()


def malloc_trim() -> bool:
    """Return the C allocator's free memory to the system; False where that is not possible."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def rss_bytes() -> int:
    """This process's resident set, from /proc/self/statm (0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class Trimmer:
    """Trims once a listener has been empty for ``quiet_s`` after the RSS grew (see the module).
    ``empty()`` when the last connection went, ``busy()`` when one came; owned by one loop."""

    def __init__(self, quiet_s: float = QUIET_S, growth: int = GROWTH_BYTES) -> None:
        self.quiet_s = quiet_s
        self.growth = growth
        self.baseline = rss_bytes()
        self.trims = 0
        self._handle: asyncio.TimerHandle | None = None

    def empty(self) -> None:
        if self._handle is not None or _malloc_trim is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # released outside a loop (a unit test): nothing to schedule on
            return
        self._handle = loop.call_later(self.quiet_s, self._trim)

    def busy(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def close(self) -> None:
        self.busy()

    def _trim(self) -> None:
        self._handle = None
        before = rss_bytes()
        if before - self.baseline < self.growth:
            return
        malloc_trim()
        self.baseline = after = rss_bytes()
        self.trims += 1
        log.debug("memory trimmed", extra={"rss_before": before, "rss_after": after})
