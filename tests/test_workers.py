"""``--workers N``: real supervisor and worker processes on loopback. The ports are shared
(SO_REUSEPORT) and the load spreads, /metrics adds the workers up exactly, a dead worker is
replaced and counted without a counter going down, SIGTERM drains every worker, a worker that
cannot start stops the instance, and per-instance limits are divided among the workers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from wirekit_testkit import (
    CMDEXEC_TOKEN,
    ServiceProcess,
    child_processes,
    http_get,
    recv_exactly,
    service_process,
    wait_until,
)

from wirekit_cmdexec.client import CmdexecClient
from wirekit_cmdexec.settings import CmdexecSettings
from wirekit_framing import encode, recv_frame
from wirekit_servicekit.settings import cpu_count
from wirekit_servicekit.worker import worker_settings
from wirekit_udp.settings import UdpSettings

ECHO_PORTS = ("--raw-port", "0", "--framed-port", "0", "--metrics-port", "0")


@contextlib.contextmanager
def echo(*args: str) -> Iterator[ServiceProcess]:
    with service_process("wirekit_echo", *ECHO_PORTS, *args) as proc:
        yield proc


def workers_of(proc: ServiceProcess) -> list[int]:
    return sorted(pid for pid, state, _ in child_processes(proc.popen.pid) if state != b"Z")


def sockets_of(pid: int) -> int:
    fds = f"/proc/{pid}/fd"
    return sum(1 for fd in os.listdir(fds) if os.readlink(f"{fds}/{fd}").startswith("socket:"))


def stop(proc: ServiceProcess) -> int:
    """SIGTERM to the supervisor; its exit status (every worker gone by then)."""
    workers = workers_of(proc)
    proc.popen.send_signal(signal.SIGTERM)
    status = proc.popen.wait(30)
    assert all(not os.path.exists(f"/proc/{pid}") for pid in workers), "a worker outlived it"
    return status


def test_two_workers_share_the_ports_and_their_metrics_add_up() -> None:
    with echo("--workers", "2") as proc:
        workers = workers_of(proc)
        assert len(workers) == 2
        assert proc.value("echo_workers", state="up") == 2
        before = {pid: sockets_of(pid) for pid in workers}
        conns = [socket.create_connection(("127.0.0.1", proc.ports["raw"]), 5) for _ in range(40)]
        try:
            for i, conn in enumerate(conns):
                conn.sendall(b"x" * (i + 1))
                assert recv_exactly(conn, i + 1) == b"x" * (i + 1)
            gained = {pid: sockets_of(pid) - before[pid] for pid in workers}
            assert all(n > 0 for n in gained.values()), gained  # the kernel spread them
            assert sum(gained.values()) == 40
        finally:
            for conn in conns:
                conn.close()
        framed = socket.create_connection(("127.0.0.1", proc.ports["framed"]), 5)
        with framed:
            framed.sendall(encode(b"hello") * 3)
            assert [recv_frame(framed) for _ in range(3)] == [b"hello"] * 3
        wait_until(lambda: proc.value("echo_connections_active", mode="raw") == 0, 10, "closed")
        assert proc.value("echo_connections_opened_total", mode="raw") == 40
        assert proc.value("echo_received_bytes_total", mode="raw") == sum(range(1, 41))
        assert proc.value("echo_frames_total") == 3
        restarts = proc.value("echo_worker_restarts_total")
        assert http_get(proc.url("/readyz"))[0] == 200, (restarts, proc.lines)
        assert stop(proc) == 0
        proc.assert_clean_log()


def test_a_dead_worker_is_replaced_and_no_counter_goes_down() -> None:
    with echo("--workers", "2") as proc:
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", proc.ports["raw"]), 5) as conn:
                conn.sendall(b"ping")
                assert recv_exactly(conn, 4) == b"ping"
        proc.wait_value("echo_connections_opened_total", 10, mode="raw")
        victim = workers_of(proc)[0]
        os.kill(victim, signal.SIGKILL)
        proc.wait_value("echo_worker_restarts_total", 1)
        proc.wait_value("echo_workers", 2, state="up")
        assert victim not in workers_of(proc)
        assert proc.value("echo_connections_opened_total", mode="raw") == 10  # kept
        with socket.create_connection(("127.0.0.1", proc.ports["raw"]), 5) as conn:
            conn.sendall(b"pong")
            assert recv_exactly(conn, 4) == b"pong"
        proc.wait_value("echo_connections_opened_total", 11, mode="raw")
        assert stop(proc) == 0
        errors = [line for line in proc.lines if '"worker exited: replacing it"' in line]
        assert len(errors) == 1  # the one expected ERROR line, and nothing else:
        proc.lines[:] = [line for line in proc.lines if line not in errors]
        proc.assert_clean_log()


def test_sigterm_drains_every_worker_without_losing_a_reply() -> None:
    with echo("--workers", "2", "--timeout-drain-s", "5") as proc:
        conns = [socket.create_connection(("127.0.0.1", proc.ports["framed"]), 5) for _ in range(8)]
        for conn in conns:  # half a frame each: the drain waits for the rest
            conn.sendall(encode(b"abcdef")[:6])
        wait_until(lambda: proc.value("echo_connections_active", mode="framed") == 8, 10, "8")
        proc.popen.send_signal(signal.SIGTERM)
        wait_until(lambda: http_get(proc.url("/readyz"))[0] == 503, 10, "not ready")
        for conn in conns:
            conn.sendall(encode(b"abcdef")[6:])
            assert recv_frame(conn) == b"abcdef"
            assert conn.recv(1) == b""  # then a clean FIN: everything was answered
            conn.close()
        assert proc.popen.wait(30) == 0
        assert not workers_of(proc)
        proc.assert_clean_log()


def test_a_worker_hung_past_the_drain_is_killed() -> None:
    """Every wait has a deadline: a worker that does not exit within the drain time (plus a
    margin) is killed, and the instance reports the failure (1)."""
    with echo("--workers", "2", "--timeout-drain-s", "0") as proc:
        hung = workers_of(proc)[0]
        os.kill(hung, signal.SIGSTOP)  # it will not even see the SIGTERM
        status = stop(proc)
        assert status == 1
        assert any('"worker still running past the drain: killed"' in line for line in proc.lines)


def test_ctrl_c_in_a_terminal_drains_once() -> None:
    """A terminal sends SIGINT to its whole foreground process group. The workers are in a
    group of their own, so they get it once, forwarded (twice would force-close them: exit 1)."""
    popen = subprocess.Popen(
        [sys.executable, "-m", "wirekit_echo", "--workers", "2", *ECHO_PORTS],
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert popen.stderr is not None
    try:
        for line in popen.stderr:
            if '"listening"' in line and '"worker"' not in line:
                break
        os.killpg(popen.pid, signal.SIGINT)  # its own session's group, as a terminal would
        _, err = popen.communicate(timeout=30)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait(10)
    assert popen.returncode == 0, err
    assert "second signal" not in err


def test_a_worker_that_cannot_start_stops_the_instance() -> None:
    with socket.socket() as taken:  # a port held without SO_REUSEPORT: no worker can join it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        popen = subprocess.Popen(
            [sys.executable, "-m", "wirekit_echo", "--workers", "2", "--raw-port", port,
             "--framed-port", "0", "--metrics-port", "0"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _, err = popen.communicate(timeout=60)
    assert popen.returncode == 1
    assert "worker 0 did not start: stopping" in err
    assert not child_processes(popen.pid)


def test_udp_workers_answer_every_datagram_and_add_up() -> None:
    args = ("--port", "0", "--metrics-port", "0", "--workers", "2")
    with service_process("wirekit_udp", *args) as proc:
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(30)]
        try:
            for i, sock in enumerate(socks):
                sock.settimeout(5)
                sock.sendto(bytes([i]) * (i + 1), ("127.0.0.1", proc.ports["udp"]))
                assert sock.recv(100) == bytes([i]) * (i + 1)
        finally:
            for sock in socks:
                sock.close()
        proc.wait_value("udp_datagrams_sent_total", 30)
        assert proc.value("udp_datagrams_received_total") == 30
        assert proc.value("udp_received_bytes_total") == sum(range(1, 31))
        assert stop(proc) == 0
        proc.assert_clean_log()


def test_cmdexec_workers_get_the_token_and_a_share_of_the_limits() -> None:
    env = {"WIREKIT_CMDEXEC_TOKEN": CMDEXEC_TOKEN, "WIREKIT_CMDEXEC_ALLOW_ROOT": "true"}
    args = ("--port", "0", "--metrics-port", "0", "--workers", "2", "--limit-runs", "4")
    with service_process("wirekit_cmdexec", *args, env=env) as proc:
        for pid in workers_of(proc):  # the token reached them through a pipe only
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert CMDEXEC_TOKEN.encode() not in f.read()
        for _ in range(6):
            with socket.create_connection(("127.0.0.1", proc.ports["cmdexec"]), 5) as sock:
                out = bytearray()
                res = CmdexecClient(sock, CMDEXEC_TOKEN).run(
                    ["echo", "hi"], on_stdout=out.extend, on_stderr=out.extend
                )
                assert (res.code, bytes(out)) == (0, b"hi\n")
        proc.wait_value("cmdexec_runs_total", 6, result="ok")
        assert stop(proc) == 0
        proc.assert_clean_log()


def test_per_instance_limits_are_divided_among_the_workers() -> None:
    base = CmdexecSettings(limit_runs=8, auth_failure_rate=2.0, token="t" * 32, workers=3)
    cx = worker_settings(base, 3)
    assert isinstance(cx, CmdexecSettings)
    assert (cx.limit_runs, cx.auth_failure_rate, cx.limit_connections) == (2, 2.0 / 3, 341)
    # A worker's settings still say how many workers there are (its place is its Worker).
    assert (cx.workers, cx.metrics_host, cx.metrics_port) == (3, "127.0.0.1", 0)
    assert cx.token is not None
    assert cx.token.get_secret_value() == "t" * 32
    udp = worker_settings(UdpSettings(burst_per_source=1, rate_global=10.0), 2)
    assert isinstance(udp, UdpSettings)
    assert (udp.burst_per_source, udp.rate_global) == (1, 5.0)  # never below 1


@pytest.mark.parametrize("value", ["auto", "3"])
def test_workers_setting_takes_a_number_or_auto(value: str) -> None:
    settings = UdpSettings.load(["--workers", value])
    assert settings.worker_count == (cpu_count() if value == "auto" else 3)
    assert 1 <= cpu_count() <= len(os.sched_getaffinity(0))


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """A family's samples in a text exposition, by their labels."""
    families = text_string_to_metric_families(text)
    return {tuple(sorted(s.labels.items())): s.value
            for f in families for s in f.samples if s.name == name}  # fmt: skip


