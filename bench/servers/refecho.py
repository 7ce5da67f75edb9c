"""Reference echo servers, started and stopped by the bench harness (one per process).

    python refecho.py KIND PORT        KIND: seed | streams | protocol | uvloop | udp-uvloop

Each prints "ready" on stdout once listening on 127.0.0.1:PORT.
"""

from __future__ import annotations

import asyncio
import socket
import socketserver
import sys


class SeedHandler(socketserver.BaseRequestHandler):
    """The seed's design: a thread per connection, recv(1024) / sendall."""

    def handle(self) -> None:
        while data := self.request.recv(1024):
            self.request.sendall(data)


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def streams_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def serve(kind: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    if kind == "streams":
        server = await asyncio.start_server(streams_handler, "127.0.0.1", port, backlog=4096)
    elif kind == "udp-uvloop":
        await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", port))
        server = None
    else:
        server = await loop.create_server(EchoProtocol, "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()
    del server


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "seed":
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        socketserver.ThreadingTCPServer.daemon_threads = True
        socketserver.ThreadingTCPServer.request_queue_size = 4096
        with socketserver.ThreadingTCPServer(("127.0.0.1", port), SeedHandler) as server:
            print("ready", flush=True)
            server.serve_forever()
        return
    if kind in ("uvloop", "udp-uvloop"):
        import uvloop

        uvloop.install()
    asyncio.run(serve(kind, port))


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    main()
