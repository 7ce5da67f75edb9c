"""Prometheus metrics: a fresh registry per service, and the HTTP endpoint that serves it.

The endpoint answers ``/metrics`` (prometheus_client's own WSGI app: text and OpenMetrics,
gzip, ``name[]`` filters), ``/healthz`` (the process is alive) and ``/readyz`` (listeners are
accepting; 503 before start and while draining). It runs in prometheus_client's threaded WSGI
server, off the event loop, so a slow scraper never delays a client.
"""

from __future__ import annotations

import bisect
import selectors
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .aggregate import ServiceRegistry

__all__ = ["ConnectionMetrics", "HotCounter", "HotHistogram", "MetricsServer", "new_registry"]

StartResponse = Callable[..., Any]
Environ = dict[str, Any]


def new_registry(process_metrics: bool = True) -> ServiceRegistry:
    """A registry of one's own; with the standard process/platform/GC collectors by default.
    (The services turn off prometheus_client's ``*_created`` series once, at start: they double
    the exposition and no dashboard uses them; see ``Service.main``.)"""
    registry = ServiceRegistry(auto_describe=True)
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
        self.proxy_headers = Counter(
            "proxy_headers", "PROXY protocol headers (proxy_protocol on), by result: accepted, "
            "local (the proxy's health check), or why the connection was closed.",
            (*names, "result"), namespace=namespace, registry=registry,
        )  # fmt: skip


class Cell:
    """One counter value: ``cell.n += k`` on the hot path (no lock, no label lookup)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n: int | float = 0


class HotCounter(Collector):
    """A counter family for per-message paths, read by Prometheus at scrape time.

    prometheus_client's Counter takes a lock on every ``inc()``; at hundreds of thousands of
    increments a second that is a measurable share of an echo's cost. Here each labelled child
    is a plain :class:`Cell` the event loop increments; the scrape thread reads the values
    (a torn read is impossible under the GIL; a scrape may miss the increments of the moment).
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Iterable[str] = (),
        *, namespace: str, registry: CollectorRegistry, cell: Callable[[], Cell] = Cell,
    ) -> None:  # fmt: skip
        self.name = f"{namespace}_{name}"
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._cells: dict[tuple[str, ...], Cell] = {}
        self._cell = cell  # another implementation of Cell's interface (echo's C build)
        registry.register(self)

    def labels(self, *values: str) -> Cell:
        cell = self._cells.get(values)
        if cell is None:
            cell = self._cells[values] = self._cell()
        return cell

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, cell in list(self._cells.items()):
            family.add_metric(list(values), cell.n)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


class Buckets:
    """A histogram's state without a name: ``observe()`` is a bisect and two additions, no
    lock; ``cumulative()`` reads a copy, so a scrape racing an observation sees a consistent
    count (the sum may be one observation behind or ahead, as with any lock-free reader)."""

    __slots__ = ("bounds", "counts", "labels", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = sorted(bounds)
        self.labels = [*map(floatToGoString, self.bounds), "+Inf"]
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """The buckets as Prometheus has them (cumulative, ``le`` labels), and the sum."""
        counts, total = list(self.counts), self.sum
        out, running = [], 0
        for bound, count in zip(self.labels, counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out, total


class HotHistogram(Collector):
    """A histogram for per-message paths: ``observe()`` is a bisect and two additions."""

    def __init__(
        self, name: str, documentation: str, buckets: Iterable[float],
        *, namespace: str, registry: CollectorRegistry,
        implementation: Callable[[Iterable[float]], Buckets] = Buckets,
    ) -> None:  # fmt: skip
        self.name = f"{namespace}_{name}"
        self.documentation = documentation
        self.buckets = implementation(buckets)  # or another with its interface (echo's C build)
        self.observe = self.buckets.observe
        registry.register(self)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, total = self.buckets.cumulative()
        yield HistogramMetricFamily(
            self.name, self.documentation, buckets=cumulative, sum_value=total
        )

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on their own port, in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.ready = False
        #: When set, /readyz asks it instead of reading ``ready`` (a supervisor's workers).
        self.readiness: Callable[[], bool] | None = None
        #: When set, asked for the other paths: the body of a 200 answer, or None (404). A
        #: supervisor answers ``/workers/<i>/metrics`` with it.
        self.more: Callable[[str], str | None] | None = None
        #: More paths (a service's HttpRoute parts): query parameters -> status, type, body.
        self.routes: dict[str, Callable[[dict[str, list[str]]], tuple[int, str, bytes]]] = {}
        self._metrics_app = make_wsgi_app(registry)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ][0]
        # timeout: handle_request's own wait, bounded should the socket have emptied meanwhile
        server_class = type("MetricsHTTPServer", (ThreadingWSGIServer,),
                            {"address_family": family, "timeout": 1.0})  # fmt: skip
        self._server: ThreadingWSGIServer = make_server(
            host, port, self._app, server_class, handler_class=_QuietHandler
        )
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def _app(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            return _plain(start_response, 200, b"ok\n")
        if path == "/readyz":
            if self.readiness() if self.readiness is not None else self.ready:
                return _plain(start_response, 200, b"ready\n")
            return _plain(start_response, 503, b"not ready\n")
        if path == "/metrics":
            result: Iterable[bytes] = self._metrics_app(environ, start_response)
            return result
        route = self.routes.get(path)
        if route is not None:
            status, content_type, payload = route(parse_qs(environ.get("QUERY_STRING", "")))
            start_response(f"{status} {_REASONS.get(status, 'Error')}",
                           [("Content-Type", content_type),
                            ("Content-Length", str(len(payload)))])  # fmt: skip
            return [payload]
        body = self.more(path) if self.more is not None else None
        if body is not None:
            return _plain(start_response, 200, body.encode())
        return _plain(start_response, 404, b"try /metrics, /healthz or /readyz\n")

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        """socketserver's serve_forever, but asleep until a request or stop(): serve_forever
        wakes every 0.5 s to look for a shutdown, so a service's exit waited up to that long."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._server, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while all(key.fileobj is not self._wake_r for key, _ in selector.select()):
                self._server.handle_request()

    def stop(self) -> None:
        self._wake_w.send(b"\0")
        if self._thread.is_alive():
            self._thread.join()
        self._server.server_close()
        self._wake_r.close()
        self._wake_w.close()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _plain(start_response: StartResponse, status: int, body: bytes) -> list[bytes]:
    start_response(
        f"{status} {_REASONS[status]}",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
    )
    return [body]
