"""Logs, tracing set-up and the metrics/health endpoint."""

from __future__ import annotations

import io
import json
import logging
import urllib.error
import urllib.request

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import Counter

from wirekit_servicekit import MetricsServer, configure_logging, new_registry, setup_tracing


@pytest.fixture
def log_stream() -> io.StringIO:
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


def _processors(provider: TracerProvider) -> list[object]:
    return list(provider._active_span_processor._span_processors)


def test_tracing_without_endpoint_exports_nothing() -> None:
    provider = setup_tracing("wirekit-demo", "1.0", environ={})
    assert _processors(provider) == []
    assert provider.resource.attributes["service.name"] == "wirekit-demo"


@pytest.mark.parametrize(
    ("env", "exporting"),
    [
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True, id="base"),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True,
            id="traces",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "none"}, False,
            id="exporter-none",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}, False,
            id="sdk-disabled",
        ),
    ],
)  # fmt: skip
def test_tracing_exports_when_configured(env: dict[str, str], exporting: bool) -> None:
    provider = setup_tracing("wirekit-demo", "1.0", environ=env)
    processors = _processors(provider)
    assert len(processors) == (1 if exporting else 0)
    if exporting:
        assert isinstance(processors[0], BatchSpanProcessor)
    provider.shutdown()


def test_otel_service_name_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "renamed")
    provider = setup_tracing("wirekit-demo", "1.0")
    assert provider.resource.attributes["service.name"] == "renamed"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_server_health_readiness_and_metrics() -> None:
    registry = new_registry()
    Counter("demo_things", "Things.", registry=registry).inc(3)
    server = MetricsServer(registry, "127.0.0.1", 0)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert _get(base + "/healthz")[0] == 200
        assert _get(base + "/readyz")[0] == 503
        server.ready = True
        assert _get(base + "/readyz")[0] == 200
        status, text = _get(base + "/metrics")
        assert status == 200
        assert "demo_things_total 3.0" in text
        assert "process_cpu_seconds_total" in text
        assert _get(base + "/")[0] == 404
    finally:
        server.stop()
