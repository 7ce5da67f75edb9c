"""Debian's HAProxy in front of echo and cmdexec, as real processes: the PROXY protocol (v1, v2)
makes the client's own address the one that per-source limits, the login limiter, identities'
``sources`` and the audit trail see; HAProxy's health checks are not clients; a header from an
address outside ``proxy_trusted`` is refused.

Every client binds its own source address in 127.0.0.0/8 (all of it is routed to lo): that
address, and the port the kernel gave it, are the ground truth the service must report.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
from wirekit_testkit import ServiceProcess, free_port, service_process, wait_until

from wirekit_cmdexec.client import CmdexecClient, RemoteError
from wirekit_cmdexec.tokens import hash_token
from wirekit_framing import FramingError, encode, encode_proxy_v2, recv_frame

Mode = Literal["off", "v1", "v2"]
#: The backend's server line per mode (v1 checks need check-send-proxy to send the line too).
SERVER_OPTIONS: dict[Mode, str] = {
    "off": "",
    "v1": "send-proxy check-send-proxy",
    "v2": "send-proxy-v2",
}
#: HAProxy reaches the services from here: the only trusted proxy.
TRUSTED = json.dumps(["127.0.0.1/32"])
#: How long a batch of client connections may take, start to end.
BATCH_S = 30.0
OPS = "ops-Vq3Kx9TzL2mWc8RbN4pYs7HdJ6fGa1Ue"
DEV = "dev-hT5nR2wQ8zK4vB7mX1cL9pS3dF6gJ0yA"


# -- HAProxy ------------------------------------------------------------------------------------
def haproxy_binary() -> str:
    """Debian's haproxy (in /usr/sbin, which a user's PATH may lack): a skip on a laptop
    without it, a failure in CI (.ci/check installs it)."""
    path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is missing: .ci/check installs Debian's haproxy package")
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy)")
    return path


def listening(port: int) -> bool:
    """Something listens on 127.0.0.1:``port`` (read from /proc: a test connection through a
    frontend would reach the service and be counted as a client)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(
            fields[1] == local and fields[3] == "0A"  # 0A: LISTEN
            for fields in (line.split() for line in f.readlines()[1:])
        )


@contextlib.contextmanager
def run_haproxy(
    binary: str, directory: Path, backend_port: int, mode: Mode, *, check: bool = True
) -> Iterator[int]:
    """``haproxy -db -f CFG`` with one TCP frontend on 127.0.0.1 whose one server is the
    service on ``backend_port``; yields the frontend's port once it listens; stopped by PID."""
    port = free_port()
    checks = " check inter 300ms" if check else ""
    config = directory / f"haproxy-{port}.cfg"
    config.write_text(
        textwrap.dedent(f"""\
            global
                maxconn 4000
            defaults
                mode tcp
                timeout connect 5s
                timeout client 30s
                timeout server 30s
            frontend front
                bind 127.0.0.1:{port}
                default_backend service
            backend service
                server s 127.0.0.1:{backend_port} {SERVER_OPTIONS[mode]}{checks}
        """)
    )
    log_path = directory / f"haproxy-{port}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log,
                                 stderr=subprocess.STDOUT)  # fmt: skip
    try:

        def up() -> bool:
            assert popen.poll() is None, f"haproxy exited: {log_path.read_text()}"
            return listening(port)

        wait_until(up, 10, f"haproxy listening on 127.0.0.1:{port}")
        yield port
        assert popen.poll() is None, f"haproxy died during the test: {log_path.read_text()}"
    finally:
        popen.terminate()
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(10)


HAProxy = Callable[..., int]


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[HAProxy]:
    """``haproxy(backend_port, mode, check=True)`` starts one; all are stopped at the end."""
    binary = haproxy_binary()
    with contextlib.ExitStack() as stack:

        def start(backend_port: int, mode: Mode, *, check: bool = True) -> int:
            return stack.enter_context(
                run_haproxy(binary, tmp_path, backend_port, mode, check=check)
            )

        yield start


# -- the services -------------------------------------------------------------------------------
@contextlib.contextmanager
def echo(mode: Mode, *args: str) -> Iterator[ServiceProcess]:
    """The framed echo service as a process; ``mode`` is its proxy_protocol."""
    env: dict[str, str] = {"WIREKIT_ECHO_PROXY_PROTOCOL": mode}
    if mode != "off":
        env["WIREKIT_ECHO_PROXY_TRUSTED"] = TRUSTED
    with service_process("wirekit_echo", "--mode", "framed", "--framed-port", "0",
                         "--metrics-port", "0", *args, env=env) as proc:  # fmt: skip
        yield proc
        proc.assert_clean_log()


