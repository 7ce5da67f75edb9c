"""udp's per-datagram Python cost, without the kernel: ``UdpEcho.datagram_received`` called
directly with distinct payloads (fresh bytes objects: their hashes are not cached) from 10
source ports, every defence on (rate limits set high so that every datagram is answered), a
transport that drops the answers. Best of 5 rounds of 200,000 datagrams (made 1,000 at a time,
so that they are in the CPU's cache as a datagram just received is), per tree:

    python bench/udp_micro.py [--tree DIR ...]

where each DIR is a wirekit checkout (``.`` by default); each tree runs in its own interpreter.
Quieter than udp_bench.py (which measures the whole process: syscalls, the loop, telemetry),
it shows what a change to the Python path costs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

SIZES = (100, 1024)
ROUNDS, N, CHUNK = 5, 200_000, 1_000


def measure(size: int) -> float:
    from opentelemetry import trace
    from prometheus_client import CollectorRegistry

    from wirekit_udp.protocol import UdpContext, UdpEcho
    from wirekit_udp.settings import UdpSettings

    settings = UdpSettings(
        rate_per_source=1e9, burst_per_source=1e6, rate_global=1e9, burst_global=1e6
    )
    ctx = UdpContext.build(settings, CollectorRegistry(), trace.get_tracer("bench"), time.monotonic)
    echo = UdpEcho(ctx)

    class Sink:
        def sendto(self, data: bytes, addr: object) -> None:
            pass

        def get_extra_info(self, name: str, default: object = None) -> object:
            return default

    echo.connection_made(Sink())  # type: ignore[arg-type]
    best = float("inf")
    received = echo.datagram_received
    for _ in range(ROUNDS):
        spent = 0.0
        for _ in range(N // CHUNK):
            # a chunk's payloads fit in the CPU's cache, as a datagram the kernel has just
            # copied does (200,000 of them at once would not: a test of the memory bus)
            payloads = [os.urandom(8) + bytes(size - 8) for _ in range(CHUNK)]
            addrs = [("127.0.0.1", 40000 + i % 10) for i in range(CHUNK)]
            t0 = time.perf_counter()
            for data, addr in zip(payloads, addrs, strict=True):
                received(data, addr)
            spent += time.perf_counter() - t0
        best = min(best, spent / N * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, action="append", metavar="DIR")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # in the child: one size
    args = p.parse_args()
    if args.one:
        print(f"{measure(args.one):.3f}")
        return
    print("| tree | 100 B µs/datagram | 1 KiB |\n|---|---|---|")
    for tree in args.tree or [Path(".")]:
        src = [
            tree / p for p in ("shared/framing/src", "shared/servicekit/src", "services/udp/src")
        ]
        env = dict(os.environ, OTEL_SDK_DISABLED="true", PYTHONPATH=os.pathsep.join(map(str, src)))
        cells = [
            subprocess.run([sys.executable, __file__, "--one", str(size)], env=env, check=True,
                           capture_output=True, text=True).stdout.strip()
            for size in SIZES
        ]  # fmt: skip
        print(f"| {tree} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
