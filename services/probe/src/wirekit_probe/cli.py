"""``wirekit-probe ping``: like ``ping``, against an echo target -- N probes, then one summary.

    wirekit-probe ping [-c COUNT] [-i INTERVAL] [-s SIZE] [-W TIMEOUT] [--fixed] [--json] HOST:PORT

Intervals are exponentially distributed around ``-i`` (Poisson sending, RFC 2330 section
11.1.1: a probe stream that cannot phase-lock with anything periodic on the path) unless
``--fixed``. Every probe is waited for at most ``-W`` seconds after it was sent. Exit status:
0 when any reply came back, 1 on total loss, 2 on a usage error or a target that does not
resolve.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import socket
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._version import __version__
from .udp import UdpTarget
from .wire import MAX_SIZE, MIN_SIZE


def parse_target(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6-address]:port``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"target must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"an IPv6 target is written [ADDRESS]:PORT, got {text!r}")
    return host, int(port)


@dataclass
class Summary:
    target: str
    sent: int
    received: int
    lost: int
    late: int
    duplicate: int
    reordered: int
    invalid: dict[str, int]
    send_errors: int
    rtt_ms: dict[str, float]
    jitter_ms: float
    hops: int | None

    @property
    def loss_percent(self) -> float:
        return 100.0 * self.lost / self.sent if self.sent else 0.0

    def line(self) -> str:
        parts = [
            f"{self.sent} sent, {self.received} received, {self.lost} lost "
            f"({self.loss_percent:.1f}% loss), {self.late} late, {self.duplicate} duplicate, "
            f"{self.reordered} reordered, {sum(self.invalid.values())} invalid"
        ]
        if self.rtt_ms:
            r = self.rtt_ms
            parts.append(
                f"rtt min/p50/p90/p99/max = {r['min']:.3f}/{r['p50']:.3f}/{r['p90']:.3f}/"
                f"{r['p99']:.3f}/{r['max']:.3f} ms, jitter {self.jitter_ms:.3f} ms (RFC 3550)"
            )
        if self.hops is not None:
            parts.append(f"hops {self.hops}")
        return "; ".join(parts)


def percentiles(rtts: Sequence[float]) -> dict[str, float]:
    if not rtts:
        return {}
    ordered = sorted(rtts)

    def at(q: float) -> float:  # nearest rank
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1e3

    return {"min": ordered[0] * 1e3, "p50": statistics.median(ordered) * 1e3, "p90": at(0.9),
            "p99": at(0.99), "max": ordered[-1] * 1e3}  # fmt: skip


async def ping(
    host: str,
    port: int,
    *,
    count: int,
    interval_s: float,
    size: int,
    timeout_s: float,
    poisson: bool = True,
    seed: int | None = None,
) -> Summary:
    loop = asyncio.get_running_loop()
    family, _, _, _, address = (
        await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    )[0]  # fmt: skip
    rtts: list[float] = []
    target = UdpTarget(address, family, size=size, timeout_s=timeout_s,
                       nonce=secrets.randbits(64), rtts=rtts)  # fmt: skip
    rng = random.Random(seed)  # noqa: S311 -- intervals, not secrets
    tracker = target.tracker
    try:
        target.start(loop)
        due = loop.time()
        for _ in range(count):
            target.send()
            tracker.expire(loop.time())
            due += rng.expovariate(1 / interval_s) if poisson else interval_s
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        # The last probes: until every one is answered or has had its timeout_s.
        deadline = loop.time() + timeout_s
        while tracker.in_flight and loop.time() < deadline:  # noqa: ASYNC110 -- polls a count
            await asyncio.sleep(min(0.01, max(0.0, deadline - loop.time())))
        tracker.expire_all()
    finally:
        target.close()
    ip = str(address[0])
    shown = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
    return Summary(
        target=shown, sent=tracker.sent, received=tracker.received, lost=tracker.lost,
        late=tracker.late, duplicate=tracker.duplicate, reordered=tracker.reordered,
        invalid=dict(target.invalid), send_errors=target.send_errors, rtt_ms=percentiles(rtts),
        jitter_ms=tracker.jitter_s * 1e3, hops=tracker.hops,
    )  # fmt: skip


def _positive(kind: type[int] | type[float]) -> Any:
    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
        return value

    return convert


def _size(text: str) -> int:
    value = _positive(int)(text)
    if not MIN_SIZE <= value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"size must be {MIN_SIZE}..{MAX_SIZE}, got {text!r}")
    return int(value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wirekit-probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    ping_p = sub.add_parser("ping", help="N probes to one target, then a summary line",
                            description=__doc__.split("\n\n", 1)[1])  # fmt: skip
    ping_p.add_argument("target", type=parse_target, metavar="HOST:PORT")
    ping_p.add_argument("-m", "--module", choices=["udp"], default="udp",
                        help="how to probe (default udp: RFC 862 datagrams)")  # fmt: skip
    ping_p.add_argument("-c", "--count", type=_positive(int), default=10, help="probes (10)")
    ping_p.add_argument("-i", "--interval", type=_positive(float), default=1.0,
                        help="mean seconds between probes (1.0)")  # fmt: skip
    ping_p.add_argument("-s", "--size", type=_size, default=64,
                        help=f"bytes per probe, {MIN_SIZE}..{MAX_SIZE} (64)")  # fmt: skip
    ping_p.add_argument("-W", "--timeout", type=_positive(float), default=1.0,
                        help="seconds a probe is waited for before it is lost (1.0)")  # fmt: skip
    ping_p.add_argument("--fixed", action="store_true", help="fixed intervals, not Poisson")
    ping_p.add_argument("--seed", type=int, help="seed of the interval generator")
    ping_p.add_argument("--json", action="store_true", help="the summary as one JSON object")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    host, port = args.target
    try:
        summary = asyncio.run(
            ping(
                host,
                port,
                count=args.count,
                interval_s=args.interval,
                size=args.size,
                timeout_s=args.timeout,
                poisson=not args.fixed,
                seed=args.seed,
            )
        )
    except socket.gaierror as e:
        print(f"wirekit-probe: cannot resolve {host!r}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps({**summary.__dict__, "loss_percent": summary.loss_percent}))
    else:
        print(f"--- {summary.target} udp probe statistics ---\n{summary.line()}")
    return 0 if summary.received else 1


if __name__ == "__main__":
    sys.exit(main())
