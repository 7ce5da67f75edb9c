"""``wirekit-cmdexec-client``: run commands on a cmdexec server.

    wirekit-cmdexec-client run [options] [--stdin] -- CMD [ARG...]
    wirekit-cmdexec-client shell [options]          # interactive: one command per line

``run`` prints the command's stdout and stderr to the matching local streams as they arrive and
exits with the remote exit code: 128+N when a signal N ended it (like a shell), 124 when the
server's timeout stopped it (like timeout(1)), 255 when the client or server refused or failed
(like ssh). The token comes from --token-file or WIREKIT_CMDEXEC_TOKEN, never from a flag's
value (the command line is readable by every user and lands in shell history); with mutual TLS
and a certificate the server knows as an identity, no token is needed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Sequence
from typing import BinaryIO

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from wirekit_framing import FramingError, encode, recv_frame
from wirekit_servicekit import setup_tracing
from wirekit_servicekit.cli import prompt_lines

from . import __version__
from .messages import Auth, BadMessage, Exec, Exit, Kind, Signal, decode, encode_data, encode_json

#: The client accepts any frame the server sends (STDOUT chunks are 64 KiB).
_MAX_FRAME = 1024 * 1024
EXIT_TIMEOUT = 124
EXIT_FAILURE = 255


class RemoteError(Exception):
    """The server answered ERROR{code, message}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class CmdexecClient:
    """A blocking client for one connection; commands run one after another."""

    def __init__(self, sock: socket.socket, token: str) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()  # the stdin thread and Ctrl-C share the socket
        self._send(encode_json(Kind.AUTH, Auth(token=token)))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> CmdexecClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, payload: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(encode(payload, _MAX_FRAME))

    def signal(self, name: str) -> None:
        self._send(encode_json(Kind.SIGNAL, Signal(name=name)))  # type: ignore[arg-type]

    def run(
        self,
        argv: Sequence[str],
        *,
        on_stdout: Callable[[bytes], object],
        on_stderr: Callable[[bytes], object],
        stdin: BinaryIO | None = None,
        timeout_s: float | None = None,
        traceparent: str | None = None,
        shell: bool = False,
    ) -> Exit:
        self._send(
            encode_json(
                Kind.EXEC,
                Exec(argv=list(argv), timeout_s=timeout_s, stdin=stdin is not None,
                     traceparent=traceparent, shell=shell),
            )
        )  # fmt: skip
        if stdin is not None:
            threading.Thread(target=self._pump_stdin, args=(stdin,), daemon=True).start()
        while True:
            frame = recv_frame(self.sock, _MAX_FRAME)
            if frame is None:
                raise ConnectionError("server closed the connection")
            kind, body = decode(frame)
            if kind is Kind.STDOUT:
                on_stdout(body)
            elif kind is Kind.STDERR:
                on_stderr(body)
            elif kind is Kind.EXIT:
                assert isinstance(body, Exit)
                return body
            elif kind is Kind.ERROR:
                raise RemoteError(body.code, body.message)
            else:
                raise BadMessage(f"unexpected {kind.name} from the server")

    def _pump_stdin(self, source: BinaryIO) -> None:
        try:
            while (
                chunk := source.read1(64 * 1024) if hasattr(source, "read1") else source.read(65536)
            ):
                self._send(encode_data(Kind.STDIN, chunk))
            self._send(bytes((Kind.STDIN_EOF,)))
        except OSError:
            pass  # the run ended and the connection with it


def exit_status(result: Exit) -> int:
    """The local exit status for a remote result, as a shell would report it."""
    if result.timed_out:
        return EXIT_TIMEOUT
    if result.signal is not None:
        try:
            return 128 + signal.Signals[f"SIG{result.signal}"].value
        except KeyError:
            return EXIT_FAILURE
    return result.code if result.code is not None else EXIT_FAILURE


