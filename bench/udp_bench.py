"""udp before/after in one interleaved run: server CPU per datagram of wirekit-udp (this
checkout), wirekit-udp of a baseline commit (``--baseline REV``), and a bare uvloop
``DatagramProtocol`` echo, paced at 10,000 datagrams/s from 10 clients, 100 B and 1 KiB; plus
the same wirekit-udp bound to 0.0.0.0 (answers from the arrival address: IP_PKTINFO). Prints
the markdown table (medians over the rounds, ratio to uvloop)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import PY, REF_UDP, Server, checkout, measure, ref  # noqa: E402


def wirekit_udp(name: str, port: int, metrics: int, host: str, src: Path | None) -> Server:
    cmd = [PY, "-m", "wirekit_udp", "--host", host, "--port", str(port), "--metrics-port",
           str(metrics), "--log-level", "ERROR", "--rate-per-source", "1e9", "--burst-per-source",
           "1000000", "--rate-global", "1e9", "--burst-global", "1000000"]  # fmt: skip
    env = {"OTEL_SDK_DISABLED": "true"}
    if src is not None:
        paths = [
            src / p for p in ("shared/framing/src", "shared/servicekit/src", "services/udp/src")
        ]
        env["PYTHONPATH"] = os.pathsep.join(map(str, paths))
    return Server(name, cmd, port, f"http:{metrics}", env, udp=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", metavar="REV")
    p.add_argument(
        "--tree",
        type=Path,
        metavar="DIR",
        help="also a wirekit source tree (shared/*/src, services/udp/src) in DIR",
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--duration", type=float, default=2.0)
    args = p.parse_args()
    servers = [ref(REF_UDP, "udp-uvloop", 18404, udp=True),
               wirekit_udp("wirekit-udp", 18406, 18916, "127.0.0.1", None),
               wirekit_udp("wirekit-udp 0.0.0.0 (pktinfo)", 18408, 18918, "0.0.0.0", None)]  # fmt: skip
    if args.tree:  # another source tree (an experiment not committed yet)
        servers.append(wirekit_udp(f"wirekit-udp {args.tree.name}", 18412, 18922, "127.0.0.1",
                                   args.tree))  # fmt: skip
    if args.baseline:
        base = checkout(args.baseline, Path(tempfile.mkdtemp(prefix="wirekit-udp-bench-")))
        servers.append(wirekit_udp(f"wirekit-udp {args.baseline}", 18410, 18920, "127.0.0.1",
                                   base))  # fmt: skip
    rows: dict[tuple[str, int], list[float]] = {}
    try:
        for server in servers:
            server.start()
        for _ in range(args.reps):
            for size in (100, 1024):
                for server in servers:
                    r = measure(server, "udp", server.port, size=size, conns=10, rate=10000,
                                duration=args.duration, warmup=0.3)  # fmt: skip
                    rows.setdefault((server.name, size), []).append(r["cpu_us_per_msg"])
    finally:
        for server in servers:
            server.stop()
    print("| server | 100 B CPU µs/datagram | 1 KiB |\n|---|---|---|")
    for server in servers:
        cells = []
        for size in (100, 1024):
            v = statistics.median(rows[(server.name, size)])
            r = v / statistics.median(rows[(REF_UDP, size)])
            cells.append(f"{v:.2f} ({r:.2f}×)")
        print(f"| {server.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
