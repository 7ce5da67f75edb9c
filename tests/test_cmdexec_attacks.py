"""The cmdexec attack suite: one hardened container (read-only, no capability, the image's
non-root user, the token as a secret file), and a table of attacks at the protocol level, with
and without a token -- auth, kinds out of place, malformed and nested JSON, oversize frames,
slot and run exhaustion, slow readers, disconnects at every step, escapes, early forks, reads
of the server's secrets. Each row is a repro of its own, over a direct TCP connection to the
container (no proxy in between, so resets are seen as the server sent them). After every row
the server must show no connection and no run active, no process left of any run, and no
traceback or error in its log."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
from testcontainers.core.container import DockerContainer
from wirekit_testkit import hardened, scrape, wait_until

from wirekit_cmdexec.messages import Exit, Kind, decode
from wirekit_framing import encode, recv_frame

TOKEN = "attack-lavmWgfvY3jc4g8K0oECt-QMd40Aw_aT"
ALLOW = ["echo", "true", "sh", "sleep", "head", "cat", "setsid", "nohup", "yes", "env", "id"]
SETTINGS = {
    "ALLOW": json.dumps(ALLOW),
    "ARG_PATTERNS": json.dumps({"cat": r"/proc/[a-z0-9/]+"}),
    "AUTH_FAILURE_DELAY_S": "0.05",
    # Rate limiting has a test of its own; here every row may fail its login.
    "AUTH_FAILURE_BURST_PER_SOURCE": "1000000",
    "AUTH_FAILURE_BURST": "1000000",
    "TIMEOUT_AUTH_S": "1",
    "TIMEOUT_WRITE_S": "1",
    "TIMEOUT_FRAME_S": "2",
    "TIMEOUT_RUN_S": "4",
    "LIMIT_RUNS": "3",
    "LIMIT_CONNECTIONS": "40",
    "LIMIT_CONNECTIONS_PER_SOURCE": "12",
    "LIMIT_AUTH_BYTES": "512",
    "LIMIT_EXEC_BYTES": "4096",
    "MAX_FRAME_SIZE": "65536",
    "LIMIT_OUTPUT_BYTES": str(1 << 20),
    "RLIMIT_NPROC": "40",
}


# -- the server ---------------------------------------------------------------------------------
@dataclass
class Server:
    container: DockerContainer
    ip: str
    log_seen: int = 0
    sockets: list[socket.socket] = field(default_factory=list)  # the current row's

    def metric(self, name: str, **labels: str) -> float:
        return scrape(f"http://{self.ip}:9710/metrics", name, **labels)

    def processes(self) -> list[str]:
        """Every process in the container (from the host: `docker top`)."""
        top = self.container.get_wrapped_container().top()
        cmd = top["Titles"].index("CMD")
        return [str(row[cmd]) for row in top["Processes"]]

    def new_log(self) -> list[str]:
        lines: list[str] = self.container.get_wrapped_container().logs().decode().splitlines()
        fresh, self.log_seen = lines[self.log_seen :], len(lines)
        return fresh


@contextlib.contextmanager
def cmdexec_container(image: str, secrets: Path, **settings: str) -> Iterator[Server]:
    """The image, hardened, its token a secret file, with ``settings``; ready when it yields."""
    secrets.chmod(0o755)  # readable by the image's user
    (secrets / "wirekit_cmdexec_token").write_text(TOKEN + "\n")
    (secrets / "wirekit_cmdexec_token").chmod(0o644)
    container = hardened(
        image, env={f"WIREKIT_CMDEXEC_{k}": v for k, v in settings.items()}
    ).with_volume_mapping(str(secrets), "/run/secrets", "ro")
    container.start()
    try:
        srv = Server(container, _ip(container))
        try:
            wait_until(lambda: _answers(srv), 30, "cmdexec in the container")
        except AssertionError:
            raise AssertionError(container.get_wrapped_container().logs().decode()) from None
        yield srv
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            container.stop()


@pytest.fixture(scope="module")
def server(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with cmdexec_container(
        images["cmdexec"], tmp_path_factory.mktemp("secrets"), **SETTINGS
    ) as srv:
        yield srv


def _ip(container: DockerContainer) -> str:
    """The container's address on Docker's bridge: the host reaches it without a proxy."""
    wrapped = container.get_wrapped_container()
    wrapped.reload()
    return str(wrapped.attrs["NetworkSettings"]["IPAddress"])


def _answers(srv: Server) -> bool:
    try:
        srv.metric("cmdexec_runs_active")
    except OSError:
        return False
    return True


# -- a client that does what it is told, wire byte by wire byte ----------------------------------
def frame(kind: int, body: bytes | dict[str, Any] | None = None) -> bytes:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return encode(bytes((kind,)) + (body or b""), 2**32 - 1)


AUTH = frame(Kind.AUTH, {"token": TOKEN})


def exec_(argv: list[str], **kw: Any) -> bytes:
    return frame(Kind.EXEC, {"argv": argv, **kw})


@dataclass
class Session:
    server: Server
    sock: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self.sock = socket.create_connection((self.server.ip, 7100), timeout=10)
        self.server.sockets.append(self.sock)

    def send(self, *chunks: bytes) -> Session:
        self.sock.sendall(b"".join(chunks))
        return self

    def reply(self) -> tuple[Kind, Any] | None:
        got = recv_frame(self.sock, 1 << 20)
        return None if got is None else decode(got)

    def error(self, code: str) -> Session:
        got = self.reply()
        assert got is not None, f"closed without ERROR {code}"
        assert got[0] is Kind.ERROR, got
        assert got[1].code == code, got[1]
        return self

    def closed(self) -> Session:
        """The server ended the connection (FIN or RST), with nothing more to say."""
        try:
            rest = self.sock.recv(1 << 16)
        except ConnectionResetError:
            return self
        assert rest == b"", f"more after the end: {rest[:80]!r}"
        return self

    def run(self) -> tuple[Exit, bytes, bytes]:
        """Frames up to the EXIT: (exit, stdout, stderr)."""
        out, err = bytearray(), bytearray()
        while True:
            got = self.reply()
            assert got is not None, "closed before EXIT"
            kind, body = got
            if kind is Kind.EXIT:
                return body, bytes(out), bytes(err)
            assert kind in (Kind.STDOUT, Kind.STDERR), got
            (out if kind is Kind.STDOUT else err).extend(body)

    def works(self) -> Session:
        """Still a good connection: a command runs on it."""
        exit_, _, _ = self.send(exec_(["true"])).run()
        assert exit_.code == 0
        return self

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


Attack = Callable[[Server], None]


def refused_before_auth(*chunks: bytes, code: str = "unauthorized") -> Attack:
    return lambda srv: Session(srv).send(*chunks).error(code).closed().close()


def refused_after_auth(*chunks: bytes, code: str = "bad_request") -> Attack:
    return lambda srv: Session(srv).send(AUTH, *chunks).error(code).closed().close()


def forbidden(argv: list[str], **kw: Any) -> Attack:
    return lambda srv: Session(srv).send(AUTH, exec_(argv, **kw)).error("forbidden").works().close()


def leaves_nothing(script: str, expect_out: bytes | None = None) -> Attack:
    """A command that tries to outlive itself: after its EXIT nothing of it is left."""

    def attack(srv: Server) -> None:
        s = Session(srv).send(AUTH, exec_(["sh", "-c", script]))
        exit_, out, _ = s.run()
        assert not exit_.timed_out
        if expect_out is not None:
            assert out == expect_out
        s.close()

    return attack


DEEP = b"[" * 100_000
SERVER_KINDS = {"STDOUT": 0x81, "STDERR": 0x82, "EXIT": 0x83, "ERROR": 0x84}
UNKNOWN_KINDS = [0x00, 0x06, 0x7F, 0x80, 0x85, 0xFF]


# -- the table -----------------------------------------------------------------------------------
def _silent(srv: Server) -> None:
    Session(srv).error("timeout").closed().close()


def _trickled_auth(srv: Server) -> None:
    s = Session(srv)
    for byte in AUTH:  # one byte at a time, within the AUTH deadline
        s.send(bytes([byte]))
        time.sleep(0.005)
    s.works().close()


def _connect_and_leave(srv: Server) -> None:
    Session(srv).close()


def _leave(*chunks: bytes, reset: bool = False, pause: float = 0.0) -> Attack:
    def attack(srv: Server) -> None:
        s = Session(srv).send(*chunks)
        time.sleep(pause)
        s.reset() if reset else s.close()

    return attack


def _auth_then(*chunks: bytes, pause: float = 0.3, reset: bool = False) -> Attack:
    return _leave(AUTH, *chunks, pause=pause, reset=reset)


def _pipelined(srv: Server) -> None:
    s = Session(srv).send(AUTH, exec_(["echo", "one"]))
    assert s.run()[1] == b"one\n"
    s.close()


def _stray_tail_is_ignored(srv: Server) -> None:
    Session(srv).send(AUTH, frame(Kind.STDIN, b"x"), frame(Kind.STDIN_EOF),
                      frame(Kind.SIGNAL, {"name": "TERM"})).works().close()  # fmt: skip


def _during_run(*chunks: bytes, code: str) -> Attack:
    def attack(srv: Server) -> None:
        s = Session(srv).send(AUTH, exec_(["sh", "-c", "echo up; sleep 30"]))
        got = s.reply()
        assert got is not None
        assert got[0] is Kind.STDOUT
        s.send(*chunks).error(code).closed().close()

    return attack


def _signal(name: str) -> Attack:
    def attack(srv: Server) -> None:
        s = Session(srv).send(AUTH, exec_(["sh", "-c", "echo up; sleep 30"]))
        assert s.reply() is not None
        exit_, _, _ = s.send(frame(Kind.SIGNAL, {"name": name})).run()
        assert exit_.signal == name
        s.works().close()

    return attack


def _timeout(srv: Server) -> None:
    s = Session(srv).send(AUTH, exec_(["sleep", "30"], timeout_s=0.3))
    exit_, _, _ = s.run()
    assert (exit_.timed_out, exit_.signal) == (True, "KILL")
    s.works().close()


def _server_timeout_wins(srv: Server) -> None:
    s = Session(srv).send(AUTH, exec_(["sleep", "30"], timeout_s=1000))
    exit_, _, _ = s.run()
    assert exit_.timed_out
    assert exit_.duration_s < 10
    s.close()


def _output_cap_ends_the_command(srv: Server) -> None:
    s = Session(srv).send(AUTH, exec_(["yes"]))
    exit_, out, _err = s.run()
    assert (exit_.output_capped, exit_.signal) == (True, "KILL")
    assert len(out) == 1 << 20
    assert exit_.truncated["stdout"]
    s.works().close()


def _both_streams_capped(srv: Server) -> None:
    s = Session(srv).send(AUTH, exec_(["sh", "-c", "yes & yes >&2"]))
    exit_, _out, _err = s.run()
    assert exit_.output_capped
    s.close()


def _slow_reader(srv: Server) -> None:
    """A client that stops reading while the command floods stdout: reset after the write
    deadline, the command killed, the slot free (defect 4)."""
    s = Session(srv)
    s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.send(AUTH, exec_(["sh", "-c", "while :; do cat /proc/cpuinfo; done"]))
    time.sleep(3)  # never read: the server's writes miss their 1 s deadline
    with contextlib.suppress(ConnectionResetError):
        while s.sock.recv(1 << 16):
            pass
    s.close()


def _slow_reader_of_exit(srv: Server) -> None:
    s = Session(srv).send(AUTH, exec_(["head", "-c", "900000", "/dev/zero"]))
    time.sleep(0.5)  # a pause shorter than the write deadline: nothing is lost
    exit_, out, _ = s.run()
    assert exit_.code == 0
    assert len(out) == 900000
    s.close()


def _busy(srv: Server) -> None:
    runners = [Session(srv).send(AUTH, exec_(["sh", "-c", "echo up; sleep 3"])) for _ in range(3)]
    for r in runners:
        assert r.reply() is not None
    Session(srv).send(AUTH, exec_(["true"])).error("busy").close()
    for r in runners:
        r.run()
        r.close()


def _per_source_slots(srv: Server) -> None:
    held = [Session(srv).send(AUTH) for _ in range(12)]
    for h in held:
        h.works()
    Session(srv).closed().close()  # the 13th from this address: closed at once
    for h in held:
        h.close()


def _auth_slots_expire(srv: Server) -> None:
    """Twelve silent connections hold this address's slots for timeout_auth_s, no longer."""
    held = [Session(srv) for _ in range(12)]
    for h in held:
        h.error("timeout").closed().close()
    Session(srv).send(AUTH).works().close()


