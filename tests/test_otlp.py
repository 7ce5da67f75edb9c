"""Real OTLP/HTTP export: the echo container sends its connection spans to a receiver here."""

from __future__ import annotations

import socket
from collections.abc import Callable

from opentelemetry.proto.trace.v1.trace_pb2 import Span
from testcontainers.core.container import DockerContainer
from wirekit_testkit import (
    VERSION,
    OtlpReceiver,
    hardened,
    host_port,
    otlp_value,
    wait_ready,
    wait_until,
)

from wirekit_framing import recv_frame, send_frame

Start = Callable[[DockerContainer], DockerContainer]


def _has_traffic(span: Span) -> bool:
    return any(
        kv.key == "wirekit.received_bytes" and kv.value.int_value > 0 for kv in span.attributes
    )


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
    assert resource["service.version"] == VERSION
    assert span.kind == Span.SPAN_KIND_SERVER
    attrs = {kv.key: otlp_value(kv.value) for kv in span.attributes}
    assert attrs["network.transport"] == "tcp"
    assert attrs["server.port"] == 7001
    assert attrs["wirekit.echo.mode"] == "framed"
    assert attrs["wirekit.received_bytes"] == len(b"traced over OTLP") + 4
    assert isinstance(attrs["network.peer.address"], str)
    assert attrs["network.peer.address"]
    assert len(span.trace_id) == 16
    assert len(span.span_id) == 8
