"""Tracing from the standard ``OTEL_*`` variables, and the per-connection span helper.

``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` name the service (default: the service's own
name); ``OTEL_TRACES_SAMPLER`` / ``_ARG`` choose sampling (read by the SDK);
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` turn on OTLP/HTTP export
(with ``_HEADERS``, ``_TIMEOUT``, ... read by the exporter). With no endpoint, or with
``OTEL_TRACES_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true``, spans are not exported and nothing
is logged as an error. Export runs in the SDK's batch thread; its failures are logged by the SDK
and never reach request handling.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.util.types import AttributeValue

from .proxy import Peer

__all__ = ["connection_span", "setup_tracing"]

log = logging.getLogger(__name__)

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def setup_tracing(
    service_name: str, version: str, environ: Mapping[str, str] | None = None
) -> TracerProvider:
    """A tracer provider for the service, exporting over OTLP/HTTP only when configured."""
    env = os.environ if environ is None else environ
    attributes: dict[str, AttributeValue] = {"service.version": version}
    if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes["service.name"] = service_name
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter_choice = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    endpoint = next((env[v] for v in _ENDPOINT_VARS if env.get(v)), None)
    if endpoint and exporter_choice == "otlp" and not disabled:
        # Imported only when used: the exporter pulls in protobuf and requests.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("tracing: exporting spans over OTLP/HTTP", extra={"otlp_endpoint": endpoint})
    elif endpoint and exporter_choice not in ("otlp", "none"):
        log.warning(
            "tracing: OTEL_TRACES_EXPORTER=%s is not supported; spans are not exported",
            exporter_choice,
        )
    return provider


def connection_span(
    tracer: trace.Tracer,
    name: str,
    peer: Peer,
    sockname: object,
    attributes: Mapping[str, AttributeValue] | None = None,
    start_time: int | None = None,
) -> trace.Span:
    """Start a SERVER span for one TCP connection, with OTel network attributes: the client
    (``client.*``) and the socket's peer (``network.peer.*``: the proxy behind the PROXY
    protocol, else the client too).

    ``start_time`` (ns since the epoch) lets a protocol create the span late, when it first
    needs it, yet time it from the connection's start: a recording span costs ~3 KB, which an
    idle connection need not hold."""
    socket_peer = peer.proxy or (peer.address, peer.port)
    attrs: dict[str, AttributeValue] = {
        "network.transport": "tcp",
        "client.address": peer.address,
        "client.port": peer.port,
        "network.peer.address": socket_peer[0],
        "network.peer.port": socket_peer[1],
        "network.type": "ipv6" if ":" in socket_peer[0] else "ipv4",
    }
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        attrs["server.address"] = str(sockname[0])
        attrs["server.port"] = int(sockname[1])
    if attributes:
        attrs.update(attributes)
    return tracer.start_span(
        name, kind=trace.SpanKind.SERVER, attributes=attrs, start_time=start_time
    )
