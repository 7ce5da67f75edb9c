"""Serving one process's parts: listen, serve, drain on a signal, exit.

:func:`run` starts the metrics endpoint, binds every listener (joining the ports of worker 0 in
a worker), starts the background tasks, marks the service ready and waits for SIGTERM or SIGINT.
Then, as uvicorn does: stop accepting, mark not ready, ask every open connection to finish
(:func:`~.hub.drain`), wait up to the drain time for them to go, and close the rest. A second
signal during the drain closes everything at once. A service that reloads has its SIGHUP
handler installed before anything is bound (:class:`~.parts.Reload`).

Exit status: 0 after a drain (every connection finished, or the rest closed at the deadline), 1
when a second signal forced the exit, 2 for invalid settings (see ``settings``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

from .hub import (
    REJECT_REASONS,
    CloseReason,
    Connection,
    ConnectionHub,
    ConnectionLimits,
    drain,
    source_key,
)
from .loops import event_loop_factory
from .metrics import MetricsServer
from .parts import Background, DatagramListener, HttpRoute, Listener, Part, Reload
from .reload import RELOAD_SIGNAL, hold, release, restore
from .settings import ServiceSettings
from .sockets import reset, reset_when_delivered, undelivered_bytes, unread_bytes
from .worker import SOLO, Worker

# Beside run: what this module held before it was split (hub, sockets, parts, loops), still
# importable from here for code written against earlier releases.
__all__ = [
    "REJECT_REASONS", "Background", "CloseReason", "Connection", "ConnectionHub",
    "ConnectionLimits", "DatagramListener", "Listener", "Reload", "drain", "event_loop_factory",
    "reset", "reset_when_delivered", "run", "source_key", "undelivered_bytes", "unread_bytes",
]  # fmt: skip

log = logging.getLogger(__name__)


def _install(loop: asyncio.AbstractEventLoop, signum: int, callback: Callable[[], object]) -> bool:
    """``callback`` on ``signum``; False where signals cannot be handled (not the main thread)."""
    try:
        loop.add_signal_handler(signum, callback)
    except (RuntimeError, ValueError):
        return False
    return True


async def _supervised(part: Background) -> None:
    try:
        await part.factory()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("background task failed", extra={"task": part.name})


def dual_stack_socket(port: int, shared: bool) -> socket.socket:
    """A TCP socket bound to ``::`` that takes IPv6 and IPv4 clients alike (``IPV6_V6ONLY``
    off): ``host = "::"`` means every address of both families. IPv4 clients appear as
    IPv4-mapped addresses (``::ffff:192.0.2.1``), which every decision and record shows as the
    IPv4 address (:func:`~.proxy.normalise`)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("::", port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Serving:
    """One run of :func:`run`: what it bound and started, so that its end closes all of it."""

    def __init__(self, parts: Sequence[Part], worker: Worker) -> None:
        self.parts = parts
        self.worker = worker
        self.servers: list[asyncio.Server] = []
        self.endpoints: list[asyncio.BaseTransport] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.hubs: list[ConnectionHub] = [p.hub for p in parts if isinstance(p, Listener)]

    async def bind(self) -> dict[str, int]:
        """Every listener bound (a worker shares its ports: ``SO_REUSEPORT``, on the ports the
        first worker bound); the ports by name."""
        loop = asyncio.get_running_loop()
        shared, bound = self.worker.shares_ports, {}
        for part in self.parts:
            if isinstance(part, Background | Reload | HttpRoute):
                continue
            port = self.worker.ports.get(part.name, part.port)
            if isinstance(part, DatagramListener):
                if part.open is not None:
                    transport = await part.open(part.factory, part.host, port, shared)
                else:
                    transport, _ = await loop.create_datagram_endpoint(
                        part.factory, local_addr=(part.host, port), reuse_port=shared
                    )
                self.endpoints.append(transport)
                bound[part.name] = transport.get_extra_info("sockname")[1]
                continue
            factory = part.hub.wrap(part.factory, paused=part.tls_later)
            if part.host == "::":  # both families on one socket (asyncio would make it v6-only)
                sock = dual_stack_socket(port, shared)
                server = await loop.create_server(factory, sock=sock, backlog=1024, ssl=part.ssl)
            else:
                server = await loop.create_server(
                    factory, part.host, port, reuse_address=True, reuse_port=shared,
                    backlog=1024, ssl=part.ssl,
                )  # fmt: skip
            self.servers.append(server)
            bound[part.name] = server.sockets[0].getsockname()[1]
        return bound

    def start_background(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(_supervised(p)) for p in self.parts
                      if isinstance(p, Background)]  # fmt: skip

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()  # open connections are left to the hubs
        for endpoint in self.endpoints:
            endpoint.close()  # datagrams already received have been answered

    async def close(self) -> None:
        self.stop_accepting()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for hub in self.hubs:
            await hub.aclose()


async def run(
    settings: ServiceSettings,
    parts: Sequence[Part],
    metrics: MetricsServer,
    *,
    worker: Worker = SOLO,
    on_ready: Callable[[dict[str, int]], None] | None = None,
    cleanup: Callable[[], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Serve ``parts`` until a signal (or ``stop`` is set); drain; return the exit status."""
    loop = asyncio.get_running_loop()
    stop = stop if stop is not None else asyncio.Event()
    force = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: closing every connection now", extra={"signal": signum})
            force.set()
        else:
            log.info("signal received: draining", extra={"signal": signum})
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    on_reload = next((p.callback for p in parts if isinstance(p, Reload)), None)
    if on_reload is None:  # nothing to reload: a SIGHUP (`docker kill -s HUP`) must not kill it
        on_reload = partial(log.info, "SIGHUP: nothing to reload")
    reload_held = RELOAD_SIGNAL in signal.pthread_sigmask(signal.SIG_BLOCK, ())
    if on_reload is not None and _install(loop, RELOAD_SIGNAL, on_reload) and release():
        on_reload()  # a SIGHUP came while the service started

    serving = _Serving(parts, worker)
    metrics.routes.update({p.path: p.handler for p in parts if isinstance(p, HttpRoute)})
    metrics.start()
    try:
        try:
            bound = await serving.bind()
        except OSError as exc:  # the port is taken, the address not ours: one line, exit 1
            log.error("cannot listen", extra={"host": settings.host, "error": str(exc)})
            return 1
        bound["metrics"] = metrics.port
        serving.start_background()
        metrics.ready = True
        where = {"host": settings.host, "metrics_host": settings.metrics_bind, "ports": bound}
        log.info("listening", extra=where)
        if on_ready is not None:
            on_ready(bound)
        await stop.wait()

        metrics.ready = False
        serving.stop_accepting()
        closed = await drain(serving.hubs, settings.drain_grace_s, force)
        if force.is_set():
            return 1
        if closed:
            log.warning("drain deadline reached: closed the rest", extra={"closed": closed})
        else:
            log.info("drained: every connection finished")
        return 0
    finally:
        await serving.close()
        hold()  # before the handler goes: a late SIGHUP must not meet SIGHUP's default action
        for signum in (signal.SIGTERM, signal.SIGINT, RELOAD_SIGNAL):
            loop.remove_signal_handler(signum)
        restore(reload_held)
        metrics.stop()
        if cleanup is not None:
            result = cleanup()
            if result is not None:
                await result