def _trickled_frame(srv: Server) -> None:
    """After AUTH, a frame announcing 1,000 bytes, then one byte every 0.2 s: reset at the
    frame deadline (2 s) though bytes keep coming."""
    s = Session(srv).send(AUTH, struct.pack("!I", 1000))
    started = time.monotonic()
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        while time.monotonic() - started < 8:
            s.send(b"\x03")
            time.sleep(0.2)
    assert time.monotonic() - started < 8
    s.close()


def _stdin_flood_is_slowed(srv: Server) -> None:
    s = Session(srv).send(AUTH, exec_(["sh", "-c", "sleep 1; head -c 10 >/dev/null"], stdin=True))
    chunk = frame(Kind.STDIN, b"z" * 60000)
    s.sock.settimeout(0.5)
    sent = 0
    with contextlib.suppress(TimeoutError, ConnectionError):
        for _ in range(2000):  # 120 MB offered; TCP back-pressure stops us long before
            s.sock.sendall(chunk)
            sent += 1
    assert sent < 2000
    s.sock.settimeout(10)
    s.reset()


def _limits_before_first_instruction(srv: Server) -> None:
    """A subshell forked at once sees the run's limits, not the server's (defect 6)."""
    s = Session(srv).send(AUTH, exec_(["sh", "-c", "(cat /proc/self/limits) & wait"]))
    _, out, _ = s.run()
    limits = {line[:26].strip(): line[26:].split()[:2] for line in out.decode().splitlines()[1:]}
    assert limits["Max processes"] == ["40", "40"]
    s.close()


