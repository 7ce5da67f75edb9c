"""``wirekit-probe``: the continuous prober (``--help`` lists every setting), or
``wirekit-probe ping ...``: the one-shot tool."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import NoReturn

from wirekit_servicekit import Background, HttpRoute, Part, Runtime, Service

from . import __version__, cli
from .monitor import Monitor, ProbeEndpoint, budget_bucket
from .series import SeriesCollector
from .settings import ProbeSettings


def build(runtime: Runtime[ProbeSettings]) -> list[Part]:
    """The runners' owner (resolving targets on an interval) and /probe."""
    settings = runtime.settings
    budget = budget_bucket(settings)
    monitor = Monitor(settings, budget)
    endpoint = ProbeEndpoint(settings, budget, asyncio.get_running_loop())
    for collector in (monitor, SeriesCollector(monitor.series_now, settings.up_window_s),
                      endpoint):  # fmt: skip
        runtime.registry.register(collector)
    return [Background("targets", monitor.run), HttpRoute("/probe", endpoint.handle)]


def refuse(settings: ProbeSettings) -> None:
    """One process: its packet budget is the service's (workers would multiply it)."""
    if settings.worker_count > 1:
        print("wirekit-probe: runs as one process (--workers 1): each worker would probe every "
              "target and spend the whole packet_budget", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)


SERVICE = Service("wirekit-probe", __version__, ProbeSettings, build, check=refuse)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["ping"]:
        raise SystemExit(cli.main(args))
    SERVICE.main(args)


if __name__ == "__main__":
    main()
