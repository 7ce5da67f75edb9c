"""The load generator: TCP ping-pong (raw or framed, byte-exact checks), UDP with loss
accounting, and idle-connection holding. One process, uvloop; the harness starts several
when it needs more. Every run is bounded in count and time, loopback only.

    python loadgen.py tcp|udp|idle --port P [--size N] [--conns C] [--rate R] [--duration S]

Prints "start" when measuring begins, "end" when it ends, then one JSON line of results.
``--rate 0`` is a closed loop (send the next message as soon as the echo is complete);
otherwise messages are paced at R per second in all, spread over the connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import struct
import sys
import time
from array import array

import uvloop


class Stats:
    def __init__(self) -> None:
        self.msgs = 0
        self.bytes = 0
        self.lat = array("d")
        self.errors = 0
        self.lost = 0
        self.late = 0
        self.measuring = False


def message(size: int, framed: bool, seed: int) -> bytes:
    body = (bytes(range(256)) * (size // 256 + 1))[seed % 256 : seed % 256 + size]
    return struct.pack("!I", len(body)) + body if framed else body


class PingPong(asyncio.Protocol):
    """One connection: send, wait for the whole echo, check it, record, repeat or pace."""

    def __init__(self, msg: bytes, stats: Stats, interval: float, deadline: float) -> None:
        self.msg = msg
        self.stats = stats
        self.interval = interval
        self.deadline = deadline
        self.buf = bytearray()
        self.sent_at = 0.0
        self.next_at = 0.0
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def begin(self, deadline: float) -> None:
        """Start once every connection is up (1,000 connects take a while)."""
        self.deadline = deadline
        self.next_at = self.loop.time()
        self.send()

    def send(self) -> None:
        now = self.loop.time()
        if now >= self.deadline:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.msg)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) < len(self.msg):
            return
        now = self.loop.time()
        st = self.stats
        if bytes(self.buf) != self.msg:
            st.errors += 1
        self.buf.clear()
        if st.measuring:
            st.msgs += 1
            st.bytes += len(self.msg)
            st.lat.append(time.perf_counter() - self.sent_at)
        if self.interval:
            self.next_at += self.interval
            if self.next_at <= now:
                st.late += st.measuring
                self.next_at = now
                self.send()
            else:
                self.loop.call_at(self.next_at, self.send)
        else:
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class UdpPing(asyncio.DatagramProtocol):
    def __init__(self, msg: bytes, stats: Stats, interval: float, deadline: float) -> None:
        self.msg, self.stats, self.interval, self.deadline = msg, stats, interval, deadline
        self.base, self.seq = msg, 0
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.timer: asyncio.TimerHandle | None = None
        self.next_at = 0.0
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def begin(self, deadline: float) -> None:
        self.deadline = deadline
        self.next_at = self.loop.time()
        self.send()

    def send(self) -> None:
        now = self.loop.time()
        if now >= self.deadline:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.sent_at = time.perf_counter()
        # A sequence number in the first bytes, as probes send: the same bytes back to back
        # from one socket within 50 ms are taken for an echo loop by wirekit-udp (loop_window_s).
        self.seq += 1
        head = self.seq.to_bytes(8, "big")[: len(self.base)]
        self.msg = head + self.base[len(head) :]
        self.transport.sendto(self.msg)  # type: ignore[attr-defined]
        self.timer = self.loop.call_later(0.2, self.timeout)

    def timeout(self) -> None:
        self.stats.lost += self.stats.measuring
        self.advance(self.loop.time())

    def advance(self, now: float) -> None:
        if self.interval:
            self.next_at = max(self.next_at + self.interval, now)
            self.loop.call_at(self.next_at, self.send)
        else:
            self.send()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if self.timer is not None:
            self.timer.cancel()
        now = self.loop.time()
        st = self.stats
        if data != self.msg:
            st.errors += 1
        if st.measuring:
            st.msgs += 1
            st.bytes += len(data)
            st.lat.append(time.perf_counter() - self.sent_at)
        self.advance(now)


async def run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    stats = Stats()
    interval = args.conns / args.rate if args.rate else 0.0
    deadline = float("inf")
    conns: list[PingPong | UdpPing] = []
    for i in range(args.conns):
        msg = message(args.size, args.framed, i)
        if args.kind == "udp":
            _, proto = await loop.create_datagram_endpoint(
                lambda m=msg: UdpPing(m, stats, interval, deadline),
                remote_addr=("127.0.0.1", args.port),
            )
        else:
            _, proto = await loop.create_connection(
                lambda m=msg: PingPong(m, stats, interval, deadline), "127.0.0.1", args.port
            )
        conns.append(proto)
    start_at = loop.time() + args.warmup
    deadline = start_at + args.duration
    for i, conn in enumerate(conns):  # spread the paced sends over one interval
        loop.call_later(interval * i / len(conns), conn.begin, deadline)
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    print("start", flush=True)
    stats.measuring = True
    t0 = time.perf_counter()
    await asyncio.sleep(max(0.0, deadline - loop.time()))
    stats.measuring = False
    elapsed = time.perf_counter() - t0
    print("end", flush=True)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.wait([c.done for c in conns], timeout=2)
    lat = sorted(stats.lat)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {
        "msgs": stats.msgs, "bytes": stats.bytes, "elapsed": elapsed, "errors": stats.errors,
        "lost": stats.lost, "late": stats.late, "p50": pct(0.5), "p99": pct(0.99),
        "client_cpu": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
    }  # fmt: skip


async def hold_idle(args: argparse.Namespace) -> dict[str, object]:
    """Open --conns connections and hold them, silent, for --duration seconds."""
    socks = []
    for _ in range(args.conns):
        s = socket.create_connection(("127.0.0.1", args.port))
        socks.append(s)
    print("start", flush=True)
    await asyncio.sleep(args.duration)
    print("end", flush=True)
    for s in socks:
        s.close()
    return {"held": len(socks)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=("tcp", "udp", "idle"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--conns", type=int, default=10)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--framed", action="store_true")
    args = p.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.install()
    result = asyncio.run(hold_idle(args) if args.kind == "idle" else run(args))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
