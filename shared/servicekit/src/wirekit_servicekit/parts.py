"""What a service's ``build`` returns: its listeners, background tasks and reload handler."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from .hub import ConnectionHub

__all__ = ["Background", "DatagramListener", "HttpRoute", "Listener", "Part", "Reload"]


@dataclass(frozen=True)
class Listener:
    """One TCP listener: ``factory`` builds a protocol for each connection accepted."""

    name: str
    host: str
    port: int
    factory: Callable[[], asyncio.BaseProtocol]
    hub: ConnectionHub
    ssl: ssl.SSLContext | None = None
    #: The protocol starts TLS itself once connected (cmdexec): behind a PROXY header, reading
    #: stays paused after the header until it does (``start_tls`` resumes it) or resumes it
    #: itself -- so a ClientHello that came with the header is read by TLS, not before it.
    tls_later: bool = False


@dataclass(frozen=True)
class Background:
    """A task the service runs beside its listeners (a periodic sweep, a reporter): started
    once the listeners are bound, cancelled and awaited at shutdown. Its failure is logged."""

    name: str
    factory: Callable[[], Coroutine[Any, Any, None]]


#: How a service opens a datagram endpoint of its own: (factory, host, port, reuse_port).
OpenDatagram = Callable[
    [Callable[[], asyncio.DatagramProtocol], str, int, bool], Awaitable[asyncio.BaseTransport]
]


@dataclass(frozen=True)
class DatagramListener:
    """One UDP endpoint: ``factory`` builds its DatagramProtocol. Stateless: nothing to drain.
    ``open`` replaces asyncio's endpoint when the service needs its own (udp: answers from the
    arrival address on a wildcard bind)."""

    name: str
    host: str
    port: int
    factory: Callable[[], asyncio.DatagramProtocol]
    open: OpenDatagram | None = None


@dataclass(frozen=True)
class Reload:
    """What a service that reloads does on SIGHUP. Installed before the listeners are bound; a
    SIGHUP that came earlier (held from the process's start, see :mod:`.reload`) is taken
    then, so the service is ready with the newest configuration."""

    callback: Callable[[], object]


@dataclass(frozen=True)
class HttpRoute:
    """One more path on the metrics port (the prober's ``/probe``). ``handler`` runs in the
    metrics server's thread with the query string's parameters and answers (status, content
    type, body); a handler that needs the event loop hands its work over with
    ``asyncio.run_coroutine_threadsafe`` and waits with a deadline."""

    path: str
    handler: Callable[[dict[str, list[str]]], tuple[int, str, bytes]]


Part = Listener | DatagramListener | Background | Reload | HttpRoute
