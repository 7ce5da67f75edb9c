"""What the PROXY protocol costs per connection: wirekit echo framed with ``proxy_protocol`` off
and on (v2 header from a trusted 127.0.0.1), interleaved, each connection a connect, one 100 B
frame and its echo, and a close. Prints JSON: per server, the median over the rounds of wall
microseconds per connection (client side) and server CPU microseconds per connection."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from wirekit_framing import encode, encode_proxy_v2, recv_frame

PY = sys.executable
FRAME = encode(b"p" * 100)


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(port: int, proxy: bool) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OTEL_SDK_DISABLED": "true"}
    if proxy:
        env |= {
            "WIREKIT_ECHO_PROXY_PROTOCOL": "v2",
            "WIREKIT_ECHO_PROXY_TRUSTED": '["127.0.0.1/32"]',
        }
    proc = subprocess.Popen([PY, "-m", "wirekit_echo", "--mode", "framed", "--framed-port", str(port),
                             "--metrics-port", "0", "--log-level", "ERROR"], env=env)  # fmt: skip
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"echo on {port} did not start")


def connections(port: int, n: int, proxy: bool) -> float:
    """Seconds for ``n`` connections one after the other."""
    t0 = time.perf_counter()
    for i in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            head = encode_proxy_v2((f"10.0.{i // 250 % 250}.{i % 250 + 1}", 40000 + i % 20000),
                                   ("127.0.0.1", port)) if proxy else b""  # fmt: skip
            s.sendall(head + FRAME)
            assert recv_frame(s) == b"p" * 100
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    rounds, n = (2, 200) if args.quick else (5, 1000)
    servers = {"proxy off": (18301, False), "proxy v2": (18302, True)}
    procs = {name: start(port, proxy) for name, (port, proxy) in servers.items()}
    rows: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in servers}
    try:
        for _ in range(rounds):  # interleaved: off, on, off, on ...
            for name, (port, proxy) in servers.items():
                before = cpu_s(procs[name].pid)
                took = connections(port, n, proxy)
                rows[name]["wall"].append(took / n * 1e6)
                rows[name]["cpu"].append((cpu_s(procs[name].pid) - before) / n * 1e6)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(10)
    out: dict[str, Any] = {"connections": n, "rounds": rounds}
    for name, r in rows.items():
        out[name] = {"wall_us": statistics.median(r["wall"]), "cpu_us": statistics.median(r["cpu"])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
