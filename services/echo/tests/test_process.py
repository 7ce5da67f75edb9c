"""The echo service as a real process: signals, exit codes, settings errors, /metrics, the CLI."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from wirekit_testkit import VERSION, ServiceProcess, http_get, service_process

from wirekit_framing import encode, recv_frame, send_frame

CLIENT = [sys.executable, "-m", "wirekit_echo.client"]


@contextmanager
def echo_process(*args: str, env: dict[str, str] | None = None) -> Iterator[ServiceProcess]:
    ports0 = ("--raw-port", "0", "--framed-port", "0", "--metrics-port", "0")
    with service_process("wirekit_echo", *ports0, *args, env=env) as proc:
        yield proc


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"end of stream after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def test_sigterm_completes_in_flight_replies_and_exits_zero() -> None:
    with echo_process("--timeout-drain-s", "5") as proc:
        # A large framed reply in flight (client reads slowly), a raw stream, a half-sent frame.
        big = os.urandom(1024 * 1024)  # the default max_frame_size
        framed = socket.create_connection(("127.0.0.1", proc.ports["framed"]), timeout=10)
        send_frame(framed, big, max_frame_size=len(big))
        assert _recv_exactly(framed, 4) == struct.pack("!I", len(big))
        raw = socket.create_connection(("127.0.0.1", proc.ports["raw"]), timeout=10)
        raw.sendall(b"raw bytes")
        assert _recv_exactly(raw, 9) == b"raw bytes"
        half = socket.create_connection(("127.0.0.1", proc.ports["framed"]), timeout=10)
        frame = encode(b"completed after SIGTERM")
        half.sendall(frame[:7])
        time.sleep(0.2)

        proc.popen.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        half.sendall(frame[7:])
        assert recv_frame(half) == b"completed after SIGTERM"
        assert recv_frame(half) is None  # then a clean end of stream
        rest = bytearray()
        while len(rest) < len(big):
            chunk = framed.recv(1 << 20)
            assert chunk, "reply cut short"
            rest += chunk
        assert bytes(rest) == big
        assert framed.recv(1) == b""
        assert raw.recv(1) == b""  # raw: half-closed at once, nothing lost
        for s in (framed, raw, half):
            s.close()
        assert proc.popen.wait(10) == 0
        time.sleep(0.1)  # let the reader thread collect the last lines
        assert any("every connection finished" in line for line in proc.lines)


def test_second_signal_forces_exit() -> None:
    with echo_process("--timeout-drain-s", "30") as proc:
        stuck = socket.create_connection(("127.0.0.1", proc.ports["framed"]), timeout=10)
        stuck.sendall(b"\x00\x00\x01\x00partial")  # never completed: the drain would wait
        time.sleep(0.2)
        proc.popen.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert proc.popen.poll() is None  # still draining
        started = time.monotonic()
        proc.popen.send_signal(signal.SIGINT)
        assert proc.popen.wait(10) == 1
        assert time.monotonic() - started < 5
        stuck.close()


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        pytest.param(["--raw-port", "-1"], {}, "raw_port", id="negative-port-flag"),
        pytest.param([], {"WIREKIT_ECHO_FRAMED_PORT": "70000"}, "framed_port", id="port-env"),
        pytest.param([], {"WIREKIT_ECHO_MODE": "loud"}, "mode", id="bad-mode"),
        pytest.param(["--no-such-flag"], {}, "no-such-flag", id="unknown-flag"),
        pytest.param(
            [], {"WIREKIT_ECHO_LOG_LEVEL_FILE": "/nonexistent/file"}, "LOG_LEVEL_FILE", id="file"
        ),
    ],
)
def test_bad_settings_exit_2_with_one_clear_line(
    args: list[str], env: dict[str, str], needle: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wirekit_echo", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wirekit-echo: invalid settings:")
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_help_lists_settings_and_their_variables() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wirekit_echo", "--help"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0
    for flag, var in [
        ("--raw-port", "WIREKIT_ECHO_RAW_PORT"),
        ("--timeout-idle-s", "TIMEOUT_IDLE"),
    ]:
        assert flag in result.stdout
        assert var in result.stdout


def test_metrics_move_and_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (install Debian's prometheus package)")
        pytest.skip("promtool not installed")
    with echo_process() as proc:
        assert http_get(proc.url("/healthz"))[0] == 200
        assert http_get(proc.url("/readyz"))[0] == 200
        assert http_get(proc.url("/nope"))[0] == 404
        with socket.create_connection(("127.0.0.1", proc.ports["framed"]), timeout=5) as s:
            for payload in (b"a" * 10, b"b" * 20):
                send_frame(s, payload)
                assert recv_frame(s) == payload
        status, text = http_get(proc.url("/metrics"))
        assert status == 200
        assert 'echo_received_bytes_total{mode="framed"} 38.0' in text
        assert "echo_frames_total 2.0" in text
        assert "_created" not in text  # turned off once at start (process-wide)
        assert "process_resident_memory_bytes" in text
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(10) == 0


def _run_client(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CLIENT, *args], input=stdin, capture_output=True, timeout=30, check=False
    )


def test_client_cli_one_shot_piped_and_interactive() -> None:
    with echo_process() as proc:
        raw, framed = str(proc.ports["raw"]), str(proc.ports["framed"])
        for mode, port in (("raw", raw), ("framed", framed)):
            res = _run_client("--port", port, "--mode", mode, "--message", "hello there")
            assert (res.returncode, res.stdout) == (0, b"hello there\n"), res.stderr
        blob = os.urandom(200_000)
        res = _run_client("--port", raw, stdin=blob)  # piped raw: byte-exact stream
        assert res.returncode == 0
        assert res.stdout == blob
        res = _run_client("--port", framed, "--mode", "framed", stdin=b"one\n\ntwo\nquit\nthree\n")
        assert (res.returncode, res.stdout) == (0, b"one\ntwo\n")
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(10) == 0
    res = _run_client("--port", raw, "--message", "x", "--timeout", "2")  # server gone
    assert res.returncode == 1
    assert b"wirekit-echo-client:" in res.stderr


def test_nc_echoes_in_raw_mode() -> None:
    nc = shutil.which("nc")
    if nc is None:
        if os.environ.get("CI"):
            pytest.fail("nc is missing (install netcat-openbsd)")
        pytest.skip("nc not installed")
    with echo_process() as proc:
        res = subprocess.run(
            [nc, "-N", "127.0.0.1", str(proc.ports["raw"])], input=b"hello, nc\n",
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        assert res.stdout == b"hello, nc\n"


def test_version_is_the_projects() -> None:
    res = subprocess.run([sys.executable, "-m", "wirekit_echo", "--version"],
                         capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert (res.returncode, res.stdout.strip()) == (0, f"wirekit-echo {VERSION}")


def test_client_reports_an_echo_that_differs() -> None:
    """A server that answers other bytes: the client says so and exits 1."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def liar() -> None:
            conn, _ = listener.accept()
            with conn:
                data = conn.recv(100)
                conn.sendall(data.upper())

        threading.Thread(target=liar, daemon=True).start()
        res = _run_client("--port", str(listener.getsockname()[1]), "--message", "hello")
    assert res.returncode == 1
    assert b"different" in res.stderr