def _limits_set_by_the_static_wrapper(srv: Server) -> None:
    """The image starts commands through wirekit-limits (static, the cheapest exec wrapper),
    and says so in its start log."""
    logs = srv.container.get_wrapped_container().logs().decode().splitlines()
    commands = [json.loads(line) for line in logs if '"message": "commands"' in line]
    assert [c["rlimits"] for c in commands] == ["wirekit-limits exec wrapper"]


def _fork_bomb_is_bounded(srv: Server) -> None:
    """101 processes started under a limit of 40 (the limit came late). Now the user's
    processes -- the server's own included -- never pass RLIMIT_NPROC. The script counts its
    own forks (the sleeps live only until the failed fork ends the run and the sweep takes
    them: too short a time for `docker top` to be sure to see their peak)."""
    script = "i=0; while [ $i -lt 100 ]; do sleep 2 & i=$((i+1)); echo $i; done 2>/dev/null"
    s = Session(srv).send(AUTH, exec_(["sh", "-c", script]))
    most, done = 0, threading.Event()

    def watch() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, len(srv.processes()))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        exit_, out, _ = s.run()
    finally:
        done.set()
        watcher.join()
    started = int(out.split()[-1])
    assert exit_.code == 2, exit_  # dash gives up when a fork fails: the limit was reached
    assert 10 < started < 40, started  # it did fork, and no further than the limit
    assert most <= 40, most  # whenever `docker top` looked
    s.close()


