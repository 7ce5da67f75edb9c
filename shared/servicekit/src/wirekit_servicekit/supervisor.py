"""``--workers N``: every core of one machine, as uvicorn's multiprocess supervisor does it.

With ``workers`` above 1 the process started by the user becomes a :class:`Supervisor` of N
:class:`WorkerProcess` es -- each ``python -m <service>``, its own process and event loop:

- **Ports.** Every worker binds the service's ports itself with ``SO_REUSEPORT``: the kernel
  spreads connections and datagrams over them by a hash of the 4-tuple. Worker 0 starts first;
  the ports it bound (port 0 resolved) are the ones the others join.
- **Settings** reach a worker through a pipe (:mod:`.worker`), with the per-instance limits
  divided among the workers: N workers together enforce what one process would.
- **Metrics.** Each worker serves its own ``/metrics`` on 127.0.0.1; the supervisor's -- the one
  operators scrape -- combines them at scrape time by metric type (:mod:`.aggregate`), plus
  ``<service>_workers{state}`` and ``<service>_worker_restarts_total``. ``/readyz`` is 200
  while every worker serves.
- **Life.** A worker that exits while the instance is not stopping is replaced and counted; one
  that dies within ``STABLE_S`` of its start waits a back-off first (:class:`Backoff`).
  SIGTERM/SIGINT go to every worker (each drains as one process would); a worker still running
  ``drain_grace_s + STOP_MARGIN_S`` later is killed; the supervisor exits 0 when every worker
  exited 0, else 1. SIGHUP goes to every worker of a service that reloads; workers start with it
  blocked (:mod:`.reload`). Workers die with the supervisor (``PR_SET_PDEATHSIG``).

Why not prometheus_client's multiprocess mode: it replaces every counter with a file-backed
value (a lock and an mmap write per increment) and does not cover the lock-free collectors
(:class:`~wirekit_servicekit.metrics.HotCounter`); collecting at scrape time costs one loopback
HTTP request per worker per scrape instead, nothing per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import re
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .aggregate import InstanceMetrics
from .metrics import MetricsServer, new_registry
from .reload import held, hold, release
from .settings import ServiceSettings
from .worker import WORKER_ENV, Worker, worker_settings

__all__ = ["Backoff", "Supervisor", "WorkerProcess"]

log = logging.getLogger(__name__)

#: A worker that lived this long was not crash-looping: its replacement starts at once.
STABLE_S = 10.0
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
#: A worker must report ready within this time, or it is killed and replaced.
START_TIMEOUT_S = 60.0
#: After SIGTERM, a worker still running ``drain_grace_s`` plus this is killed.
STOP_MARGIN_S = 10.0
_WORKER_PATH = re.compile(r"/workers/(\d+)/metrics")


@dataclass
class Backoff:
    """How long a slot waits before replacing a worker that exited: not at all after a stable
    life (over ``STABLE_S``), else ``BACKOFF_MIN_S`` doubling per crash up to ``BACKOFF_MAX_S``."""

    next_s: float = BACKOFF_MIN_S

    def after(self, lived_s: float) -> float:
        if lived_s > STABLE_S:
            self.next_s = BACKOFF_MIN_S
            return 0.0
        wait, self.next_s = self.next_s, min(self.next_s * 2, BACKOFF_MAX_S)
        return wait


@dataclass(frozen=True)
class Ready:
    """What a worker reported once it served."""

    ports: dict[str, int]  # the service's ports and "metrics"
    gauges: dict[str, str]  # gauge family -> combining mode


def _open_pidfd(pid: int) -> int | None:
    """A pidfd for the worker just spawned (Linux 5.3+); None where there is none, or if the
    worker has already been reaped (it exited at once: kill(2) then finds no such process)."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