def _write(stream: BinaryIO) -> Callable[[bytes], object]:
    def out(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return out


def connect(args: argparse.Namespace) -> socket.socket:
    sock = socket.create_connection((args.host, args.port), timeout=args.connect_timeout)
    sock.settimeout(None)  # a command may be silent for a long time; the server times it out
    if not (args.tls or args.ca_file):
        return sock
    ctx = ssl.create_default_context(cafile=args.ca_file)
    if args.cert_file:
        ctx.load_cert_chain(args.cert_file, args.key_file)
    return ctx.wrap_socket(sock, server_hostname=args.server_name or args.host)


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            return f.read().strip()
    token = os.environ.get("WIREKIT_CMDEXEC_TOKEN", "")
    if not token and not args.cert_file:
        raise SystemExit(
            "wirekit-cmdexec-client: no token (--token-file or WIREKIT_CMDEXEC_TOKEN; "
            "or a client certificate, --cert-file)"
        )
    return token  # "" with a certificate: the server knows the client by it


def run_one(client: CmdexecClient, argv: Sequence[str], args: argparse.Namespace) -> int:
    """Run one command inside a CLIENT span whose context travels in EXEC.traceparent."""
    tracer = trace.get_tracer("wirekit_cmdexec.client", __version__)
    with tracer.start_as_current_span(
        "cmdexec.client run", kind=trace.SpanKind.CLIENT,
        attributes={"process.executable.name": os.path.basename(argv[0]),
                    "server.address": args.host, "server.port": args.port},
    ) as span:  # fmt: skip
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        try:
            result = client.run(
                argv, on_stdout=_write(sys.stdout.buffer), on_stderr=_write(sys.stderr.buffer),
                stdin=sys.stdin.buffer if args.stdin else None, timeout_s=args.timeout,
                traceparent=carrier.get("traceparent"), shell=args.shell,
            )  # fmt: skip
        except KeyboardInterrupt:
            client.signal("INT")
            raise
        status = exit_status(result)
        span.set_attribute("process.exit.code", status)
        if result.timed_out:
            print(
                f"wirekit-cmdexec-client: timed out after {result.duration_s:.1f}s", file=sys.stderr
            )
        for stream, cut in result.truncated.items():
            if cut:
                print(f"wirekit-cmdexec-client: {stream} truncated by the server", file=sys.stderr)
        return status


def shell(client: CmdexecClient, args: argparse.Namespace) -> int:
    """The seed's loop: a prompt, one command per line, empty lines skipped, `quit` ends."""
    status = 0
    for line in prompt_lines(sys.stdin, sys.stdout, "$ " if sys.stdin.isatty() else None):
        try:
            status = run_one(client, shlex.split(line), args)
        except RemoteError as exc:
            print(f"wirekit-cmdexec-client: {exc}", file=sys.stderr)
            status = EXIT_FAILURE
            if exc.code in ("unauthorized", "timeout", "bad_request", "too_large"):
                return status  # the server closed the connection
    return status


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wirekit-cmdexec-client", description=__doc__.split("\n")[0]
    )
    # No abbreviations: `--token x` must not be taken for `--token-file x`.
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--host", default="127.0.0.1")
    common.add_argument("--port", type=int, default=7100)
    common.add_argument("--token-file", help="file holding the token (else WIREKIT_CMDEXEC_TOKEN)")
    common.add_argument(
        "--timeout", type=float, help="ask the server for at most this many seconds"
    )
    common.add_argument("--connect-timeout", type=float, default=10.0)
    common.add_argument("--tls", action="store_true", help="use TLS (system CAs unless --ca-file)")
    common.add_argument("--ca-file", help="CA bundle to verify the server (implies --tls)")
    common.add_argument("--cert-file", help="client certificate, for mutual TLS")
    common.add_argument("--key-file", help="client key, for mutual TLS")
    common.add_argument("--server-name", help="name to verify in the server certificate")
    sub = parser.add_subparsers(dest="action", required=True)
    run_p = sub.add_parser("run", parents=[common], help="run one command", allow_abbrev=False)
    run_p.add_argument("--stdin", action="store_true", help="forward local stdin to the command")
    run_p.add_argument(
        "--shell", action="store_true", help="one string for /bin/sh -c (server: allow_shell)"
    )
    run_p.add_argument("command", nargs="+", help="the command and its arguments (after --)")
    shell_p = sub.add_parser(
        "shell", parents=[common], help="interactive: one command per line", allow_abbrev=False
    )
    shell_p.set_defaults(stdin=False, shell=False)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    provider = setup_tracing("wirekit-cmdexec-client", __version__)
    trace.set_tracer_provider(provider)
    try:
        with connect(args) as sock:
            client = CmdexecClient(sock, _token(args))
            status = (
                run_one(client, args.command, args) if args.action == "run" else shell(client, args)
            )
    except RemoteError as exc:
        print(f"wirekit-cmdexec-client: {exc}", file=sys.stderr)
        status = EXIT_FAILURE
    except (OSError, FramingError, BadMessage) as exc:
        print(f"wirekit-cmdexec-client: {exc}", file=sys.stderr)
        status = EXIT_FAILURE
    except KeyboardInterrupt:
        status = 130
    finally:
        provider.shutdown()
    raise SystemExit(status)


if __name__ == "__main__":
    main()
