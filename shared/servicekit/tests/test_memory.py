"""The Trimmer: a burst's freed memory handed back to the system once the listener is quiet,
not while it is busy, and nothing done when the RSS did not grow."""

from __future__ import annotations

import asyncio

from wirekit_servicekit.memory import Trimmer, malloc_trim, rss_bytes

MIB = 1024 * 1024


def fragmented_burst() -> list[bytes]:
    """Allocate ~96 MiB in 64 KiB buffers (from the heap, under glibc's mmap threshold) and
    free all but every 32nd: the holes keep glibc from giving the pages back by itself."""
    burst = [bytes(64 * 1024) for _ in range(1536)]
    kept = burst[::32]
    del burst
    return kept


def test_malloc_trim_is_there_on_glibc() -> None:
    assert malloc_trim() is True  # Debian (and the image): glibc


async def test_a_quiet_listener_after_a_burst_gives_the_memory_back() -> None:
    trimmer = Trimmer(quiet_s=0.05, growth=16 * MIB)
    kept = fragmented_burst()
    held = rss_bytes()
    assert held - trimmer.baseline >= 32 * MIB  # the burst is still resident: nothing trims alone
    trimmer.empty()
    await asyncio.sleep(0.3)
    assert trimmer.trims == 1
    assert rss_bytes() < held - 32 * MIB
    assert trimmer.baseline <= held - 32 * MIB  # the next trim waits for new growth
    del kept


async def test_a_busy_listener_is_not_trimmed_nor_one_that_did_not_grow() -> None:
    trimmer = Trimmer(quiet_s=0.05, growth=16 * MIB)
    trimmer.empty()
    await asyncio.sleep(0.2)
    assert trimmer.trims == 0  # no growth since it was made
    kept = fragmented_burst()
    trimmer.empty()
    trimmer.busy()  # a connection came before the listener had been quiet for quiet_s
    await asyncio.sleep(0.2)
    assert trimmer.trims == 0
    trimmer.empty()
    await asyncio.sleep(0.2)
    assert trimmer.trims == 1
    trimmer.close()
    del kept
