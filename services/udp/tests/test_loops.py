"""The loop defence: our own answer coming back is not answered; a client that repeats itself
at human or prober rates is answered every time. Sans-I/O rows for the rule, then the real
service over loopback with a plain echo at the other end (the bound for a non-wirekit peer)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from wirekit_harness import StartUdp

from wirekit_udp.defences import LoopGuard, source_key

A = ("192.0.2.1", 40000)
B = ("192.0.2.1", 40001)

# (steps: (at, datagram from A, answered by us?) -> whether each datagram is a reflection)
ROWS = [
    pytest.param([(0.0, b"x", True), (0.001, b"x", False)], [False, True], id="echo-back"),
    pytest.param([(0.0, b"x", True), (0.1, b"x", False)], [False, False], id="after-window"),
    pytest.param([(0.0, b"x", True), (0.001, b"y", False)], [False, False], id="other-bytes"),
    pytest.param([(0.0, b"x", False), (0.001, b"x", False)], [False, False], id="not-answered"),
    pytest.param([(0.0, b"x", True), (0.06, b"q", True), (0.061, b"x", False)],
                 [False, False, False], id="the-last-answer-counts"),
    pytest.param([(0.0, b"", True), (0.001, b"", False)], [False, True], id="empty"),
]  # fmt: skip


@pytest.mark.parametrize(("steps", "want"), ROWS)
def test_the_rule(steps: list[tuple[float, bytes, bool]], want: list[bool]) -> None:
    guard = LoopGuard(0.05, 100)
    got = []
    for at, data, answer in steps:
        got.append(guard.reflected(LoopGuard.key(data, A), at))
        if answer and not got[-1]:
            guard.answered(LoopGuard.key(data, A), at)
    assert got == want


def test_several_answers_in_flight_are_all_recognised() -> None:
    """Two spoofed datagrams with different bytes at once: each reflection is one of our
    answers, not only the last one."""
    guard = LoopGuard(0.05, 100)
    guard.answered(LoopGuard.key(b"first", A), 0.0)
    guard.answered(LoopGuard.key(b"second", A), 0.0001)
    assert guard.reflected(LoopGuard.key(b"first", A), 0.001)
    assert guard.reflected(LoopGuard.key(b"second", A), 0.001)
    assert not guard.reflected(LoopGuard.key(b"third", A), 0.001)


def test_the_port_counts_too() -> None:
    guard = LoopGuard(0.05, 100)
    guard.answered(LoopGuard.key(b"x", A), 0.0)
    assert not guard.reflected(LoopGuard.key(b"x", B), 0.001)
    assert guard.reflected(LoopGuard.key(b"x", A), 0.001)


def test_memory_is_at_most_limit_answers_and_old_ones_make_room() -> None:
    guard = LoopGuard(0.05, 100)
    for i in range(1000):
        now = i * 0.0001  # 1,000 answers within 0.1 s
        key = LoopGuard.key(b"x", (f"10.0.{i // 250}.{i % 250}", 1))
        assert not guard.reflected(key, now)
        guard.answered(key, now)
    assert len(guard) == 100
    # full at 0.01 (nothing old enough to forget), pruned at 0.06 (the first 100 went): the
    # answers of 0.06-0.07 are remembered, those after them wait for the next pruning
    assert guard.reflected(LoopGuard.key(b"x", ("10.0.2.199", 1)), 0.1)  # i = 699
    assert not guard.reflected(LoopGuard.key(b"x", ("10.0.2.200", 1)), 0.1)  # i = 700
    guard.answered(LoopGuard.key(b"y", A), 1.0)  # long after: the full table is pruned
    assert len(guard) == 1
    assert guard.reflected(LoopGuard.key(b"y", A), 1.01)


@pytest.mark.parametrize(
    ("host", "key"),
    [("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"), ("::ffff:192.0.2.7", "192.0.2.7"),
     ("fe80::1%lo", "fe80::/64")],
    ids=["v6-64", "mapped", "scoped"],
)  # fmt: skip
def test_ipv6_sources_are_counted_by_64_and_mapped_ones_as_ipv4(host: str, key: str) -> None:
    assert source_key(host) == key


def _plain_echo(sock: socket.socket, stop: threading.Event, seen: list[bytes]) -> None:
    """A socket-level echo with no defence at all (what most echo services are)."""
    sock.settimeout(0.05)
    while not stop.is_set():
        try:
            data, addr = sock.recvfrom(2048)
        except TimeoutError:
            continue
        seen.append(data)
        sock.sendto(data, addr)


async def test_a_loop_with_a_plain_echo_stops_after_two_datagrams(start_udp: StartUdp) -> None:
    """A datagram whose source is a plain echo (here one the test runs), sent to wirekit-udp:
    we answer it (1), the plain echo reflects the answer (2), we drop that as a loop. Nothing
    more crosses, however long one waits."""
    async with start_udp() as h:
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        stop, seen = threading.Event(), list[bytes]()
        echo = threading.Thread(target=_plain_echo, args=(peer, stop, seen))
        echo.start()
        try:
            # The first datagram from the plain echo's own socket stands for a spoofed one.
            peer.sendto(b"loop me", ("127.0.0.1", h.port))
            await h.wait_for(lambda: h.value("udp_datagrams_dropped_total", reason="loop") == 1)
            await asyncio.sleep(0.5)  # nothing more happens
        finally:
            stop.set()
            echo.join(5)
            peer.close()
        assert seen == [b"loop me"]  # our one answer, which it reflected once
        assert h.value("udp_datagrams_received_total") == 2
        assert h.value("udp_datagrams_sent_total") == 1
        assert h.value("udp_datagrams_dropped_total", reason="loop") == 1


async def test_a_client_repeating_itself_is_answered_every_time(start_udp: StartUdp) -> None:
    """The same line typed twice, a prober with a constant payload at 10/s: all answered. The
    same bytes again within the window of our answer: not (the documented cost)."""
    async with start_udp() as h:

        def talk() -> tuple[int, int]:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(1.0)
                answered = 0
                for _ in range(20):  # 10/s for 2 s
                    s.sendto(b"constant probe", ("127.0.0.1", h.port))
                    answered += s.recv(100) == b"constant probe"
                    time.sleep(0.1)
                s.sendto(b"twice fast", ("127.0.0.1", h.port))
                assert s.recv(100) == b"twice fast"
                s.sendto(b"twice fast", ("127.0.0.1", h.port))  # within 50 ms of the answer
                s.settimeout(0.3)
                try:
                    s.recv(100)
                    fast = 1
                except TimeoutError:
                    fast = 0
                return answered, fast

        answered, fast = await asyncio.to_thread(talk)
        assert answered == 20
        assert fast == 0
        assert h.value("udp_datagrams_dropped_total", reason="loop") == 1


def _connected_exchange(server: str, port: int, family: socket.AddressFamily) -> bytes | None:
    """A client that ``connect()``-ed its socket to ``server``: the kernel hands it only
    datagrams whose source is exactly ``server``."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.connect((server, port))
        s.send(b"from the address I asked")
        try:
            return s.recv(100)
        except TimeoutError:
            return None


@pytest.mark.parametrize("bind", ["0.0.0.0", "::"], ids=["ipv4-wildcard", "dual-stack"])
async def test_answers_leave_from_the_address_that_was_asked(
    start_udp: StartUdp, bind: str
) -> None:
    """Bound to a wildcard on a host with several addresses (127.0.0.1 and 127.0.0.2 here):
    each client gets its answer from the address it sent to (IP_PKTINFO), so a connected
    client sees it at all."""
    async with start_udp(host=bind) as h:
        for server in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            got = await asyncio.to_thread(_connected_exchange, server, h.port, socket.AF_INET)
            assert got == b"from the address I asked", server
        if bind == "::":
            got = await asyncio.to_thread(_connected_exchange, "::1", h.port, socket.AF_INET6)
            assert got == b"from the address I asked"
        assert h.value("udp_datagrams_sent_total") == (4 if bind == "::" else 3)


async def test_an_empty_datagram_is_answered_on_a_wildcard_bind(start_udp: StartUdp) -> None:
    async with start_udp(host="0.0.0.0") as h:

        def empty() -> bytes:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(1.0)
                s.connect(("127.0.0.2", h.port))
                s.send(b"")
                return s.recv(100)

        assert await asyncio.to_thread(empty) == b""
