"""What the kernel does with the service's socket: buffer sizes asked and granted, and the
datagrams it dropped before the service could read them (a full receive buffer), read from
``/proc/net/udp`` at scrape time -- nothing on the datagram path."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Mapping
from typing import ClassVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Linux: set a buffer size beyond net.core.{r,w}mem_max (needs CAP_NET_ADMIN); absent from
# Python's socket module.
_SO_SNDBUFFORCE = 32
_SO_RCVBUFFORCE = 33
#: The tables of the process's network namespace ("drops" is their last column).
_TABLES = ("/proc/self/net/udp", "/proc/self/net/udp6")


def size_buffers(sock: socket.socket, receive: int, send: int) -> tuple[int, int]:
    """Ask for ``receive``/``send`` buffer sizes (beyond the system caps when the process may),
    log what was granted, return the sizes the kernel reports (it doubles what it grants, for
    its bookkeeping)."""
    granted = []
    for force, plain, asked, cap in (
        (_SO_RCVBUFFORCE, socket.SO_RCVBUF, receive, "net.core.rmem_max"),
        (_SO_SNDBUFFORCE, socket.SO_SNDBUF, send, "net.core.wmem_max"),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, asked)
        except OSError:  # no CAP_NET_ADMIN (the images drop every capability)
            sock.setsockopt(socket.SOL_SOCKET, plain, asked)
        got = sock.getsockopt(socket.SOL_SOCKET, plain)
        granted.append(got)
        fields = {"option": "SO_RCVBUF" if plain == socket.SO_RCVBUF else "SO_SNDBUF",
                  "asked_bytes": asked, "granted_bytes": got // 2}  # fmt: skip
        if got // 2 < asked:
            log.warning(f"socket buffer smaller than asked: raise {cap}", extra=fields)
        else:
            log.info("socket buffer", extra=fields)
    return granted[0], granted[1]


def kernel_drops(inode: int, tables: tuple[str, ...] = _TABLES) -> int | None:
    """The ``drops`` count of the UDP socket with this inode; None when it is not listed."""
    wanted = str(inode)
    for table in tables:
        try:
            with open(table) as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split()
                    if len(fields) > 12 and fields[9] == wanted:
                        return int(fields[-1])
        except OSError:
            continue
    return None


class SocketStats(Collector):
    """``udp_socket_drops_total`` and the buffer sizes, for the sockets attached so far."""

    #: With workers, each has its own socket of the same size: the instance shows that size.
    gauge_modes: ClassVar[Mapping[str, str]] = {
        "udp_socket_receive_buffer_bytes": "max",
        "udp_socket_send_buffer_bytes": "max",
    }

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sockets: list[tuple[int, int, int]] = []  # (inode, receive, send)
        registry.register(self)

    def attach(self, sock: socket.socket, receive: int, send: int) -> None:
        granted = size_buffers(sock, receive, send)
        self.sockets.append((os.fstat(sock.fileno()).st_ino, *granted))

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        drops = CounterMetricFamily(
            "udp_socket_drops",
            "Datagrams the kernel dropped before the service read them (receive buffer full), "
            "from /proc/net/udp.",
        )
        receive = GaugeMetricFamily(
            "udp_socket_receive_buffer_bytes", "Receive buffer the kernel granted (SO_RCVBUF)."
        )
        send = GaugeMetricFamily(
            "udp_socket_send_buffer_bytes", "Send buffer the kernel granted (SO_SNDBUF)."
        )
        total = 0
        for inode, rcv, snd in list(self.sockets):
            total += kernel_drops(inode) or 0
            receive.add_metric([], rcv)
            send.add_metric([], snd)
        drops.add_metric([], total)
        yield drops
        if self.sockets:
            yield receive
            yield send

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield CounterMetricFamily("udp_socket_drops", "")