def _no_secret_in(script: str) -> Attack:
    def attack(srv: Server) -> None:
        s = Session(srv).send(AUTH, exec_(["sh", "-c", script]))
        _, out, err = s.run()
        assert TOKEN.encode() not in out + err
        assert "k" * 24 not in (out + err).decode(errors="replace")
        s.close()

    return attack


def _environ_of_server_is_closed(srv: Server) -> None:
    s = Session(srv).send(AUTH, exec_(["sh", "-c", "cat /proc/$PPID/environ"]))
    exit_, _out, err = s.run()
    assert exit_.code != 0
    assert b"Permission denied" in err
    s.close()


def _abs_path_allowlisted(srv: Server) -> None:
    s = Session(srv).send(AUTH, exec_(["/usr/bin/echo", "x"]))
    exit_, out, _ = s.run()
    assert (exit_.code, out) == (0, b"x\n")
    s.close()


ROWS: list[tuple[str, Attack]] = [
    # -- before AUTH: everything but a right token is unauthorized, then closed ----------------
    ("wrong-token", refused_before_auth(frame(Kind.AUTH, {"token": "guess"}))),
    ("empty-token", refused_before_auth(frame(Kind.AUTH, {"token": ""}))),
    ("token-prefix", refused_before_auth(frame(Kind.AUTH, {"token": TOKEN[:-1]}))),
    ("token-plus-one", refused_before_auth(frame(Kind.AUTH, {"token": TOKEN + "k"}))),
    ("token-nul", refused_before_auth(frame(Kind.AUTH, {"token": TOKEN + "\x00"}))),
    ("token-lone-surrogate", refused_before_auth(frame(Kind.AUTH, b'{"token": "\\ud800"}'))),
    ("token-number", refused_before_auth(frame(Kind.AUTH, {"token": 12345}))),
    ("token-list", refused_before_auth(frame(Kind.AUTH, {"token": [TOKEN]}))),
    ("token-null", refused_before_auth(frame(Kind.AUTH, {"token": None}))),
    ("auth-extra-field", refused_before_auth(frame(Kind.AUTH, {"token": TOKEN, "admin": True}))),
    ("auth-no-token", refused_before_auth(frame(Kind.AUTH, {}))),
    ("auth-not-json", refused_before_auth(frame(Kind.AUTH, b"token=" + TOKEN.encode()))),
    ("auth-json-array", refused_before_auth(frame(Kind.AUTH, b'["' + TOKEN.encode() + b'"]'))),
    ("auth-json-null", refused_before_auth(frame(Kind.AUTH, b"null"))),
    ("auth-json-string", refused_before_auth(frame(Kind.AUTH, b'"' + TOKEN.encode() + b'"'))),
    ("auth-trailing-garbage", refused_before_auth(frame(Kind.AUTH, b'{"token": "x"} }'))),
    ("auth-nested-deep", refused_before_auth(frame(Kind.AUTH, b'{"token": ' + DEEP[:500]))),
    ("auth-invalid-utf8", refused_before_auth(frame(Kind.AUTH, b'{"token": "\xff\xfe"}'))),
    ("auth-over-limit", refused_before_auth(frame(Kind.AUTH, {"token": "x" * 600}))),
    ("auth-header-4gib", refused_before_auth(struct.pack("!I", 2**32 - 1) + b"\x01{")),
    ("empty-frame-first", refused_before_auth(struct.pack("!I", 0))),
    ("exec-first", refused_before_auth(exec_(["true"]))),
    ("stdin-first", refused_before_auth(frame(Kind.STDIN, b"x"))),
    ("stdin-eof-first", refused_before_auth(frame(Kind.STDIN_EOF))),
    ("signal-first", refused_before_auth(frame(Kind.SIGNAL, {"name": "KILL"}))),
    # Defect 1: a server kind first crashed the handler (TypeError in the log).
    *[
        (f"{name.lower()}-first", refused_before_auth(frame(k, {"code": "x", "message": "y"})))
        for name, k in SERVER_KINDS.items()
    ],
    # Defect 2: ERROR + 100,000 '[' killed the reader and leaked the slot for good.
    ("error-deep-nesting-first", refused_before_auth(frame(0x84, DEEP))),
    ("error-deep-nesting-first-big", refused_before_auth(frame(0x84, DEEP * 3))),
    *[
        (f"unknown-kind-0x{k:02x}-first", refused_before_auth(frame(k, b"{}")))
        for k in UNKNOWN_KINDS
    ],
    ("silent-after-connect", _silent),
    (
        "silent-mid-header",
        lambda srv: Session(srv).send(b"\x00\x00").error("timeout").closed().close(),
    ),
    ("silent-mid-auth", lambda srv: Session(srv).send(AUTH[:10]).error("timeout").closed().close()),
    ("connect-and-leave", _connect_and_leave),
    ("leave-mid-header", _leave(AUTH[:2])),
    ("leave-mid-auth", _leave(AUTH[:12])),
    ("reset-mid-auth", _leave(AUTH[:12], reset=True)),
    ("auth-byte-by-byte", _trickled_auth),
    (
        "auth-and-exec-pipelined",
        _pipelined,
    ),
    ("auth-slots-expire", _auth_slots_expire),
    # -- after AUTH: messages out of place or malformed are bad_request, then closed -----------
    ("auth-twice", refused_after_auth(AUTH)),
    *[
        (f"{name.lower()}-after-auth", refused_after_auth(frame(k, {"code": "x", "message": "y"})))
        for name, k in SERVER_KINDS.items()
    ],
    ("error-deep-after-auth", refused_after_auth(frame(0x84, DEEP[:60000]))),
    *[
        (f"unknown-kind-0x{k:02x}-after-auth", refused_after_auth(frame(k, b"{}")))
        for k in UNKNOWN_KINDS
    ],
    ("empty-frame-after-auth", refused_after_auth(struct.pack("!I", 0))),
    ("exec-not-json", refused_after_auth(frame(Kind.EXEC, b"{not json"))),
    ("exec-json-array", refused_after_auth(frame(Kind.EXEC, b'["true"]'))),
    ("exec-no-argv", refused_after_auth(frame(Kind.EXEC, {"args": ["true"]}))),
    ("exec-empty-argv", refused_after_auth(frame(Kind.EXEC, {"argv": []}))),
    ("exec-argv-string", refused_after_auth(frame(Kind.EXEC, {"argv": "true"}))),
    ("exec-argv-int", refused_after_auth(frame(Kind.EXEC, {"argv": ["echo", 1]}))),
    ("exec-argv-nested", refused_after_auth(frame(Kind.EXEC, {"argv": [["true"]]}))),
    ("exec-extra-field", refused_after_auth(frame(Kind.EXEC, {"argv": ["true"], "env": {}}))),
    ("exec-deep-nesting", refused_after_auth(frame(Kind.EXEC, b'{"argv": ' + DEEP[:3000]))),
    # Lax types were accepted: "yes", 1 and "0.5" are not a boolean, a boolean and a number.
    ("exec-shell-string", refused_after_auth(exec_(["true"], shell="yes"))),
    ("exec-stdin-int", refused_after_auth(exec_(["true"], stdin=1))),
    ("exec-timeout-string", refused_after_auth(exec_(["true"], timeout_s="0.5"))),
    ("exec-timeout-negative", refused_after_auth(exec_(["true"], timeout_s=-1))),
    ("exec-timeout-zero", refused_after_auth(exec_(["true"], timeout_s=0))),
    (
        "exec-timeout-nan",
        refused_after_auth(frame(Kind.EXEC, b'{"argv":["true"],"timeout_s":NaN}')),
    ),
    (
        "exec-timeout-inf",
        refused_after_auth(frame(Kind.EXEC, b'{"argv":["true"],"timeout_s":1e999}')),
    ),
    ("exec-traceparent-long", refused_after_auth(exec_(["true"], traceparent="0" * 300))),
    ("stdin-eof-with-body", refused_after_auth(frame(Kind.STDIN_EOF, b"x"))),
    ("signal-unknown-name", refused_after_auth(frame(Kind.SIGNAL, {"name": "STOP"}))),
    ("signal-not-json", refused_after_auth(frame(Kind.SIGNAL, b"KILL"))),
    ("stray-run-tail-ignored", _stray_tail_is_ignored),
    # -- oversize: too_large, closed (defect 8: it was bad_request during a run) --------------
    ("frame-over-max", refused_after_auth(frame(Kind.STDIN, b"x" * 70000), code="too_large")),
    ("header-4gib-after-auth", refused_after_auth(struct.pack("!I", 2**32 - 1), code="too_large")),
    ("exec-over-limit", refused_after_auth(exec_(["echo", "y" * 5000]), code="too_large")),
    ("oversize-during-run", _during_run(struct.pack("!I", 2**31), code="too_large")),
    # -- forbidden: answered, the connection stays good ------------------------------------------
    ("not-allowlisted", forbidden(["rm", "-rf", "/"])),
    ("sh-metachar-argv0", forbidden(["true; id"])),
    ("dollar-paren-argv0", forbidden(["$(id)"])),
    ("backticks-argv0", forbidden(["`id`"])),
    ("relative-path", forbidden(["./true"])),
    ("dotdot-path", forbidden(["../../bin/true"])),
    ("abs-path-not-allowed", forbidden(["/bin/rm"])),
    ("abs-dotdot", forbidden(["/usr/bin/../bin/rm"])),
    ("space-in-argv0", forbidden(["echo x"])),
    ("nul-in-argument", forbidden(["echo", "a\x00b"])),
    ("shell-mode-off", forbidden(["id"], shell=True)),
    ("arg-pattern", forbidden(["cat", "/etc/shadow"])),
    ("arg-pattern-dotdot", forbidden(["cat", "/proc/../etc/shadow"])),
    # Defect 7: an absolute path on the allowlist crashed the handler (KeyError).
    ("abs-path-allowlisted", _abs_path_allowlisted),
    # -- during a run -----------------------------------------------------------------------
    ("exec-during-run", _during_run(exec_(["true"]), code="bad_request")),
    ("auth-during-run", _during_run(AUTH, code="bad_request")),
    ("exit-kind-during-run", _during_run(frame(0x83, {"duration_s": 0}), code="bad_request")),
    ("error-deep-during-run", _during_run(frame(0x84, DEEP[:60000]), code="bad_request")),
    ("malformed-signal-during-run", _during_run(frame(Kind.SIGNAL, b"{"), code="bad_request")),
    ("signal-term", _signal("TERM")),
    ("signal-kill", _signal("KILL")),
    ("signal-hup", _signal("HUP")),
    ("timeout", _timeout),
    ("timeout-asks-more", _server_timeout_wins),
    ("output-cap", _output_cap_ends_the_command),
    ("output-cap-both-streams", _both_streams_capped),
    ("stdin-flood", _stdin_flood_is_slowed),
    # -- exhaustion and slow peers ---------------------------------------------------------------
    ("busy", _busy),
    ("per-source-slots", _per_source_slots),
    ("slow-reader-flood", _slow_reader),
    ("slow-reader-then-reads", _slow_reader_of_exit),
    ("trickled-frame", _trickled_frame),
    # -- disconnects at every step (defect 3: one during a run leaked its slot) ---------------
    ("leave-after-auth", _auth_then()),
    ("leave-mid-exec", _auth_then(exec_(["true"])[:9])),
    ("leave-right-after-exec", _auth_then(exec_(["sleep", "30"]), pause=0.0)),
    ("leave-during-run-stdin", _auth_then(exec_(["cat"], stdin=True))),
    ("leave-during-run", _auth_then(exec_(["sleep", "30"]))),
    ("reset-during-run", _auth_then(exec_(["sleep", "30"]), reset=True)),
    ("leave-mid-stdin", _auth_then(exec_(["cat"], stdin=True), frame(Kind.STDIN, b"x" * 100)[:50])),
    ("leave-after-stdin-eof", _auth_then(exec_(["cat"], stdin=True), frame(Kind.STDIN_EOF))),
    ("leave-during-output", _auth_then(exec_(["yes"]), pause=0.1, reset=True)),
    # -- escapes: nothing outlives its run (defect 5) -----------------------------------------
    ("escape-setsid-f", leaves_nothing("setsid -f sleep 600 </dev/null >/dev/null 2>&1")),
    ("escape-background", leaves_nothing("sleep 600 >/dev/null 2>&1 & exit 0")),
    ("escape-double-fork", leaves_nothing("(sleep 600 >/dev/null 2>&1 &); exit 0")),
    ("escape-nohup", leaves_nothing("nohup sleep 600 >/dev/null 2>&1 & exit 0")),
    (
        "escape-nested-setsid",
        leaves_nothing(
            "setsid -f sh -c 'setsid -f sleep 600 >/dev/null 2>&1; sleep 600' >/dev/null 2>&1"
        ),
    ),
    (
        "escape-setsid-with-children",
        leaves_nothing("setsid -f sh -c 'sleep 600 & sleep 600 & wait' >/dev/null 2>&1"),
    ),
    (
        "escape-ignoring-signals",
        leaves_nothing("setsid -f sh -c 'trap \"\" TERM HUP INT; sleep 600' >/dev/null 2>&1"),
    ),
    (
        "escape-then-keep-running",
        leaves_nothing("setsid -f sleep 600 >/dev/null 2>&1; sleep 1; echo done", b"done\n"),
    ),
    ("escape-holding-pipes", leaves_nothing("setsid -f sleep 600; echo out")),
    ("escape-exec-setsid", leaves_nothing("exec setsid sleep 600")),
    (
        "escape-many",
        leaves_nothing("for i in 1 2 3 4 5; do setsid -f sleep 600 >/dev/null 2>&1; done"),
    ),
    # -- limits before the first instruction (defect 6) ---------------------------------------
    ("limits-in-a-subshell", _limits_before_first_instruction),
    ("limits-by-wirekit-limits", _limits_set_by_the_static_wrapper),
    ("fork-bomb-bounded", _fork_bomb_is_bounded),
    # -- the server's secrets stay in the server ------------------------------------------------
    ("read-server-environ", _environ_of_server_is_closed),
    ("secret-in-env", _no_secret_in("env")),
    ("secret-in-server-cmdline", _no_secret_in("cat /proc/$PPID/cmdline")),
    ("secret-in-pid1-environ", _no_secret_in("cat /proc/1/environ 2>&1")),
    ("secret-in-own-environ", _no_secret_in("cat /proc/self/environ")),
    ("secret-in-server-mem", _no_secret_in("head -c 100000 /proc/$PPID/mem 2>&1")),
    ("secret-in-server-fds", _no_secret_in("cat /proc/$PPID/fd/* 2>&1 | head -c 100000")),
]


