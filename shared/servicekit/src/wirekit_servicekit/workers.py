"""``--workers N``: every core of one machine.

With ``workers`` above 1 the process started by the user becomes a supervisor. It starts N
workers -- each ``python -m <service>``, its own process and event loop -- and owns them:

- **Ports.** Every worker binds the service's ports itself with ``SO_REUSEPORT`` (TCP and UDP):
  the kernel spreads new connections and datagrams over the workers by a hash of the 4-tuple.
  Worker 0 starts first; the ports it bound (port 0 resolved) are the ones the others join.
- **Settings** reach a worker through a pipe (pickled, secrets included: never argv or the
  environment), with the per-instance limits divided among the workers
  (:attr:`ServiceSettings.per_instance`): N workers together enforce what one process would.
- **Metrics.** Each worker serves its own ``/metrics`` on 127.0.0.1 (a port it tells the
  supervisor through a second pipe). The supervisor's ``/metrics`` -- the one operators scrape --
  fetches them at scrape time and adds them up: counters, histograms and gauges are sums over
  the workers, exactly (the lock-free hot-path counters stay lock-free: nothing is shared
  between processes). A replaced worker's last counter values are kept, so counters never go
  down. Plus ``<service>_workers{state="up"|"configured"}`` and
  ``<service>_worker_restarts_total``. ``/readyz`` is 200 while every worker is ready.
- **Life.** A worker that exits while the instance is not stopping is replaced and counted;
  one that dies within ``STABLE_S`` of its start waits ``backoff`` first, doubled per crash up
  to ``BACKOFF_MAX_S`` (a crash loop backs off). SIGTERM/SIGINT are forwarded to every worker
  (each drains as one process would); the supervisor exits once all have, with 0 when every
  worker exited 0, else 1. Workers die with the supervisor (``PR_SET_PDEATHSIG``).

Why not prometheus_client's multiprocess mode: it replaces every counter with a file-backed
value (a lock and an mmap write per increment) and does not cover the custom lock-free
collectors (:class:`~wirekit_servicekit.metrics.HotCounter`); collecting at scrape time costs
one loopback HTTP request per worker per scrape instead (~1 ms each), nothing per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import math
import os
import pickle
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .metrics import MetricsServer
from .reload import held, hold, release
from .settings import ServiceSettings

__all__ = ["Worker", "announce", "cpu_count", "current", "enter_worker", "supervise",
           "worker_settings"]  # fmt: skip

log = logging.getLogger(__name__)

#: Set in a worker's environment: "<settings fd>,<ready fd>".
WORKER_ENV = "WIREKIT_WORKER"
#: A worker that lived this long was not crash-looping: its replacement starts at once.
STABLE_S = 10.0
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
#: A worker must report ready within this time, or it is killed and replaced.
START_TIMEOUT_S = 60.0
#: After SIGTERM, a worker still running ``drain_grace_s`` plus this is killed.
STOP_MARGIN_S = 10.0
_PR_SET_PDEATHSIG = 1


def cpu_count() -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota."""
    cpus = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cpus)


@dataclass(frozen=True)
class Worker:
    """What a worker process knows of its place: its index, and the ports to join."""

    index: int
    count: int
    ports: Mapping[str, int]


_current: Worker | None = None
_ready_fd: int | None = None


def current() -> Worker | None:
    """This process's worker identity, None when it is not a worker."""
    return _current


