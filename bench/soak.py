"""``make soak``: many concurrent framed connections against a real ``wirekit-echo`` process.

Every connection sends random frames (0-64 KiB, ``--largest-kib``) in random write splits (often right at a frame's
start or its header's end, then a pause) while reading its replies; each reply stream must be byte-exact and in order. The clients come from many
loopback addresses (127.0.1.x), at most ``--per-source`` each, so the service runs with its
default per-source limit. At the end: the server's open fds are back to their baseline, its
RSS before / peak / after is reported, and its /metrics byte and frame counters equal what the
clients sent and received, and 10 s after the last connection closed the RSS is within 2x of
what it was before the burst (the memory of a burst is handed back). With ``--rounds 2`` (the default) it all runs twice against the same
server: memory that the first round's connections left behind must not grow in the second (a
leak per connection would). Exit status 0 when all of that holds; the JSON report on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from run import rss_kib  # bench/run.py, beside this script

from wirekit_framing import encode_many, read_frame


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("echo_") and s.labels.get("mode", "framed") == "framed":
                out[s.name] = float(s.value)
    return out


async def client(
    port: int, source: str, rng: random.Random, frames: int, deadline: float, largest: int
) -> tuple[int, int]:
    """One connection: send ``frames`` random frames in random splits, check every reply.
    Returns (bytes sent, bytes received), headers included."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    payloads = [rng.randbytes(rng.randint(0, largest)) for _ in range(frames)]
    wire = encode_many(payloads)

    # Frame starts and header ends: writes often stop exactly there (an unlucky network's
    # favourite places), and a pause then lets the server read that piece on its own.
    marks, pos = [], 0
    for payload in payloads:
        marks += [pos, pos + 4]
        pos += 4 + len(payload)

    async def send() -> None:
        pos = 0
        while pos < len(wire):
            later = [m for m in marks if m > pos]
            if later and rng.random() < 0.4:
                end = rng.choice(later[:4])
            else:
                end = pos + rng.choice([1, 3, 4, 5, 100, 1500, 16384, 65536, 200_000])
            writer.write(wire[pos:end])
            pos = end
            await writer.drain()
            if rng.random() < 0.3:
                await asyncio.sleep(0.001)

    sender = asyncio.ensure_future(send())
    try:
        for expected in payloads:
            got = await asyncio.wait_for(read_frame(reader), max(deadline - time.monotonic(), 1))
            if got != expected:
                raise AssertionError(f"reply differs from the frame sent ({len(expected)} B)")
        await sender
    finally:
        sender.cancel()
        writer.close()
    return len(wire), len(wire)


async def run_clients(args: argparse.Namespace, port: int) -> tuple[int, int, int, list[str]]:
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.timeout
    sources = [f"127.0.1.{1 + i // args.per_source}" for i in range(args.connections)]
    # All connected before any sends: this many at once, concurrently.
    tasks = [
        client(
            port, src, random.Random(rng.random()), args.frames, deadline, args.largest_kib * 1024
        )
        for src in sources
    ]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    good = [r for r in results if isinstance(r, tuple)]
    failed = [f"{type(r).__name__}: {r}" for r in results if not isinstance(r, tuple)]
    return len(good), sum(r[0] for r in good), sum(r[1] for r in good), failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--frames", type=int, default=20, help="frames per connection")
    p.add_argument(
        "--largest-kib",
        type=int,
        default=64,
        help="frames are 0 to this many KiB (the server's max_frame_size is 1 MiB)",
    )
    p.add_argument("--per-source", type=int, default=64, help="connections per source address")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for a round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rss-growth-mib", type=float, default=8.0,
                   help="most RSS may grow from the first round's end to the last's")  # fmt: skip
    args = p.parse_args()

    server = subprocess.Popen(
        [sys.executable, "-m", "wirekit_echo", "--mode", "framed", "--framed-port", "0",
         "--metrics-port", "0", "--limit-connections", str(args.connections + 10)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert server.stderr is not None
    ports: dict[str, int] = {}
    problems: list[str] = []
    try:
        for line in server.stderr:
            record = json.loads(line)
            if record.get("message") == "listening":
                ports = record["ports"]
                break
        else:
            raise SystemExit("wirekit-echo did not start")

        def collect() -> None:  # anything it logs from here on at WARNING or above is a problem
            for line in server.stderr or ():
                try:
                    level = json.loads(line).get("level")
                except ValueError:
                    level = "not JSON"
                if level not in ("DEBUG", "INFO"):
                    problems.append(line)

        threading.Thread(target=collect, daemon=True).start()
        time.sleep(0.5)
        rss_before, fds_before = rss_kib(server.pid), open_fds(server.pid)
        peak = rss_before
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not stop.wait(0.05):
                peak = max(peak, rss_kib(server.pid))

        threading.Thread(target=watch, daemon=True).start()
        rounds: list[dict[str, Any]] = []
        count = sent = received = 0
        failures: list[str] = []
        for round_no in range(args.rounds):
            args.seed += round_no
            started = time.monotonic()
            n, out, back, failed = asyncio.run(run_clients(args, ports["framed"]))
            failures += failed
            elapsed = time.monotonic() - started
            count, sent, received = count + n, sent + out, received + back
            end = time.monotonic() + 30
            while metrics(ports["metrics"]).get("echo_connections_active", 1):
                if time.monotonic() > end:
                    break
                time.sleep(0.1)
            time.sleep(2.0)  # past the trimmer's quiet second: what stays is what is held
            rounds.append({"seconds": round(elapsed, 2),
                           "mb_per_s": round((out + back) / elapsed / 1e6, 1),
                           "rss_after_mib": round(rss_kib(server.pid) / 1024, 1),
                           "fds_after": open_fds(server.pid)})  # fmt: skip
        stop.set()
        time.sleep(10)  # the measure: 10 s after the burst's connections closed
        rss_later = rss_kib(server.pid)
        m = metrics(ports["metrics"])
        report: dict[str, Any] = {
            "connections": args.connections, "frames_per_connection": args.frames,
            "rounds": rounds, "bytes_sent": sent, "bytes_received": received,
            "failed_connections": len(failures), "first_failures": failures[:5],
            "rss_before_mib": round(rss_before / 1024, 1), "rss_peak_mib": round(peak / 1024, 1),
            "rss_10s_after_mib": round(rss_later / 1024, 1),
            "fds_before": fds_before,
            "server_received_bytes": m.get("echo_received_bytes_total"),
            "server_sent_bytes": m.get("echo_sent_bytes_total"),
            "server_frames": m.get("echo_frames_total"),
            "server_connections_active": m.get("echo_connections_active"),
            "server_log_problems": problems,
        }  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)
    report["server_exit"] = server.returncode
    ok = (
        not failures
        and report["server_received_bytes"] == sent
        and report["server_sent_bytes"] == received
        and report["server_frames"] == count * args.frames
        and report["server_connections_active"] == 0
        and all(r["fds_after"] == fds_before for r in rounds)
        # What stays after the first round is the allocator's; a leak would grow with each.
        and rounds[-1]["rss_after_mib"] - rounds[0]["rss_after_mib"] <= args.rss_growth_mib
        # ... and the burst's memory is handed back (servicekit's Trimmer): 10 s after the
        # connections closed, RSS within 2x of what it was before them.
        and rss_later <= 2 * rss_before
        and not problems
        and server.returncode == 0
    )
    report["ok"] = ok
    print(json.dumps(report, indent=1))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