@pytest.mark.parametrize("attack", [r[1] for r in ROWS], ids=[r[0] for r in ROWS])
def test_attack(server: Server, attack: Attack) -> None:
    server.new_log()  # what came before is another row's
    try:
        attack(server)
    finally:  # a row that failed half-way leaves nothing open for the next
        for sock in server.sockets:
            sock.close()
        server.sockets.clear()
    # Afterwards: nothing left active, no process left of any run, nothing bad in the log.
    wait_until(
        lambda: server.metric("cmdexec_connections_active") == 0
        and server.metric("cmdexec_runs_active") == 0,
        15, "connections and runs back to 0",
    )  # fmt: skip
    wait_until(lambda: len(server.processes()) == 2, 5, "only tini and the service left")
    bad = [line for line in server.new_log() if "Traceback" in line
           or json.loads(line).get("level") in ("ERROR", "CRITICAL")]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_the_table_is_large_enough() -> None:
    assert len(ROWS) >= 100
    assert len({name for name, _ in ROWS}) == len(ROWS)


def test_the_secret_file_row_can_fail(server: Server) -> None:
    """Control: the secret-read rows look for the token where it would be if it leaked."""
    with pytest.raises(AssertionError):
        _no_secret_in(f"echo {TOKEN}")(server)


def test_containment_check_can_fail(server: Server) -> None:
    """Control: a process left running is seen by the after-row check."""
    s = Session(server).send(AUTH, exec_(["sleep", "2"]))
    assert len(server.processes()) > 2 or wait_until(
        lambda: len(server.processes()) > 2, 5, "the command"
    )
    s.run()
    s.close()
    wait_until(lambda: len(server.processes()) == 2, 10, "back to two")


