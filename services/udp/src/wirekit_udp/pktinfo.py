"""Answers leave from the address that was asked, on a wildcard bind.

Bound to ``0.0.0.0`` or ``::`` on a host with several addresses, a UDP socket's answers leave
from whatever address the routing table picks -- not necessarily the one the client sent to,
and a client that ``connect()``-ed its socket to that address then never sees the answer
(kubernetes/kubernetes#95565, #98883). This endpoint reads each datagram with ``recvmsg`` and
the destination address the kernel reports (``IP_PKTINFO``, ``IPV6_RECVPKTINFO``) and answers
with ``sendmsg`` from that address. It stands in for asyncio's datagram transport (which has no
ancillary data) on wildcard binds only; a service bound to one address needs none of it.

Reads are batched: one readiness callback takes up to ``BATCH`` datagrams. A send the kernel
cannot take at once (a full send buffer) is reported to the protocol as an error, not queued:
UDP answers are not retried.

The C build (``_hot.DatagramIO``) reads and answers for every bind, wildcard or not, in place of
both this transport and asyncio's (uvloop's): ``recvmmsg`` in batches, each answer sent at
once, source addresses made into tuples once, ``datagram_received`` called in C -- see
``_hot.c``.
:class:`CTransport` is its transport.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

from . import _hot

__all__ = ["WILDCARDS", "CTransport", "PktinfoTransport", "open_pktinfo_endpoint"]

WILDCARDS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 -- the binds this is for
#: Linux's values where Python does not name them.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IN_PKTINFO = struct.Struct("@i4s4s")  # ipi_ifindex, ipi_spec_dst, ipi_addr
_IN6_PKTINFO = struct.Struct("@16sI")  # ipi6_addr, ipi6_ifindex
#: Datagrams taken per readiness callback before the loop gets its turn back.
BATCH = 64
#: Local addresses (with their interface) whose answers' ancillary data is kept, worked out.
REPLIES = 64
_ANCILLARY = socket.CMSG_SPACE(_IN6_PKTINFO.size) + socket.CMSG_SPACE(_IN_PKTINFO.size)
_NO_IFINDEX = b"\0\0\0\0"


def _reply_from(ancillary: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that makes an answer leave from the datagram's destination."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
            _, _, dst = _IN_PKTINFO.unpack_from(data)
            return [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, dst, _NO_IFINDEX))]
        if (
            level == socket.IPPROTO_IPV6
            and kind == socket.IPV6_PKTINFO
            and len(data) >= _IN6_PKTINFO.size
        ):
            dst, _ = _IN6_PKTINFO.unpack_from(data)
            return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(dst, 0))]
    return []


class _SocketTransport(asyncio.DatagramTransport):
    """A datagram transport on the loop's ``add_reader``: the socket, its closing."""

    #: Empty datagrams go out as they are (asyncio's transport skips them).
    sends_empty = True

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
        protocol: asyncio.DatagramProtocol,
    ) -> None:  # fmt: skip
        super().__init__({"socket": sock, "sockname": sock.getsockname()})
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._closing = False

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0


