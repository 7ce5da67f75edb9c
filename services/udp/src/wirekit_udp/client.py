"""``wirekit-udp-client``: send datagrams to a UDP echo and check the answers.

Interactive (stdin is a terminal, no ``--message``): a ``> `` prompt, one datagram per line,
empty lines skipped, ``quit`` ends. ``--message M``: one datagram. Piped stdin: one datagram per
line. Each datagram waits ``--timeout`` seconds for its echo and is sent again up to
``--retries`` times; one that never comes back is reported as lost, never waited for forever.
Exit status: 0 when every datagram came back intact, 1 when any was lost or came back different.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

from wirekit_servicekit.cli import prompt_lines


class UdpEchoClient:
    def __init__(self, host: str, port: int, timeout: float, retries: int) -> None:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        self.sock = socket.socket(info[0], socket.SOCK_DGRAM)
        self.sock.connect(info[4])  # only the server's datagrams are received
        self.sock.settimeout(timeout)
        self.retries = retries
        self.sent = self.lost = 0

    def echo(self, payload: bytes) -> bytes | None:
        """The echo of ``payload``, or None when every try timed out (loss)."""
        for _ in range(1 + self.retries):
            self.sock.send(payload)
            self.sent += 1
            try:
                while True:
                    reply = self.sock.recv(65536)
                    if reply == payload:
                        return reply
                    # A late answer to an earlier try of another payload: ignore it.
            except TimeoutError:
                continue
            except ConnectionRefusedError:  # ICMP port unreachable: nobody listens
                return None
        self.lost += 1
        return None

    def close(self) -> None:
        self.sock.close()


def talk(client: UdpEchoClient, lines: Iterable[str], out: TextIO, prompt: bool) -> int:
    failures = 0
    for text in prompt_lines(lines, out, "> " if prompt else None):
        reply = client.echo(text.encode())
        if reply is None:
            failures += 1
            print("lost: no echo (see --timeout, --retries)", file=sys.stderr)
        else:
            out.write(reply.decode(errors="replace") + "\n")
    return failures


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="wirekit-udp-client", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7200)
    parser.add_argument("--message", "-m", help="send this one datagram")
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds to wait per try")
    parser.add_argument("--retries", type=int, default=2, help="tries after the first")
    args = parser.parse_args(argv)
    client = UdpEchoClient(args.host, args.port, args.timeout, args.retries)
    try:
        if args.message is not None:
            failures = talk(client, [args.message], sys.stdout, prompt=False)
        else:
            failures = talk(client, sys.stdin, sys.stdout, prompt=sys.stdin.isatty())
    except OSError as exc:
        print(f"wirekit-udp-client: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        client.close()
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
