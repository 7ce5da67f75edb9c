"""The "Loop DoS" (CERT VU#417980) between two real wirekit-udp processes: one datagram with a
spoofed source, sent on loopback through a raw socket, and every datagram between the two
services counted on the wire with a packet socket (ground truth, not the services' own idea of
it) -- and by the services' counters. Needs root (raw and packet sockets), as CI has."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time

import pytest
from wirekit_testkit import ServiceProcess, service_process, wait_until

#: How long the wire is watched after the spoofed datagram: a loop would have made thousands.
WATCH_S = 2.0
_ETH_P_ALL = 0x0003
_PACKET_HOST = 0  # sockaddr_ll pkttype of a packet received (each loopback packet is also seen
#                   once as PACKET_OUTGOING)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"),
    reason="raw and packet sockets need root (CI runs as root)",
)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def spoofed_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> None:
    """Send ``payload`` to ``dst`` as if from ``src`` (IPv4, a raw socket with our own header)."""
    udp_len = 8 + len(payload)
    pseudo = (
        socket.inet_aton(src[0]) + socket.inet_aton(dst[0]) + struct.pack("!BBH", 0, 17, udp_len)
    )
    udp = struct.pack("!HHHH", src[1], dst[1], udp_len, 0) + payload
    udp = udp[:6] + struct.pack("!H", _checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0x4242, 0, 64, 17, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))  # fmt: skip
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(ip + udp, (dst[0], 0))


class Wire:
    """Every UDP datagram on ``lo`` between the given ports, as received (packet socket)."""

    def __init__(self, ports: set[int]) -> None:
        self.ports = ports
        self.seen: list[tuple[int, int, bytes]] = []  # (source port, destination port, payload)
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            if addr[2] != _PACKET_HOST or len(frame) < 14 + 28:
                continue
            ip = frame[14:]  # lo's frames carry an Ethernet header of zeros
            if ip[0] >> 4 != 4 or ip[9] != 17:
                continue
            ihl = (ip[0] & 0xF) * 4
            sport, dport = struct.unpack_from("!HH", ip, ihl)
            if sport in self.ports and dport in self.ports:
                self.seen.append((sport, dport, bytes(ip[ihl + 8 :])))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def _udp() -> contextlib.AbstractContextManager[ServiceProcess]:
    return service_process("wirekit_udp", "--port", "0", "--metrics-port", "0")


def test_one_spoofed_datagram_between_two_wirekit_udp_costs_two_datagrams() -> None:
    """B gets "loop me" from A's address (spoofed): B answers A (1), A answers B (2), B sees
    its own answer coming back and drops it (loop). Before the loop defence: 201 datagrams."""
    with _udp() as a, _udp() as b:
        pa, pb = a.ports["udp"], b.ports["udp"]
        wire = Wire({pa, pb})
        try:
            time.sleep(0.2)  # the packet socket is listening
            spoofed_udp(("127.0.0.1", pa), ("127.0.0.1", pb), b"loop me")
            wait_until(lambda: b.value("udp_datagrams_dropped_total", reason="loop") == 1, 10,
                       "B dropped the reflection")  # fmt: skip
            time.sleep(WATCH_S)
        finally:
            wire.close()
        answers = [w for w in wire.seen if w != (pa, pb, b"loop me")]  # all but the injected
        assert wire.seen.count((pa, pb, b"loop me")) == 2  # the spoofed one, and A's answer
        assert answers == [(pb, pa, b"loop me"), (pa, pb, b"loop me")][: len(answers)]
        assert len(wire.seen) == 3  # spoofed + B->A + A->B
        assert b.value("udp_datagrams_sent_total") == 1
        assert a.value("udp_datagrams_sent_total") == 1
        assert a.value("udp_datagrams_dropped_total", reason="loop") == 0
        a.assert_clean_log()
        b.assert_clean_log()


def test_several_spoofed_datagrams_at_once_cost_two_answers_each() -> None:
    """Five different payloads spoofed in a row: every loop ends after its two answers
    (found by review: keyed on the last answer only, two payloads in flight looped on)."""
    payloads = [b"loop %d" % i for i in range(5)]
    with _udp() as a, _udp() as b:
        pa, pb = a.ports["udp"], b.ports["udp"]
        wire = Wire({pa, pb})
        try:
            time.sleep(0.2)
            for payload in payloads:
                spoofed_udp(("127.0.0.1", pa), ("127.0.0.1", pb), payload)
            wait_until(lambda: b.value("udp_datagrams_dropped_total", reason="loop") == 5, 10,
                       "B dropped every reflection")  # fmt: skip
            time.sleep(WATCH_S)
        finally:
            wire.close()
        assert len(wire.seen) == 15  # 5 spoofed, 5 answers from B, 5 from A
        assert b.value("udp_datagrams_sent_total") == 5
        assert a.value("udp_datagrams_sent_total") == 5


def test_a_spoofed_datagram_from_xinetds_echo_port_is_not_answered() -> None:
    """A plain echo on the well-known port (xinetd's echo-dgram, inetd's): source port 7 is
    refused before any answer (privileged, and on the deny list) -- the bound there is 0. (The
    loop with a plain echo on any other port: services/udp/tests/test_loops.py, 2.)"""
    with _udp() as b:
        pb = b.ports["udp"]
        wire = Wire({7, pb})
        try:
            time.sleep(0.2)
            spoofed_udp(("127.0.0.1", 7), ("127.0.0.1", pb), b"chargen storm")
            wait_until(lambda: b.value("udp_datagrams_dropped_total",
                                       reason="privileged_port") == 1, 10, "dropped")  # fmt: skip
            time.sleep(0.5)
        finally:
            wire.close()
        assert wire.seen == [(7, pb, b"chargen storm")]
        assert b.value("udp_datagrams_sent_total") == 0