def headers(proc: ServiceProcess, result: str, prefix: str = "echo") -> float:
    labels = {"mode": "framed"} if prefix == "echo" else {}
    return proc.value(f"{prefix}_proxy_headers_total", **labels, result=result)


def opened(proc: ServiceProcess) -> float:
    return proc.value("echo_connections_opened_total", mode="framed")


def rejected(proc: ServiceProcess, reason: str) -> float:
    return proc.value("echo_connections_rejected_total", mode="framed", reason=reason)


def connect_from(address: str, port: int, timeout_s: float = 10.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from ``address`` (any port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.bind((address, 0))
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def echo_clients(port: int, clients: Sequence[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    """Open every connection (``count`` from each ``address``) at once, then exchange one
    frame on each, then close them all: (served, refused) per address. Served: the frame came
    back; refused: the connection ended without it."""
    socks: list[tuple[str, socket.socket]] = []
    deadline = time.monotonic() + BATCH_S
    try:
        for address, count in clients:
            for _ in range(count):
                socks.append((address, connect_from(address, port)))
        payloads = [f"{address} #{i}".encode() for i, (address, _) in enumerate(socks)]
        sent = []
        for (_, sock), payload in zip(socks, payloads, strict=True):
            try:
                sock.sendall(encode(payload))
                sent.append(True)
            except ConnectionError:  # refused before our frame went out
                sent.append(False)
        tally: dict[str, list[int]] = {address: [0, 0] for address, _ in clients}
        for (address, sock), payload, ok in zip(socks, payloads, sent, strict=True):
            reply = None
            if ok:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    reply = recv_frame(sock)
                except (ConnectionError, FramingError):
                    reply = None
                # A timeout propagates: a connection neither served nor closed is a failure.
            if reply is not None:
                assert reply == payload, (address, reply, payload)
            tally[address][0 if reply is not None else 1] += 1
        return {address: (served, refused) for address, (served, refused) in tally.items()}
    finally:
        for _, sock in socks:
            sock.close()


def totals(tally: dict[str, tuple[int, int]]) -> tuple[int, int]:
    return sum(s for s, _ in tally.values()), sum(r for _, r in tally.values())


FOUR = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")


# -- 1. before and after ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "served", "refused"),
    [
        pytest.param("off", 64, 56, id="before-no-proxy-protocol"),
        pytest.param("v2", 120, 0, id="after-send-proxy-v2"),
        pytest.param("v1", 120, 0, id="after-send-proxy-v1"),
    ],
)
def test_120_clients_from_4_addresses_through_haproxy(
    haproxy: HAProxy, capsys: pytest.CaptureFixture[str], mode: Mode, served: int, refused: int
) -> None:
    """Without the PROXY protocol every client is HAProxy's 127.0.0.1, and the default
    limit_connections_per_source (64) refuses the rest; with it, each client is its own
    source and all are served."""
    with echo(mode) as proc:
        # No health checks without the PROXY protocol: a TCP check is a connection from
        # 127.0.0.1 and could take one of the 64 slots for a moment.
        front = haproxy(proc.ports["framed"], mode, check=mode != "off")
        tally = echo_clients(front, [(address, 30) for address in FOUR])
        got_served, got_refused = totals(tally)
        wait_until(lambda: rejected(proc, "per_source") >= got_refused, 5, "rejections counted")
        per_source = rejected(proc, "per_source")
        with capsys.disabled():
            print(f"\n[haproxy, proxy_protocol={mode}] 120 clients from 4 addresses: "
                  f"{got_served} served / {got_refused} refused; "
                  f"echo_connections_rejected_total{{reason=per_source}} = {per_source:g}; "
                  f"per address (served, refused): {tally}")  # fmt: skip
        assert (got_served, got_refused) == (served, refused), tally
        assert per_source == refused
        assert rejected(proc, "limit") == 0
        if mode == "v2":  # v2 health checks are LOCAL: only the clients are connections
            assert opened(proc) == 120
            assert headers(proc, "accepted") == 120
        if mode != "off":
            assert all(v == (30, 0) for v in tally.values()), tally
            assert headers(proc, "untrusted") == 0


# -- 2. per-source limits key on the client -----------------------------------------------------
def test_200_clients_from_4_addresses_are_all_served_with_the_defaults(haproxy: HAProxy) -> None:
    with echo("v2") as proc:
        front = haproxy(proc.ports["framed"], "v2")
        tally = echo_clients(front, [(address, 50) for address in FOUR])
        assert tally == {address: (50, 0) for address in FOUR}
        assert rejected(proc, "per_source") == 0
        assert opened(proc) == 200


def test_the_per_source_limit_counts_the_client_behind_haproxy(haproxy: HAProxy) -> None:
    """limit_connections_per_source=10: 11 from 127.0.0.5 -> 10 served; 10 from 127.0.0.6 at
    the same time -> all served (HAProxy's own address would have refused 11 of the 21)."""
    with echo("v2", "--limit-connections-per-source", "10") as proc:
        front = haproxy(proc.ports["framed"], "v2")
        tally = echo_clients(front, [("127.0.0.5", 11), ("127.0.0.6", 10)])
        assert tally == {"127.0.0.5": (10, 1), "127.0.0.6": (10, 0)}
        wait_until(lambda: rejected(proc, "per_source") == 1, 5, "the one rejection counted")
        assert opened(proc) == 20


# -- 3. health checks ---------------------------------------------------------------------------
@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_haproxy_health_checks_are_not_clients(haproxy: HAProxy, tmp_path: Path, loop: str) -> None:
    """HAProxy's check (send-proxy-v2) sends a LOCAL header and resets at once: the service
    counts it local, or empty when the reset came first (the kernel then drops the header; on
    uvloop that is nearly always), never as a client."""
    with echo("v2", "--event-loop", loop) as proc:
        with run_haproxy(haproxy_binary(), tmp_path, proc.ports["framed"], "v2"):

            def seen() -> float:  # every header outcome a check can have
                return sum(headers(proc, r) for r in ("local", "empty", "accepted"))

            first = seen()
            # check inter 300ms: ~6 checks in 2 s.
            wait_until(lambda: seen() >= first + 5, 10, "five more health checks seen")
        assert headers(proc, "accepted") == 0
        assert opened(proc) == 0
        assert headers(proc, "untrusted") == 0
        for reason in ("limit", "per_source", "draining"):
            assert rejected(proc, reason) == 0, reason

        # What the check sends, by hand and without the reset: LOCAL, then closed unanswered.
        local = headers(proc, "local")
        with connect_from("127.0.0.1", proc.ports["framed"], 5) as sock:
            sock.sendall(encode_proxy_v2(None, None))
            try:
                assert sock.recv(100) == b""
            except TimeoutError:
                pytest.fail("a LOCAL header's connection was kept open (taken for a client)")
        wait_until(lambda: headers(proc, "local") == local + 1, 5, "result=local counted")
        assert opened(proc) == 0
        assert headers(proc, "accepted") == 0

        # The counters above are live: a real client through HAProxy is counted.
        front = haproxy(proc.ports["framed"], "v2", check=False)
        assert echo_clients(front, [("127.0.0.7", 1)]) == {"127.0.0.7": (1, 0)}
        assert opened(proc) == 1
        assert headers(proc, "accepted") == 1
        assert headers(proc, "untrusted") == 0


# -- 4. cmdexec ---------------------------------------------------------------------------------
def run_true(port: int, address: str, token: str) -> tuple[int, int | None]:
    """Log in from ``address`` through HAProxy and run ``true``: (our port, exit code)."""
    with connect_from(address, port) as sock:
        client = CmdexecClient(sock, token)
        result = client.run(["true"], on_stdout=print, on_stderr=print)
        return sock.getsockname()[1], result.code


def refused_login(port: int, address: str, token: str) -> tuple[int, RemoteError]:
    with connect_from(address, port) as sock:
        client = CmdexecClient(sock, token)
        with pytest.raises(RemoteError) as err:
            client.run(["true"], on_stdout=print, on_stderr=print)
        return sock.getsockname()[1], err.value


def test_cmdexec_behind_haproxy_sees_each_client(haproxy: HAProxy, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(f"""\
            version: 1
            identities:
              ops:
                tokens: ["{hash_token(OPS)}"]
                sources: [127.0.0.2/32]
              dev:
                tokens: ["{hash_token(DEV)}"]
        """)
    )
    audit_file = tmp_path / "audit.jsonl"
    env = {
        "WIREKIT_CMDEXEC_ALLOW_ROOT": "true",
        "WIREKIT_CMDEXEC_POLICY_FILE": str(policy),
        "WIREKIT_CMDEXEC_AUDIT_FILE": str(audit_file),
        "WIREKIT_CMDEXEC_ALLOW": json.dumps(["true"]),
        "WIREKIT_CMDEXEC_PROXY_PROTOCOL": "v2",
        "WIREKIT_CMDEXEC_PROXY_TRUSTED": TRUSTED,
        "WIREKIT_CMDEXEC_AUTH_FAILURE_DELAY_S": "0",
        "WIREKIT_CMDEXEC_AUTH_FAILURE_BURST_PER_SOURCE": "3",
    }
    with service_process("wirekit_cmdexec", "--port", "0", "--metrics-port", "0",
                         env=env) as proc:  # fmt: skip
        front = haproxy(proc.ports["cmdexec"], "v2")

        # ops, from the one address its identity allows.
        ops_port, code = run_true(front, "127.0.0.2", OPS)
        assert code == 0
        # ops, from another: the sources rule holds through the proxy.
        ops_denied_port, err = refused_login(front, "127.0.0.3", OPS)
        assert err.code == "unauthorized", err
        # dev guessing from 127.0.0.4: 3 wrong tokens, then refused without a look.
        guesses = [refused_login(front, "127.0.0.4", "wrong-" + DEV) for _ in range(10)]
        messages = [e.message for _, e in guesses]
        assert all(e.code == "unauthorized" for _, e in guesses), messages
        assert messages[:3] == ["wrong token"] * 3, messages
        assert all(m.startswith("too many failed logins from 127.0.0.4;") for m in messages[3:]), (
            messages
        )
        # ...while dev from 127.0.0.5, behind the same HAProxy, gets in at once.
        started = time.monotonic()
        dev_port, code = run_true(front, "127.0.0.5", DEV)
        assert code == 0
        assert time.monotonic() - started < 2

        # Health checks went on all along; let a few more come, then nothing of them may show.
        def checks() -> float:
            return headers(proc, "local", "cmdexec") + headers(proc, "empty", "cmdexec")

        first = checks() + headers(proc, "accepted", "cmdexec")
        wait_until(
            lambda: checks() + headers(proc, "accepted", "cmdexec") >= first + 3,
            10,
            "three more health checks",
        )
        assert headers(proc, "accepted", "cmdexec") == 13  # the test's 13 connections
        assert headers(proc, "untrusted", "cmdexec") == 0
        assert proc.value("cmdexec_identity_logins_total", identity="ops") == 1
        assert proc.value("cmdexec_identity_logins_total", identity="dev") == 1
        assert proc.value("cmdexec_auth_failures_total", reason="source") == 1
        assert proc.value("cmdexec_auth_failures_total", reason="token") == 3
        assert proc.value("cmdexec_auth_failures_total", reason="rate_limited") == 7
        proc.assert_clean_log()

    events = [json.loads(line) for line in audit_file.read_text().splitlines()]
    auth = [e for e in events if e.get("event") == "auth"]
    want: list[tuple[Any, ...]] = [
        ("ops", "allowed", f"127.0.0.2:{ops_port}"),
        ("ops", "denied", f"127.0.0.3:{ops_denied_port}"),
        *((None, "denied", f"127.0.0.4:{p}") for p, _ in guesses),
        ("dev", "allowed", f"127.0.0.5:{dev_port}"),
    ]
    assert [(e["identity"], e["decision"], e["source"]) for e in auth] == want
    proxies = [e["proxy"] for e in events]
    assert all(str(p).startswith("127.0.0.1:") for p in proxies), proxies
    reasons = [e["reason"] for e in auth]
    assert reasons[2:12] == ["wrong token"] * 3 + ["rate_limited"] * 7, reasons
    ran = [(e["identity"], e["source"], e["exit_code"]) for e in events if e.get("event") == "exec"]
    assert ran == [("ops", f"127.0.0.2:{ops_port}", 0), ("dev", f"127.0.0.5:{dev_port}", 0)]


# -- 5. trust -----------------------------------------------------------------------------------
def test_a_header_from_an_untrusted_address_is_refused_and_from_a_trusted_one_accepted() -> None:
    with echo("v2") as proc:
        port = proc.ports["framed"]
        header = encode_proxy_v2(("10.1.2.3", 40000), ("127.0.0.1", port))
        with connect_from("127.0.0.9", port, 5) as sock:
            with contextlib.suppress(ConnectionError):  # reset before it all went out
                sock.sendall(header + encode(b"hello"))
            try:
                answer = sock.recv(100)
            except ConnectionResetError:
                answer = b""
            # A timeout (TimeoutError) fails the test: the connection was left open.
        assert answer == b"", answer
        wait_until(lambda: headers(proc, "untrusted") == 1, 5, "result=untrusted counted")
        assert headers(proc, "accepted") == 0
        assert opened(proc) == 0

        with connect_from("127.0.0.1", port, 5) as sock:
            sock.sendall(header + encode(b"hello"))
            assert recv_frame(sock) == b"hello"
        assert headers(proc, "accepted") == 1
        assert headers(proc, "untrusted") == 1
        assert opened(proc) == 1
