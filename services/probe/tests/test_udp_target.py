"""Replies that are not ours, over real sockets: a socket we drive plays the target."""

from __future__ import annotations

import asyncio
import secrets
import socket

from wirekit_probe.udp import UdpTarget
from wirekit_probe.wire import encode


async def test_replies_that_are_not_answers_are_counted_and_ignored() -> None:
    loop = asyncio.get_running_loop()
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind(("127.0.0.1", 0))
    target.settimeout(5)
    nonce = secrets.randbits(64)
    rtts: list[float] = []
    probe = UdpTarget(target.getsockname(), socket.AF_INET, size=64, timeout_s=5.0, nonce=nonce,
                      on_rtt=rtts.append)  # fmt: skip
    try:
        probe.start(loop)
        probe.send()
        data, prober = target.recvfrom(2048)
        stranger.sendto(data, prober)  # the right bytes from the wrong address
        for junk in (b"", b"short", b"XXXX" + data[4:], encode(nonce ^ 1, 0, 0, 64),
                     data + b"!", encode(nonce, 77, 0, 64)):  # fmt: skip
            target.sendto(junk, prober)
        target.sendto(data, prober)  # the answer
        target.sendto(data, prober)  # and again
        for _ in range(200):
            if probe.tracker.duplicate:
                break
            await asyncio.sleep(0.01)
        assert dict(probe.invalid) == {"wrong_source": 1, "short": 2, "magic": 1, "nonce": 1,
                                       "size": 1, "unknown": 1}  # fmt: skip
        assert (probe.tracker.received, probe.tracker.duplicate) == (1, 1)
        assert len(rtts) == 1
        assert probe.tracker.last_ttl == 64
    finally:
        probe.close()
        target.close()
        stranger.close()


async def test_a_flood_of_junk_is_counted_and_the_probes_go_on() -> None:
    """Thousands of datagrams that are not replies: each counted (or dropped by the kernel's
    buffer, never queued by us), the loop never stalls, and the next real reply is taken."""
    loop = asyncio.get_running_loop()
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind(("127.0.0.1", 0))
    target.settimeout(5)
    nonce = secrets.randbits(64)
    probe = UdpTarget(target.getsockname(), socket.AF_INET, size=64, timeout_s=5.0, nonce=nonce)
    try:
        probe.start(loop)
        probe.send()
        first, prober = target.recvfrom(2048)
        target.sendto(first, prober)
        for i in range(5000):
            target.sendto(encode(nonce ^ 1, i, 0, 64) if i % 2 else b"x" * (i % 200), prober)
            if i % 500 == 0:
                await asyncio.sleep(0)  # the prober reads while the flood goes on
        seen = -1
        async with asyncio.timeout(20):
            while sum(probe.invalid.values()) != seen:  # until the socket is drained
                seen = sum(probe.invalid.values())
                await asyncio.sleep(0.1)
        assert probe.tracker.received == 1
        assert 0 < seen <= 5000
        assert set(probe.invalid) <= {"short", "magic", "nonce"}
        probe.send()  # the probes go on
        second, _ = target.recvfrom(2048)
        target.sendto(second, prober)
        async with asyncio.timeout(10):
            while probe.tracker.received < 2:  # noqa: ASYNC110 -- polls a count
                await asyncio.sleep(0.01)
    finally:
        probe.close()
        target.close()
