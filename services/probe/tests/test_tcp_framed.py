"""tcp-framed against a framed echo that ends each connection cleanly after one answer (as
echo's drain half-closes quiet connections), and one that answers with junk."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from wirekit_framing import read_frame, write_frame
from wirekit_probe.runners import Pacer, run_tcp_framed
from wirekit_probe.series import Series
from wirekit_probe.targets import Endpoint
from wirekit_probe.tracker import Tracker

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


@contextlib.asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[int]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


async def probe(port: int, count: int) -> Series:
    series = Series(Endpoint("tcp-framed", "x", "127.0.0.1", port), Tracker(1.0))
    pacer = Pacer(lambda: 20.0, None, series, poisson=False)
    async with asyncio.timeout(30):
        await run_tcp_framed(series, pacer, size=64, timeout_s=1.0, connect_timeout_s=1.0,
                             count=count)  # fmt: skip
    return series


async def test_a_connection_ended_cleanly_between_probes_loses_nothing() -> None:
    async def one_answer_then_fin(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        frame = await read_frame(reader)
        if frame is not None:
            await write_frame(w, frame)
        await asyncio.sleep(0.01)
        w.close()  # a FIN after the last answer: nothing owed

    async with server(one_answer_then_fin) as port:
        series = await probe(port, 6)
    t = series.tracker
    assert (t.sent, t.received, t.lost) == (6, 6, 0)
    assert series.connects["ok"] == 6  # a new connection for each probe


async def test_a_reply_that_is_not_ours_is_counted_and_the_probe_lost() -> None:
    async def junk(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while (frame := await read_frame(reader)) is not None:
            await write_frame(w, b"XXXX" + frame[4:])

    async with server(junk) as port:
        series = await probe(port, 3)
    assert (series.tracker.received, series.tracker.lost) == (0, 3)
    assert series.invalid["magic"] == 3