def test_failed_logins_are_rate_limited_per_source(images: dict[str, str], tmp_path: Path) -> None:
    """200 wrong tokens were answered in 1.1 s. Now a source gets 3 tries, then every attempt
    is refused without looking at the token -- the right one included -- until it has waited."""
    with cmdexec_container(
        images["cmdexec"], tmp_path, AUTH_FAILURE_DELAY_S="0",
        AUTH_FAILURE_BURST_PER_SOURCE="3", AUTH_FAILURE_RATE_PER_SOURCE="0.5",
    ) as srv:  # fmt: skip
        for _ in range(3):
            refused_before_auth(frame(Kind.AUTH, {"token": "guess"}))(srv)
        refused_before_auth(AUTH)(srv)  # limited: even the right token is refused
        assert srv.metric("cmdexec_auth_failures_total", reason="token") == 3
        assert srv.metric("cmdexec_auth_failures_total", reason="rate_limited") == 1
        assert any('"rate_limited"' in line and '"source"' in line for line in srv.new_log())
        time.sleep(2.2)  # one attempt regained
        Session(srv).send(AUTH).works().close()


def test_docker_stop_during_runs_finishes_them_then_exits_zero(
    images: dict[str, str], tmp_path: Path
) -> None:
    """Shutdown during runs: a short command finishes and gets its EXIT; a long one is killed
    at the drain deadline; no traceback; exit status 0."""
    with cmdexec_container(
        images["cmdexec"], tmp_path, ALLOW='["sh", "sleep", "true"]', TIMEOUT_DRAIN_S="3"
    ) as srv:
        wrapped = srv.container.get_wrapped_container()
        short = Session(srv).send(AUTH, exec_(["sh", "-c", "echo up; sleep 1; echo done"]))
        long = Session(srv).send(AUTH, exec_(["sh", "-c", "echo up; sleep 60"]))
        idle = Session(srv).send(AUTH)
        idle.works()
        for s in (short, long):
            assert s.reply() is not None
        wrapped.stop(timeout=20)  # SIGTERM, then the drain
        exit_, out, _ = short.run()
        assert (exit_.code, out) == (0, b"done\n")
        short.closed()
        long.closed()
        idle.closed()
        wrapped.reload()
        assert wrapped.attrs["State"]["ExitCode"] == 0
        log = wrapped.logs().decode()
        assert "Traceback" not in log
        assert '"level": "ERROR"' not in log
