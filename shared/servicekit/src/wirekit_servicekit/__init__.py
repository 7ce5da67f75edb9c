"""wirekit_servicekit: what every wirekit service shares at run time.

Settings (:class:`ServiceSettings`), JSON logs (:func:`configure_logging`), metrics and the
health endpoint (:class:`MetricsServer`), tracing from ``OTEL_*`` (:func:`setup_tracing`) and the
server lifecycle (:func:`run`, :class:`ConnectionHub`).

Imports are lazy (PEP 562): a client that needs only :mod:`wirekit_servicekit.cli` does not load
pydantic, OpenTelemetry and prometheus_client with it, and :mod:`.reload` runs before anything
slow (not even :mod:`typing`, 17 ms to import, is loaded here).
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .app import Build, serve_service, service_main
    from .lifecycle import (
        Background,
        CloseReason,
        Connection,
        ConnectionHub,
        ConnectionLimits,
        DatagramListener,
        Listener,
        Reload,
        event_loop_factory,
        reset,
        reset_when_delivered,
        run,
        unread_bytes,
    )
    from .logs import TraceContextFilter, configure_logging
    from .metrics import ConnectionMetrics, HotCounter, HotHistogram, MetricsServer, new_registry
    from .settings import ServiceSettings, SettingsLoadError, TcpServiceSettings, load_settings
    from .tracing import connection_span, setup_tracing

#: Public name -> the private module that defines it.
_EXPORTS = {
    "Background": "lifecycle",
    "Build": "app",
    "CloseReason": "lifecycle",
    "Connection": "lifecycle",
    "ConnectionHub": "lifecycle",
    "ConnectionLimits": "lifecycle",
    "ConnectionMetrics": "metrics",
    "DatagramListener": "lifecycle",
    "HotCounter": "metrics",
    "HotHistogram": "metrics",
    "Listener": "lifecycle",
    "MetricsServer": "metrics",
    "Reload": "lifecycle",
    "ServiceSettings": "settings",
    "SettingsLoadError": "settings",
    "TcpServiceSettings": "settings",
    "TraceContextFilter": "logs",
    "configure_logging": "logs",
    "connection_span": "tracing",
    "event_loop_factory": "lifecycle",
    "load_settings": "settings",
    "new_registry": "metrics",
    "reset": "lifecycle",
    "reset_when_delivered": "lifecycle",
    "run": "lifecycle",
    "serve_service": "app",
    "service_main": "app",
    "setup_tracing": "tracing",
    "unread_bytes": "lifecycle",
}

__all__ = [
    "Background",
    "Build",
    "CloseReason",
    "Connection",
    "ConnectionHub",
    "ConnectionLimits",
    "ConnectionMetrics",
    "DatagramListener",
    "HotCounter",
    "HotHistogram",
    "Listener",
    "MetricsServer",
    "Reload",
    "ServiceSettings",
    "SettingsLoadError",
    "TcpServiceSettings",
    "TraceContextFilter",
    "configure_logging",
    "connection_span",
    "event_loop_factory",
    "load_settings",
    "new_registry",
    "reset",
    "reset_when_delivered",
    "run",
    "serve_service",
    "service_main",
    "setup_tracing",
    "unread_bytes",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once
    return value