def worker_settings(settings: ServiceSettings, count: int) -> ServiceSettings:
    """The settings of one of ``count`` workers: its share of each per-instance limit, its
    metrics on loopback (the supervisor serves the instance's), one worker."""
    update: dict[str, Any] = {"workers": 1, "metrics_host": "127.0.0.1", "metrics_port": 0}
    for name in type(settings).per_instance:
        value = getattr(settings, name)
        update[name] = max(1, value // count) if isinstance(value, int) else value / count
    return settings.model_copy(update=update)


def enter_worker() -> ServiceSettings | None:
    """In a worker: read its settings and identity from the supervisor's pipe; die with the
    supervisor. Returns its settings, or None outside a worker."""
    global _current, _ready_fd
    spec = os.environ.pop(WORKER_ENV, None)
    if spec is None:
        return None
    settings_fd, ready_fd = (int(x) for x in spec.split(","))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    with os.fdopen(settings_fd, "rb") as f:
        # From our own parent (the supervisor), through a pipe no one else holds.
        settings, worker = pickle.load(f)  # noqa: S301
    _current, _ready_fd = worker, ready_fd
    assert isinstance(settings, ServiceSettings)
    return settings


def announce(ports: Mapping[str, int]) -> None:
    """In a worker, once it serves: tell the supervisor the ports bound (metrics included)."""
    global _ready_fd
    if _ready_fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(_ready_fd, json.dumps(dict(ports)).encode() + b"\n")
        os.close(_ready_fd)
    _ready_fd = None


# -- the supervisor -------------------------------------------------------------------------


_Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


@dataclass
class _Slot:
    index: int
    proc: asyncio.subprocess.Process | None = None
    metrics_port: int | None = None
    ready: bool = False
    returncode: int | None = None
    #: Counter and histogram samples of the workers this slot had before (never go down), by
    #: family, and the latest ones of its current worker.
    retired: dict[str, dict[_Key, float]] = field(default_factory=dict)
    last: dict[str, dict[_Key, float]] = field(default_factory=dict)


class _Instance(Collector):
    """The supervisor's /metrics: the sum of its workers', plus the workers' own state."""

    def __init__(self, namespace: str, slots: list[_Slot]) -> None:
        self.namespace = namespace
        self.slots = slots
        self.restarts = 0

    def _scrape(self, slot: _Slot) -> list[Metric]:
        if slot.metrics_port is None or not slot.ready:
            return []
        url = f"http://127.0.0.1:{slot.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return []
        return list(text_string_to_metric_families(text))

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        sums: dict[str, dict[_Key, float]] = {}
        for slot in self.slots:
            seen: dict[str, dict[_Key, float]] = {}
            for family in self._scrape(slot):
                if family.name.startswith(("process_", "python_")):
                    continue  # the supervisor's own are served; the workers' do not add up
                families.setdefault(family.name, family)
                into = sums.setdefault(family.name, {})
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    into[key] = into.get(key, 0.0) + sample.value
                    if family.type in ("counter", "histogram"):
                        seen.setdefault(family.name, {})[key] = sample.value
            if seen:
                slot.last = seen
            for name, retired in slot.retired.items():  # what its predecessors counted
                into = sums.setdefault(name, {})
                for key, value in retired.items():
                    into[key] = into.get(key, 0.0) + value
        for name, family in families.items():
            out = Metric(name, family.documentation, family.type, family.unit)
            for (sample_name, labels), value in sums[name].items():
                out.add_sample(sample_name, dict(labels), value)
            yield out
        up = GaugeMetricFamily(
            f"{self.namespace}_workers", "Worker processes: configured, and up (serving).",
            labels=["state"],
        )  # fmt: skip
        up.add_metric(["configured"], len(self.slots))
        up.add_metric(["up"], sum(1 for s in self.slots if s.ready))
        yield up
        yield CounterMetricFamily(
            f"{self.namespace}_worker_restarts",
            "Workers replaced after they exited while the instance was not stopping.",
            value=self.restarts,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def retire(self, slot: _Slot) -> None:
        """The slot's worker is gone: what it counted stays in the sums."""
        for name, samples in slot.last.items():
            retired = slot.retired.setdefault(name, {})
            for key, value in samples.items():
                retired[key] = retired.get(key, 0.0) + value
        slot.last = {}


async def supervise(
    settings: ServiceSettings, name: str, module: str, count: int, registry: CollectorRegistry
) -> int:
    """Run ``count`` workers of ``module`` until SIGTERM/SIGINT; return the exit status."""
    loop = asyncio.get_running_loop()
    namespace = name.removeprefix("wirekit-")
    slots = [_Slot(i) for i in range(count)]
    instance = _Instance(namespace, slots)
    registry.register(instance)
    metrics = MetricsServer(registry, settings.metrics_bind, settings.metrics_port)
    stopping = asyncio.Event()
    ports: dict[str, int] = {}
    all_ready = asyncio.Event()

    deadline: list[asyncio.TimerHandle] = []

    def kill_stragglers() -> None:
        for slot in slots:
            if slot.proc is not None and slot.proc.returncode is None:
                log.warning("worker still running past the drain: killed",
                            extra={"worker": slot.index})  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.kill()

    def on_signal(signum: int) -> None:
        log.info("signal received: forwarding to the workers", extra={"signal": signum})
        stopping.set()
        if not deadline:  # the workers drain within drain_grace_s; a hung one is not waited for
            deadline.append(
                loop.call_later(settings.drain_grace_s + STOP_MARGIN_S, kill_stragglers)
            )
        for slot in slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    def on_reload() -> None:
        log.info("SIGHUP: forwarding to the workers (configuration reload)")
        for slot in slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(signal.SIGHUP)

    if type(settings).reloads_on_sighup:
        # Held since the process started (see .reload): workers not started yet read the
        # newest configuration anyway; the ones started are told.
        loop.add_signal_handler(signal.SIGHUP, on_reload)
        if release():
            on_reload()

    async def start(slot: _Slot) -> bool:
        """Start the slot's worker and wait until it serves; False if it did not."""
        settings_r, settings_w = os.pipe()
        ready_r, ready_w = os.pipe()
        env = {**os.environ, WORKER_ENV: f"{settings_r},{ready_w}"}
        try:
            # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which
            # forwards it once (twice would force-close the workers' connections).
            # SIGHUP blocked from its first instruction until it has its handler (a reload
            # forwarded while it starts waits for it; see .reload).
            with held() if type(settings).reloads_on_sighup else contextlib.nullcontext():
                slot.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", module, env=env, pass_fds=(settings_r, ready_w),
                    process_group=0,
                )  # fmt: skip
        except OSError:
            os.close(settings_w)
            os.close(ready_r)
            log.exception("could not start a worker", extra={"worker": slot.index})
            return False
        finally:
            os.close(settings_r)
            os.close(ready_w)
        worker = Worker(slot.index, count, dict(ports))
        with os.fdopen(settings_w, "wb") as f:
            pickle.dump((worker_settings(settings, count), worker), f)
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(ready_r, "rb")
        )
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                line = await reader.readline()
        except TimeoutError:
            line = b""
        finally:
            transport.close()
        if not line:
            return False
        bound = json.loads(line)
        slot.metrics_port = bound.pop("metrics")
        ports.update(bound)
        slot.ready = True
        if all(s.ready for s in slots):
            all_ready.set()
        return True

    async def keep(slot: _Slot, began: float | None = None) -> None:
        """Keep the slot's worker running until the instance stops (``began``: the worker
        already started then)."""
        backoff = BACKOFF_MIN_S
        while True:
            if began is None:
                began = time.monotonic()
                if not await start(slot) and slot.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        slot.proc.kill()
            slot.returncode = None if slot.proc is None else await slot.proc.wait()
            slot.ready = False
            instance.retire(slot)
            if stopping.is_set():
                return
            instance.restarts += 1
            lived = time.monotonic() - began
            backoff = BACKOFF_MIN_S if lived > STABLE_S else min(backoff * 2, BACKOFF_MAX_S)
            wait = 0.0 if lived > STABLE_S else backoff
            log.error(
                "worker exited: replacing it",
                extra={"worker": slot.index, "status": slot.returncode, "after_s": wait},
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stopping.wait()
            if stopping.is_set():
                return
            began = None

    # Asked at each /readyz (from the metrics thread): every worker serves, no stop begun.
    metrics.readiness = lambda: all(s.ready for s in slots) and not stopping.is_set()
    metrics.start()
    tasks: list[asyncio.Task[None]] = []  # one per slot
    try:
        began = time.monotonic()
        if not await start(slots[0]):  # worker 0 binds the ports the others join
            log.error("worker 0 did not start: stopping")
            return 1
        tasks = [loop.create_task(keep(slots[0], began))]
        tasks += [loop.create_task(keep(slot)) for slot in slots[1:]]
        waits = [loop.create_task(e.wait()) for e in (all_ready, stopping)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        if not stopping.is_set():
            log.info(
                "listening",
                extra={"host": settings.host, "workers": count,
                       "ports": {**ports, "metrics": metrics.port}},
            )  # fmt: skip
        await asyncio.gather(*tasks)
    finally:
        stopping.set()
        for handle in deadline:
            handle.cancel()
        for slot in slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.kill()
                await slot.proc.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if type(settings).reloads_on_sighup:
            hold()  # a late SIGHUP waits, harmless, while the supervisor exits
        metrics.stop()
    return 0 if all(s.returncode == 0 for s in slots) else 1