class WorkerProcess:
    """One worker slot: the process in it now, started, signalled, reaped."""

    def __init__(self, index: int, count: int, module: str, hold_sighup: bool) -> None:
        self.index = index
        self.count = count
        self.module = module
        self.hold_sighup = hold_sighup
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.returncode: int | None = None
        self._ready_r: int | None = None
        self._pidfd: int | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def spawn(self, settings: ServiceSettings, ports: Mapping[str, int]) -> None:
        """Start a worker in the slot: its own process group (a terminal's Ctrl-C reaches the
        supervisor only, which forwards it once), SIGHUP blocked for a service that reloads
        until the worker has its handler; settings and place through a pipe."""
        settings_r, settings_w = os.pipe()
        ready_r, ready_w = os.pipe()
        env = {**os.environ, WORKER_ENV: f"{settings_r},{ready_w}"}
        self.started, self.returncode = time.monotonic(), None
        try:
            with held() if self.hold_sighup else contextlib.nullcontext():
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", self.module, env=env,
                    pass_fds=(settings_r, ready_w), process_group=0,
                )  # fmt: skip
        except OSError:
            os.close(settings_w)
            os.close(ready_r)
            raise
        finally:
            os.close(settings_r)
            os.close(ready_w)
        self._close_pidfd()
        self._pidfd = _open_pidfd(self.proc.pid)
        self._ready_r = ready_r
        with os.fdopen(settings_w, "wb") as f:
            worker = Worker(self.index, self.count, dict(ports))
            pickle.dump((worker_settings(settings, self.count), worker), f)

    async def ready(self, timeout_s: float = START_TIMEOUT_S) -> Ready | None:
        """What the worker reports once it serves; None if it ended or said nothing in time."""
        fd, self._ready_r = self._ready_r, None
        if fd is None:
            return None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb")
        )
        try:
            async with asyncio.timeout(timeout_s):
                line = await reader.readline()
        except TimeoutError:
            line = b""
        finally:
            transport.close()
        if not line:
            return None
        report = json.loads(line)
        return Ready(dict(report["ports"]), dict(report["gauges"]))

    def signal(self, signum: int) -> None:
        """Sent through the worker's pidfd (kill(2) where there is none), never through
        ``Process.send_signal``: before Python 3.13 that polls the child, i.e. calls waitpid,
        and a worker that had just exited was reaped there -- its status lost to asyncio's own
        watcher, which then reports 255 (cpython#87744). A pidfd names this one process: a
        signal cannot reach another given the pid after it was reaped (cpython#127049)."""
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                if self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, signum)
                else:
                    os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    async def reap(self) -> int | None:
        """Wait for the worker to exit; its status (None: the slot never had one)."""
        if self.proc is not None:
            self.returncode = await self.proc.wait()
            self._close_pidfd()
        return self.returncode

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    @property
    def lived_s(self) -> float:
        return time.monotonic() - self.started


