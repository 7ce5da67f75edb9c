"""wirekit_servicekit: what every wirekit service shares at run time.

Settings (:class:`ServiceSettings`), JSON logs (:func:`configure_logging`), metrics and the
health endpoint (:class:`MetricsServer`), tracing from ``OTEL_*`` (:func:`setup_tracing`) and the
server lifecycle (:func:`run`, :class:`ConnectionHub`).
"""

from .app import Build, serve_service, service_main
from .lifecycle import (
    Connection,
    ConnectionHub,
    DatagramListener,
    Listener,
    install_event_loop_policy,
    run,
)
from .logs import TraceContextFilter, configure_logging
from .metrics import ConnectionMetrics, HotCounter, HotHistogram, MetricsServer, new_registry
from .settings import ServiceSettings, SettingsLoadError, load_settings
from .tracing import connection_span, setup_tracing

__all__ = [
    "Build",
    "Connection",
    "ConnectionHub",
    "ConnectionMetrics",
    "DatagramListener",
    "HotCounter",
    "HotHistogram",
    "Listener",
    "MetricsServer",
    "ServiceSettings",
    "SettingsLoadError",
    "TraceContextFilter",
    "configure_logging",
    "connection_span",
    "install_event_loop_policy",
    "load_settings",
    "new_registry",
    "run",
    "serve_service",
    "service_main",
    "setup_tracing",
]
