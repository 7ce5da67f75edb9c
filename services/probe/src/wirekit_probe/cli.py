"""``wirekit-probe ping``: like ``ping``, against an echo target -- N probes, then one summary.

    wirekit-probe ping [-m MODULE] [-c COUNT] [-i INTERVAL] [-s SIZE] [-W TIMEOUT] [--fixed]
                       [--seed N] [--json] HOST:PORT

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
import socket
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._version import __version__
from .runners import Pacer, run_module
from .series import Series
from .targets import MODULES, Spec, resolve, split_host_port
from .tracker import Tracker
from .wire import MAX_SIZE, MIN_SIZE


def parse_target(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6-address]:port``."""
    try:
        return split_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    module: str = "udp",
    count: int,
    interval_s: float,
    size: int,
    timeout_s: float,
    connect_timeout_s: float = 2.0,
    poisson: bool = True,
    seed: int | None = None,
) -> Summary:
    """``count`` probes to the first address of ``host`` (OSError when it does not resolve)."""
    endpoint = (await resolve(Spec(module, host, port)))[0]
    series = Series(endpoint, Tracker(timeout_s), samples=[])
    pacer = Pacer(lambda: 1.0 / interval_s, None, series, seed=seed, poisson=poisson)
    await run_module(series, pacer, size=size, timeout_s=timeout_s,
                     connect_timeout_s=connect_timeout_s, count=count)  # fmt: skip
    t = series.tracker
    return Summary(
        target=endpoint.target, sent=t.sent, received=t.received, lost=t.lost, late=t.late,
        duplicate=t.duplicate, reordered=t.reordered, invalid=dict(series.invalid),
        rtt_ms=percentiles(series.samples or []), jitter_ms=t.jitter_s * 1e3, hops=t.hops,
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
    ping_p.add_argument("-m", "--module", choices=MODULES, default="udp",
                        help="udp (RFC 862 datagrams, the default), tcp-framed (frames on one "
                        "connection to echo framed) or tcp-connect (handshakes)")  # fmt: skip
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
                module=args.module,
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
        print(f"--- {summary.target} {args.module} probe statistics ---\n{summary.line()}")
    return 0 if summary.received else 1


if __name__ == "__main__":
    sys.exit(main())