def test_gauges_add_up_by_their_declared_mode() -> None:
    """Each udp worker's socket has its own buffer of the same size: the instance shows that
    size (mode max), not the sum of the workers' (as it did). The per-worker view is there."""
    with service_process("wirekit_udp", "--port", "0", "--metrics-port", "0",
                         "--workers", "2") as proc:  # fmt: skip
        status, text = http_get(proc.url("/metrics"))
        assert status == 200
        instance = _samples(text, "udp_socket_receive_buffer_bytes")
        own = []
        for index in (0, 1):
            status, worker_text = http_get(proc.url(f"/workers/{index}/metrics"))
            assert status == 200
            own.append(_samples(worker_text, "udp_socket_receive_buffer_bytes")[()])
        assert own[0] == own[1] > 0  # each socket's SO_RCVBUF, as the kernel reports it
        assert instance == {(): own[0]}
        assert http_get(proc.url("/workers/2/metrics"))[0] == 404
        # Counters still add up: the connections gauge and datagram counters are sums.
        assert proc.value("udp_workers", state="up") == 2
        assert stop(proc) == 0


def test_an_info_metric_is_one_with_any_number_of_workers() -> None:
    env = {"WIREKIT_CMDEXEC_TOKEN": CMDEXEC_TOKEN, "WIREKIT_CMDEXEC_ALLOW_ROOT": "true"}
    args = ("--port", "0", "--metrics-port", "0", "--workers", "2")
    with service_process("wirekit_cmdexec", *args, env=env) as proc:
        status, text = http_get(proc.url("/metrics"))
        assert status == 200
        info = _samples(text, "cmdexec_config_info")
        assert list(info.values()) == [1.0], info  # one series, 1 (it was 2.0: summed)
        assert proc.value("cmdexec_runs_active") == 0
        assert stop(proc) == 0