class CTransport(_SocketTransport):
    """The C build's transport, for every bind: ``_hot.DatagramIO`` reads, hands over and
    answers (from the arrival address when ``pktinfo``, a wildcard bind).

    Where it differs from asyncio's datagram transport (none of which UdpEcho uses):
    ``sendto`` takes numeric addresses only (no names, no ``"<broadcast>"``; a ValueError, not an
    OSError to ``error_received``) and always an address (the socket is not connected); a send
    the kernel cannot take at once (a full buffer) is reported to ``error_received``, not
    queued; a datagram over ``max_size`` reaches a protocol that is a ``Core`` as an oversize
    drop of its real length, any other protocol cut to ``max_size + 1`` bytes. The socket must
    be closed through :meth:`close`.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
        protocol: asyncio.DatagramProtocol, max_size: int, pktinfo: bool,
    ) -> None:  # fmt: skip
        super().__init__(loop, sock, protocol)
        # one byte more than the largest datagram: an oversize datagram is seen as oversize
        self._io = _hot.DatagramIO(sock, protocol, max_size + 1, pktinfo)
        self.sendto = self._io.sendto  # type: ignore[method-assign]  # C's: no Python frame
        loop.add_reader(sock.fileno(), self._io.read)

    def sendto(self, data: Any, addr: Any = None) -> None:  # replaced per instance (above)
        self._io.sendto(data, addr)

    def close(self) -> None:
        try:
            self._io.close()  # the answers already given are sent first
        finally:
            super().close()


class PktinfoTransport(_SocketTransport):
    """The datagram transport of a wildcard bind: ``sendto`` during ``datagram_received``
    answers from the address that datagram was sent to."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
        protocol: asyncio.DatagramProtocol, max_size: int,
    ) -> None:  # fmt: skip
        super().__init__(loop, sock, protocol)
        self._size = max_size + 1  # one byte more: an oversize datagram is seen as oversize
        self._reply: list[tuple[int, int, bytes]] = []
        self._replies: dict[tuple[int, int, bytes], list[tuple[int, int, bytes]]] = {}
        loop.add_reader(sock.fileno(), self._read)

    def _read(self) -> None:
        sock, protocol, replies = self._sock, self._protocol, self._replies
        for _ in range(BATCH):
            try:
                data, ancillary, _, addr = sock.recvmsg(self._size, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for an earlier answer
                protocol.error_received(exc)
                return
            # One control message (the usual case) names the local address: its answer's
            # ancillary data is worked out once per local address, not per datagram.
            if len(ancillary) == 1:
                reply = replies.get(ancillary[0])
                if reply is None:
                    reply = _reply_from(ancillary)
                    if len(replies) < REPLIES:
                        replies[ancillary[0]] = reply
            else:
                reply = _reply_from(ancillary)
            self._reply = reply
            protocol.datagram_received(data, addr)
            if self._closing:
                return

    def sendto(self, data: Any, addr: Any = None) -> None:
        try:
            self._sock.sendmsg([data], self._reply, 0, addr)
        except OSError as exc:  # a full send buffer, an unreachable address: not retried
            self._protocol.error_received(exc)


def pktinfo_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A non-blocking UDP socket bound to a wildcard address, reporting each datagram's
    destination (``::`` is dual-stack: IPv4 datagrams arrive IPv4-mapped)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)  # IPv4 (and IPv4-mapped) datagrams
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host or "0.0.0.0", port))  # noqa: S104 -- asked for
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def bound_socket(
    loop: asyncio.AbstractEventLoop, host: str, port: int, reuse_port: bool
) -> socket.socket:
    """A non-blocking UDP socket bound to ``host`` (a name is resolved, its addresses tried in
    turn), as asyncio's ``create_datagram_endpoint(local_addr=...)`` binds one."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        sock = socket.socket(family, kind, proto)
        try:
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error if error is not None else OSError(f"no IPv4 or IPv6 address for {host!r}")


def open_pktinfo_endpoint(
    max_size: int,
) -> Callable[[Callable[[], asyncio.DatagramProtocol], str, int, bool], Any]:
    """The ``open`` of a :class:`~wirekit_servicekit.DatagramListener` that answers from the
    arrival address when bound to a wildcard (and is asyncio's own endpoint otherwise)."""

    async def open_endpoint(
        factory: Callable[[], asyncio.DatagramProtocol], host: str, port: int, shared: bool
    ) -> asyncio.BaseTransport:
        loop = asyncio.get_running_loop()
        wildcard = host in WILDCARDS
        if getattr(_hot, "DatagramIO", None) is not None:  # the C build on Linux: every bind
            sock = (pktinfo_socket(host, port, shared) if wildcard
                    else await bound_socket(loop, host, port, shared))  # fmt: skip
            try:
                protocol = factory()
                fast = CTransport(loop, sock, protocol, max_size, wildcard)
            except BaseException:
                sock.close()
                raise
            protocol.connection_made(fast)
            return fast
        if not wildcard:
            transport, _ = await loop.create_datagram_endpoint(
                factory, local_addr=(host, port), reuse_port=shared
            )
            return transport
        protocol = factory()
        transport = PktinfoTransport(loop, pktinfo_socket(host, port, shared), protocol, max_size)
        protocol.connection_made(transport)
        return transport

    return open_endpoint
