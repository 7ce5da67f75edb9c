"""Prometheus metrics: a fresh registry per service, and the HTTP endpoint that serves it.

The endpoint answers ``/metrics`` (prometheus_client's own WSGI app: text and OpenMetrics,
gzip, ``name[]`` filters), ``/healthz`` (the process is alive) and ``/readyz`` (listeners are
accepting; 503 before start and while draining). It runs in prometheus_client's threaded WSGI
server, off the event loop, so a slow scraper never delays a client.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

__all__ = ["ConnectionMetrics", "MetricsServer", "new_registry"]

StartResponse = Callable[..., Any]
Environ = dict[str, Any]


def new_registry(process_metrics: bool = True) -> CollectorRegistry:
    """A registry of one's own; with the standard process/platform/GC collectors by default."""
    # ``*_created`` series double the exposition and no dashboard uses them (process-wide switch).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry(auto_describe=True)
    if process_metrics:
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)
    return registry


class ConnectionMetrics:
    """The connection families every TCP service exports, under the service's namespace."""

    def __init__(self, namespace: str, registry: CollectorRegistry, labelnames: Iterable[str]):
        names = tuple(labelnames)
        self.opened = Counter(
            "connections_opened", "TCP connections accepted and served.", names,
            namespace=namespace, registry=registry,
        )  # fmt: skip
        self.active = Gauge(
            "connections_active", "TCP connections open now.", names,
            namespace=namespace, registry=registry,
        )  # fmt: skip
        self.rejected = Counter(
            "connections_rejected", "TCP connections closed at once, by reason.",
            (*names, "reason"), namespace=namespace, registry=registry,
        )  # fmt: skip


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on their own port, in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.ready = False
        self._metrics_app = make_wsgi_app(registry)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ][0]
        server_class = type("MetricsHTTPServer", (ThreadingWSGIServer,), {"address_family": family})
        self._server: ThreadingWSGIServer = make_server(
            host, port, self._app, server_class, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def _app(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            return _plain(start_response, 200, b"ok\n")
        if path == "/readyz":
            if self.ready:
                return _plain(start_response, 200, b"ready\n")
            return _plain(start_response, 503, b"not ready\n")
        if path == "/metrics":
            result: Iterable[bytes] = self._metrics_app(environ, start_response)
            return result
        return _plain(start_response, 404, b"try /metrics, /healthz or /readyz\n")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


def _plain(start_response: StartResponse, status: int, body: bytes) -> list[bytes]:
    start_response(
        f"{status} {_REASONS[status]}",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
    )
    return [body]