class Supervisor:
    """Runs ``count`` workers of ``module`` until SIGTERM/SIGINT; :meth:`run` returns the exit
    status."""

    def __init__(
        self, settings: ServiceSettings, name: str, module: str, count: int
    ) -> None:  # fmt: skip
        self.settings = settings
        self.reloads = type(settings).reloads_on_sighup
        self.workers = [WorkerProcess(i, count, module, self.reloads) for i in range(count)]
        self.metrics = InstanceMetrics(name.removeprefix("wirekit-"), count)
        registry = new_registry()
        registry.register(self.metrics)
        self.server = MetricsServer(registry, settings.metrics_bind, settings.metrics_port)
        self.server.readiness = self.ready
        self.server.more = self.worker_exposition
        self.stopping = asyncio.Event()
        self.all_up = asyncio.Event()
        self._spawning = asyncio.Lock()
        self.up: set[int] = set()
        self.ports: dict[str, int] = {}
        self._deadline: asyncio.TimerHandle | None = None
        self._stop_signal = signal.SIGTERM

    # -- signals ----------------------------------------------------------------------------
    def handle_term(self, signum: int = signal.SIGTERM) -> None:
        """Stop: every worker drains; the ones still running past the drain are killed."""
        log.info("signal received: forwarding to the workers", extra={"signal": signum})
        self._stop_signal = signal.Signals(signum)
        self.stopping.set()
        if self._deadline is None:
            grace = self.settings.drain_grace_s + STOP_MARGIN_S
            self._deadline = asyncio.get_running_loop().call_later(grace, self.kill_stragglers)
        self.signal_all(signum)

    def handle_int(self) -> None:
        self.handle_term(signal.SIGINT)

    def handle_hup(self) -> None:
        log.info("SIGHUP: forwarding to the workers (configuration reload)")
        self.signal_all(signal.SIGHUP)

    def signal_all(self, signum: int) -> None:
        for worker in self.workers:
            worker.signal(signum)

    def kill_stragglers(self) -> None:
        for worker in self.workers:
            if worker.alive:
                log.warning("worker still running past the drain: killed",
                            extra={"worker": worker.index})  # fmt: skip
                worker.kill()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.handle_term)
        loop.add_signal_handler(signal.SIGINT, self.handle_int)
        if self.reloads:
            # Held since the process started (see .reload): workers not started yet read the
            # newest configuration anyway; the ones started are told.
            loop.add_signal_handler(signal.SIGHUP, self.handle_hup)
            if release():
                self.handle_hup()
        else:  # nothing to reload: a SIGHUP must not kill the instance
            loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP: nothing to reload")

    # -- state ------------------------------------------------------------------------------
    def ready(self) -> bool:
        """/readyz (asked from the metrics thread): every worker serves, no stop begun."""
        return len(self.up) == len(self.workers) and not self.stopping.is_set()

    def worker_exposition(self, path: str) -> str | None:
        """``/workers/<i>/metrics``: worker i's own metrics, for debugging."""
        match = _WORKER_PATH.fullmatch(path)
        if match is None:
            return None
        return self.metrics.exposition(int(match.group(1)), accept="text/plain")

    # -- one slot ---------------------------------------------------------------------------
    async def start(self, worker: WorkerProcess) -> bool:
        """Start the slot's worker and wait until it serves; False (and the worker killed) if
        it could not start or did not get ready."""
        try:
            async with self._spawning:  # one at a time: SIGHUP's block is per thread (held())
                await worker.spawn(self.settings, self.ports)
        except OSError:
            log.exception("could not start a worker", extra={"worker": worker.index})
            return False
        if self.stopping.is_set():  # the stop came while it was being spawned
            worker.signal(self._stop_signal)
        report = await worker.ready()
        if report is None:
            worker.kill()
            return False
        metrics_port = report.ports.pop("metrics")
        self.ports.update(report.ports)
        self.metrics.attach(worker.index, metrics_port, report.gauges)
        self.up.add(worker.index)
        if len(self.up) == len(self.workers):
            self.all_up.set()
        return True

    async def keep(self, worker: WorkerProcess, started: bool) -> None:
        """Keep the slot's worker running until the instance stops (``started``: its first
        worker is already up)."""
        backoff = Backoff()
        while True:
            if not started:
                if self.stopping.is_set():
                    return  # stopped before this slot's worker was started: none to start
                await self.start(worker)
            started = False
            await worker.reap()
            self.up.discard(worker.index)
            self.metrics.detach(worker.index)
            if self.stopping.is_set():
                return
            self.metrics.restarts += 1
            wait = backoff.after(worker.lived_s)
            log.error("worker exited: replacing it",
                      extra={"worker": worker.index, "status": worker.returncode,
                             "after_s": wait})  # fmt: skip
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.stopping.wait()
            if self.stopping.is_set():
                return

    # -- the instance -----------------------------------------------------------------------
    async def run(self) -> int:
        self._install_signals()
        self.server.start()
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []
        try:
            first, *others = self.workers
            if not await self.start(first):  # worker 0 binds the ports the others join
                log.error("worker 0 did not start: stopping")
                return 1
            tasks = [loop.create_task(self.keep(first, True))]
            tasks += [loop.create_task(self.keep(w, False)) for w in others]
            await self._until_ready_or_stopping()
            if not self.stopping.is_set():
                log.info("listening", extra={
                    "host": self.settings.host, "workers": len(self.workers),
                    "ports": {**self.ports, "metrics": self.server.port}})  # fmt: skip
            await asyncio.gather(*tasks)
        finally:
            await self._shutdown(tasks)
        # A slot stopped before its worker was ever started has nothing to answer for.
        return 0 if all(w.returncode == 0 for w in self.workers if w.proc is not None) else 1

    async def _until_ready_or_stopping(self) -> None:
        waits = [asyncio.ensure_future(e.wait()) for e in (self.all_up, self.stopping)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        self.stopping.set()
        if self._deadline is not None:
            self._deadline.cancel()
        for worker in self.workers:
            worker.kill()
            await worker.reap()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.reloads:
            hold()  # first: a late SIGHUP waits, harmless, while the supervisor exits
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        self.server.stop()


def supervise(settings: ServiceSettings, name: str, module: str, count: int) -> int:
    """Run a supervisor of ``count`` workers to its end; its exit status."""
    return asyncio.run(Supervisor(settings, name, module, count).run())
