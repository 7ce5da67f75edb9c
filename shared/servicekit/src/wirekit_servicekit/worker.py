"""Where a process serves: alone, or as worker ``index`` of ``count`` under a supervisor.

A worker learns its place from its supervisor through a pipe (settings and :class:`Worker`,
pickled: never argv or the environment, which hold no secrets then), joins the ports worker 0
bound, and says once it serves (:meth:`Worker.announce`: the ports it bound and how its gauges
add up across workers). Nothing here is a module global: the :class:`Worker` is handed to the
runtime, which hands it to the service.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pickle
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .settings import ServiceSettings

__all__ = ["SOLO", "WORKER_ENV", "Worker", "enter_worker", "share", "worker_settings"]

#: Set in a worker's environment: "<settings fd>,<ready fd>".
WORKER_ENV = "WIREKIT_WORKER"
_PR_SET_PDEATHSIG = 1

N = TypeVar("N", int, float)


def share(value: N, count: int) -> N:
    """One worker's share of a per-instance limit: ``count`` workers together allow what one
    process would. Counts are divided down (at least 1), rates exactly. The one place limits
    are divided: settings (:func:`worker_settings`) and a service's own limits
    (:meth:`Worker.share`, e.g. cmdexec's per-identity ``limit_runs``)."""
    if isinstance(value, int):
        return max(1, value // count)
    return value / count


@dataclass
class Worker:
    """This process's place: worker ``index`` of ``count``, joining ``ports`` (name -> port
    bound by worker 0; empty for worker 0 and for a process alone)."""

    index: int = 0
    count: int = 1
    ports: Mapping[str, int] = field(default_factory=dict)
    #: Where to tell the supervisor that this worker serves (None: no supervisor).
    ready_fd: int | None = None

    @property
    def shares_ports(self) -> bool:
        """Whether the ports are shared with other workers (``SO_REUSEPORT``)."""
        return self.count > 1

    def share(self, value: N) -> N:
        return share(value, self.count)

    def announce(self, ports: Mapping[str, int], gauge_modes: Mapping[str, str]) -> None:
        """Tell the supervisor this worker serves: the ports bound (its metrics port among
        them) and how each of its gauges adds up across workers. Once; nothing without one."""
        fd, self.ready_fd = self.ready_fd, None
        if fd is None:
            return
        line = json.dumps({"ports": dict(ports), "gauges": dict(gauge_modes)})
        with contextlib.suppress(OSError):
            os.write(fd, line.encode() + b"\n")
        with contextlib.suppress(OSError):
            os.close(fd)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "ready_fd": None}  # an fd means nothing in another process


#: A process serving alone.
SOLO = Worker()

S = TypeVar("S", bound=ServiceSettings)


def worker_settings(settings: S, count: int) -> S:
    """The settings of one of ``count`` workers: its share of each per-instance limit, its
    metrics on loopback (the supervisor serves the instance's)."""
    update: dict[str, Any] = {"metrics_host": "127.0.0.1", "metrics_port": 0}
    for name in type(settings).per_instance:
        update[name] = share(getattr(settings, name), count)
    return settings.model_copy(update=update)


def enter_worker() -> tuple[ServiceSettings, Worker] | None:
    """In a worker: its settings and place, from the supervisor's pipe; the worker dies with
    the supervisor. None outside a worker."""
    spec = os.environ.pop(WORKER_ENV, None)
    if spec is None:
        return None
    settings_fd, ready_fd = (int(x) for x in spec.split(","))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    with os.fdopen(settings_fd, "rb") as f:
        # From our own parent (the supervisor), through a pipe no one else holds.
        settings, worker = pickle.load(f)  # noqa: S301
    assert isinstance(settings, ServiceSettings)
    assert isinstance(worker, Worker)
    worker.ready_fd = ready_fd
    return settings, worker
