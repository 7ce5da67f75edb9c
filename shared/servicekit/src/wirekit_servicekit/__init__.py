"""wirekit_servicekit: what every wirekit service shares at run time.

Settings (:class:`ServiceSettings`), JSON logs (:func:`configure_logging`), metrics and the
health endpoint (:class:`MetricsServer`), tracing from ``OTEL_*`` (:func:`setup_tracing`) and the
server lifecycle (:func:`run`, :class:`ConnectionHub`).
"""

from .app import Build, serve_service, service_main
from .lifecycle import (
    Background,
    Connection,
    ConnectionHub,
    ConnectionLimits,
    DatagramListener,
    Listener,
    install_event_loop_policy,
    reset,
    reset_when_delivered,
    run,
    unread_bytes,
)
from .logs import TraceContextFilter, configure_logging
from .metrics import ConnectionMetrics, HotCounter, HotHistogram, MetricsServer, new_registry
from .settings import ServiceSettings, SettingsLoadError, TcpServiceSettings, load_settings
from .tracing import connection_span, setup_tracing

__all__ = [
    "Background",
    "Build",
    "Connection",
    "ConnectionHub",
    "ConnectionLimits",
    "ConnectionMetrics",
    "DatagramListener",
    "HotCounter",
    "HotHistogram",
    "Listener",
    "MetricsServer",
    "ServiceSettings",
    "SettingsLoadError",
    "TcpServiceSettings",
    "TraceContextFilter",
    "configure_logging",
    "connection_span",
    "install_event_loop_policy",
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
