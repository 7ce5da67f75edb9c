"""Real OTLP/HTTP export: the echo container sends its connection spans to a receiver here."""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from testcontainers.core.container import DockerContainer
from wirekit_testkit import hardened, host_port, wait_ready, wait_until

from wirekit_framing import recv_frame, send_frame

Start = Callable[[DockerContainer], DockerContainer]


class OtlpReceiver:
    """An OTLP/HTTP (protobuf) trace receiver: decodes every request it gets."""

    def __init__(self, host: str) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces"
                if ok:
                    receiver.requests.append(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.endpoint = f"http://{host}:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def spans(self) -> list[tuple[dict[str, object], Span]]:
        """(resource attributes, span) for every span received so far."""
        out = []
        for request in list(self.requests):
            for resource_spans in request.resource_spans:
                resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    out.extend((resource, span) for span in scope_spans.spans)
        return out


def _has_traffic(span: Span) -> bool:
    return any(
        kv.key == "wirekit.received_bytes" and kv.value.int_value > 0 for kv in span.attributes
    )


def _value(value: AnyValue) -> object:
    return getattr(value, value.WhichOneof("value") or "string_value")


@pytest.fixture
def otlp_receiver(docker_gateway: str) -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver(docker_gateway)  # reachable from containers on the default bridge
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def test_connection_spans_arrive_over_otlp_with_service_name_and_attributes(
    images: dict[str, str], start: Start, otlp_receiver: OtlpReceiver
) -> None:
    container = start(
        hardened(
            images["echo"],
            "7001/tcp",
            "9700/tcp",
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="200",
        )
    )
    wait_ready(container)
    port = host_port(container, "7001/tcp")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        send_frame(s, b"traced over OTLP")
        assert recv_frame(s) == b"traced over OTLP"

    def framed_spans() -> list[tuple[dict[str, object], Span]]:
        return [
            (res, span)
            for res, span in otlp_receiver.spans()
            if span.name == "echo.framed connection"
            and any(
                kv.key == "wirekit.received_bytes" and kv.value.int_value > 0
                for kv in span.attributes
            )
        ]

    resource, span = wait_until(framed_spans, 30, "the connection span over OTLP")[0]
    assert resource["service.name"] == "wirekit-echo"
    assert resource["service.version"] == "0.1.0"
    assert span.kind == Span.SPAN_KIND_SERVER
    attrs = {kv.key: _value(kv.value) for kv in span.attributes}
    assert attrs["network.transport"] == "tcp"
    assert attrs["server.port"] == 7001
    assert attrs["wirekit.echo.mode"] == "framed"
    assert attrs["wirekit.received_bytes"] == len(b"traced over OTLP") + 4
    assert isinstance(attrs["network.peer.address"], str)
    assert attrs["network.peer.address"]
    assert len(span.trace_id) == 16
    assert len(span.span_id) == 8
