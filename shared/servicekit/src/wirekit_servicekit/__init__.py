"""wirekit_servicekit: what every wirekit service shares at run time.

A service declares itself once (:class:`Service`: name, settings, refusals, ``build``) and gets
the rest: settings from flags, environment and secrets (:class:`ServiceSettings`), JSON logs,
metrics and the health endpoint (:class:`MetricsServer`), tracing from ``OTEL_*``, the
lifecycle (:func:`run`: listen, drain, exit), connection limits (:class:`ConnectionHub`) and
workers under a supervisor (``--workers``).

Imports are lazy (PEP 562): a client that needs only :mod:`wirekit_servicekit.cli` does not load
pydantic, OpenTelemetry and prometheus_client with it, and :mod:`.reload` runs before anything
slow (not even :mod:`typing`, 17 ms to import, is loaded here).
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .hub import CloseReason, Connection, ConnectionHub, ConnectionLimits, source_key
    from .lifecycle import run
    from .logs import TraceContextFilter, configure_logging
    from .loops import event_loop_factory
    from .metrics import ConnectionMetrics, HotCounter, HotHistogram, MetricsServer, new_registry
    from .parts import Background, DatagramListener, HttpRoute, Listener, Part, Reload
    from .proxy import Peer
    from .service import Runtime, Service
    from .settings import ServiceSettings, SettingsLoadError, TcpServiceSettings, load_settings
    from .sockets import reset, reset_when_delivered, unread_bytes
    from .tracing import connection_span, setup_tracing
    from .worker import Worker

#: Public name -> the private module that defines it.
_EXPORTS = {
    "Background": "parts",
    "HttpRoute": "parts",
    "CloseReason": "hub",
    "Connection": "hub",
    "ConnectionHub": "hub",
    "ConnectionLimits": "hub",
    "ConnectionMetrics": "metrics",
    "DatagramListener": "parts",
    "HotCounter": "metrics",
    "HotHistogram": "metrics",
    "Listener": "parts",
    "MetricsServer": "metrics",
    "Part": "parts",
    "Peer": "proxy",
    "Reload": "parts",
    "Runtime": "service",
    "Service": "service",
    "ServiceSettings": "settings",
    "SettingsLoadError": "settings",
    "TcpServiceSettings": "settings",
    "TraceContextFilter": "logs",
    "Worker": "worker",
    "configure_logging": "logs",
    "connection_span": "tracing",
    "event_loop_factory": "loops",
    "load_settings": "settings",
    "new_registry": "metrics",
    "reset": "sockets",
    "reset_when_delivered": "sockets",
    "run": "lifecycle",
    "setup_tracing": "tracing",
    "source_key": "hub",
    "unread_bytes": "sockets",
}

__all__ = [
    "Background",
    "CloseReason",
    "Connection",
    "ConnectionHub",
    "ConnectionLimits",
    "ConnectionMetrics",
    "DatagramListener",
    "HotCounter",
    "HotHistogram",
    "HttpRoute",
    "Listener",
    "MetricsServer",
    "Part",
    "Peer",
    "Reload",
    "Runtime",
    "Service",
    "ServiceSettings",
    "SettingsLoadError",
    "TcpServiceSettings",
    "TraceContextFilter",
    "Worker",
    "configure_logging",
    "connection_span",
    "event_loop_factory",
    "load_settings",
    "new_registry",
    "reset",
    "reset_when_delivered",
    "run",
    "setup_tracing",
    "source_key",
    "unread_bytes",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once
    return value
