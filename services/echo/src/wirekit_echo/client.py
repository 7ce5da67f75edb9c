"""``wirekit-echo-client``: talk to an echo server, interactively or one-shot, in either mode.

Interactive (stdin is a terminal, no ``--message``): a ``> `` prompt; each line is sent and its
echo printed; empty lines are skipped; ``quit`` (or end of input) ends. One-shot: ``--message M``
sends M once and prints the echo; otherwise stdin is piped: raw mode streams it byte-exact to
the server and the echo to stdout (like ``nc -N``), framed mode sends each line as one frame and
prints each reply as a line. Exit status: 0 when every echo matched, 1 on a network error or a
mismatch, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Iterable, Sequence
from typing import BinaryIO, TextIO

from wirekit_framing import DEFAULT_MAX_FRAME_SIZE, FramingError, recv_frame, send_frame
from wirekit_servicekit.cli import prompt_lines

DEFAULT_PORTS = {"raw": 7000, "framed": 7001}
_CHUNK = 64 * 1024


class EchoMismatch(Exception):
    """The server's reply differs from what was sent."""


class EchoClient:
    """A blocking client for one connection; ``echo(payload)`` returns the reply."""

    def __init__(self, sock: socket.socket, mode: str, max_frame_size: int) -> None:
        self.sock = sock
        self.mode = mode
        self.max_frame_size = max_frame_size

    def echo(self, payload: bytes) -> bytes:
        if self.mode == "framed":
            send_frame(self.sock, payload, self.max_frame_size)
            reply = recv_frame(self.sock, self.max_frame_size)
            if reply is None:
                raise ConnectionError("server closed the connection")
        else:
            self.sock.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                chunk = self.sock.recv(min(_CHUNK, len(payload) - len(got)))
                if not chunk:
                    raise ConnectionError("server closed the connection")
                got += chunk
            reply = bytes(got)
        if reply != payload:
            raise EchoMismatch(f"sent {len(payload)} bytes, got back {len(reply)} different bytes")
        return reply


def stream_raw(sock: socket.socket, source: BinaryIO, sink: BinaryIO) -> None:
    """Send all of ``source``, half-close, copy the echo to ``sink`` until the server closes."""
    sent = received = 0
    while chunk := source.read(_CHUNK):
        sock.sendall(chunk)
        sent += len(chunk)
        # Read what is back so far, so neither side's buffers fill up.
        while received < sent:
            back = sock.recv(_CHUNK)
            if not back:
                raise ConnectionError("server closed the connection early")
            sink.write(back)
            received += len(back)
    sock.shutdown(socket.SHUT_WR)
    while back := sock.recv(_CHUNK):
        sink.write(back)
    sink.flush()


def interactive(client: EchoClient, lines: Iterable[str], out: TextIO, prompt: bool) -> None:
    """The seed's loop: send each non-empty line, print its echo; ``quit`` ends."""
    suffix = b"\n" if client.mode == "raw" else b""
    for text in prompt_lines(lines, out, "> " if prompt else None):
        reply = client.echo(text.encode() + suffix)
        out.write(reply.decode(errors="replace").rstrip("\n") + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wirekit-echo-client", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="server address (default: %(default)s)")
    parser.add_argument("--port", type=int, help="server port (default: 7000 raw, 7001 framed)")
    parser.add_argument("--mode", choices=("raw", "framed"), default="raw")
    parser.add_argument("--message", "-m", help="send this once, print the echo, exit")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per network step")
    parser.add_argument("--max-frame-size", type=int, default=DEFAULT_MAX_FRAME_SIZE)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    port = args.port if args.port is not None else DEFAULT_PORTS[args.mode]
    try:
        with socket.create_connection((args.host, port), timeout=args.timeout) as sock:
            client = EchoClient(sock, args.mode, args.max_frame_size)
            if args.message is not None:
                sys.stdout.write(client.echo(args.message.encode()).decode(errors="replace"))
                sys.stdout.write("" if args.message.endswith("\n") else "\n")
            elif args.mode == "raw" and not sys.stdin.isatty():
                stream_raw(sock, sys.stdin.buffer, sys.stdout.buffer)
            else:
                interactive(client, sys.stdin, sys.stdout, prompt=sys.stdin.isatty())
    except (OSError, FramingError, EchoMismatch) as exc:
        print(f"wirekit-echo-client: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
