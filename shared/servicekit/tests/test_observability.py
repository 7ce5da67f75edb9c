"""Logs, tracing set-up and the metrics/health endpoint."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import Counter
from wirekit_testkit import OtlpReceiver, http_get

from wirekit_servicekit import (
    MetricsServer,
    configure_logging,
    healthcheck,
    new_registry,
    setup_tracing,
)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure_logging("INFO", "demo", stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_logs_are_json_with_trace_ids_inside_a_span(log_stream: io.StringIO) -> None:
    tracer = TracerProvider().get_tracer("test")
    log = logging.getLogger("demo.test")
    log.info("outside", extra={"peer": "127.0.0.1"})
    with tracer.start_as_current_span("op") as span:
        log.warning("inside")
        ctx = span.get_span_context()
    log.debug("filtered out by level")
    first, second = (json.loads(line) for line in log_stream.getvalue().splitlines())
    assert first["message"] == "outside"
    assert first["peer"] == "127.0.0.1"
    assert first["service"] == "demo"
    assert first["level"] == "INFO"
    assert "time" in first
    assert "trace_id" not in first
    assert second["trace_id"] == format(ctx.trace_id, "032x")
    assert second["span_id"] == format(ctx.span_id, "016x")


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP receiver on loopback."""
    rx = OtlpReceiver("127.0.0.1")
    rx.thread.start()
    yield rx
    rx.server.shutdown()
    rx.server.server_close()


_OTEL_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
              "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME",
              "OTEL_RESOURCE_ATTRIBUTES")  # fmt: skip


def _export_one(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> TracerProvider:
    """setup_tracing() as a service calls it, from this environment; one span, flushed."""
    for var in _OTEL_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    provider = setup_tracing("wirekit-demo", "1.0")
    provider.get_tracer("t").start_span("probe").end()
    assert provider.force_flush(10_000)
    provider.shutdown()
    return provider


def test_tracing_without_endpoint_exports_nothing_and_names_the_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider = _export_one(monkeypatch, {})
    assert provider.resource.attributes["service.name"] == "wirekit-demo"


@pytest.mark.parametrize(
    ("env", "exporting"),
    [
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "{base}"}, True, id="base"),
        pytest.param({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "{base}/v1/traces"}, True,
                     id="traces"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "{base}", "OTEL_TRACES_EXPORTER": "none"},
                     False, id="exporter-none"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "{base}", "OTEL_SDK_DISABLED": "true"},
                     False, id="sdk-disabled"),
    ],
)  # fmt: skip
def test_tracing_exports_over_otlp_when_configured(
    monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver, env: dict[str, str], exporting: bool
) -> None:
    _export_one(monkeypatch, {k: v.format(base=receiver.endpoint) for k, v in env.items()})
    names = [span.name for _, span in receiver.spans()]
    assert names == (["probe"] if exporting else [])


def test_otel_service_name_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "renamed")
    provider = setup_tracing("wirekit-demo", "1.0")
    assert provider.resource.attributes["service.name"] == "renamed"


def test_metrics_server_health_readiness_and_metrics() -> None:
    registry = new_registry()
    Counter("demo_things", "Things.", registry=registry).inc(3)
    server = MetricsServer(registry, "127.0.0.1", 0)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert http_get(base + "/healthz")[0] == 200
        assert http_get(base + "/readyz")[0] == 503
        server.ready = True
        assert http_get(base + "/readyz")[0] == 200
        status, text = http_get(base + "/metrics")
        assert status == 200
        assert "demo_things_total 3.0" in text
        assert "process_cpu_seconds_total" in text
        assert http_get(base + "/")[0] == 404
    finally:
        server.stop()


def _wakeups(thread: threading.Thread) -> int:
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)


def test_metrics_server_sleeps_until_a_request_and_stops_at_once() -> None:
    """Idle, the serving thread is not woken (socketserver's serve_forever looks for a shutdown
    every 0.5 s, so an exit waited up to that long); stop() wakes it, ends it, closes the port."""
    server = MetricsServer(new_registry(process_metrics=False), "127.0.0.1", 0)
    server.start()
    thread = server._thread  # the serving thread itself
    try:
        assert http_get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
        time.sleep(0.2)  # the request's hand-off settles
        before = _wakeups(thread)
        time.sleep(1.2)  # serve_forever would have woken twice
        assert _wakeups(thread) == before
        assert http_get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200  # still serving
    finally:
        server.stop()
    assert not thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_the_image_healthcheck_follows_readyz(monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m wirekit_servicekit.healthcheck VAR DEFAULT`: 0 while /readyz answers 200."""
    server = MetricsServer(new_registry(process_metrics=False), "127.0.0.1", 0)
    server.start()
    try:
        monkeypatch.setenv("DEMO_METRICS_PORT", str(server.port))
        assert healthcheck.main(["DEMO_METRICS_PORT", "1"]) == 1  # not ready yet
        server.ready = True
        assert healthcheck.main(["DEMO_METRICS_PORT", "1"]) == 0
        monkeypatch.delenv("DEMO_METRICS_PORT")
        assert healthcheck.main(["DEMO_METRICS_PORT", str(server.port)]) == 0  # the default
    finally:
        server.stop()
    assert healthcheck.main(["DEMO_METRICS_PORT", str(server.port)]) == 1  # gone
