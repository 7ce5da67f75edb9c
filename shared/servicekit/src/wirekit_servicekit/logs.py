"""JSON logs: one object per line on stderr, with trace and span ids when inside a span."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

__all__ = ["TraceContextFilter", "configure_logging", "json_formatter"]

_FIELDS = "%(levelname)s %(name)s %(message)s"


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` / ``span_id`` (hex, as in W3C traceparent) from the current span."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        return True


def json_formatter(service: str, worker: int | None = None) -> JsonFormatter:
    """One JSON object per record: time (ISO 8601, UTC), level, logger, message, the service
    (and worker index), and every ``extra`` field."""
    static: dict[str, object] = {"service": service}
    if worker is not None:
        static["worker"] = worker
    return JsonFormatter(
        _FIELDS,
        rename_fields={"levelname": "level", "name": "logger"},
        static_fields=static,
        timestamp="time",
    )


def configure_logging(
    level: str, service: str, stream: TextIO | None = None, worker: int | None = None
) -> None:
    """Route the root logger to ``stream`` (stderr) as JSON lines, replacing earlier handlers.
    A worker process (``--workers``) adds its index to every line."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(json_formatter(service, worker))
    handler.addFilter(TraceContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
