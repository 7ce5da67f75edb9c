"""The echo image, run hardened with testcontainers: traffic, health, stop, bad settings."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
import pytest
from testcontainers.core.container import DockerContainer
from wirekit_testkit import (
    VERSION,
    hardened,
    host_port,
    recv_exactly,
    scrape,
    wait_ready,
    wait_until,
)

from wirekit_framing import FramingError, recv_frame, send_frame

PORTS = ("7000/tcp", "7001/tcp", "9700/tcp")
Start = Callable[[DockerContainer], DockerContainer]


def _started_echo(images: dict[str, str], start: Start, **env: str) -> DockerContainer:
    container = start(hardened(images["echo"], *PORTS, env=env))
    wait_ready(container)
    return container


def _session(port: int, mode: str, seed: int) -> int:
    rng = random.Random(seed)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        sent = 0
        for _ in range(5):
            payload = rng.randbytes(rng.choice([1, 100, 4096, 60_000]))
            if mode == "framed":
                send_frame(s, payload)
                assert recv_frame(s) == payload
                sent += len(payload) + 4
            else:
                s.sendall(payload)
                assert recv_exactly(s, len(payload)) == payload
                sent += len(payload)
        return sent


def test_many_concurrent_clients_get_byte_exact_echoes(
    images: dict[str, str], start: Start
) -> None:
    container = _started_echo(images, start)
    ports = {m: host_port(container, p) for m, p in (("raw", "7000/tcp"), ("framed", "7001/tcp"))}
    with ThreadPoolExecutor(max_workers=50) as pool:
        jobs = [pool.submit(_session, ports[m], m, i) for m in ("raw", "framed") for i in range(50)]
        assert all(job.result(timeout=120) > 0 for job in jobs)


def test_container_is_hardened_and_reports_healthy(
    images: dict[str, str], start: Start, docker_client: docker.DockerClient
) -> None:
    container = _started_echo(images, start)
    wrapped = container.get_wrapped_container()
    status = wait_until(
        lambda: (
            (wrapped.reload() or wrapped.attrs["State"].get("Health", {}).get("Status"))
            == "healthy"
        ),
        60,
        "Docker health status 'healthy'",
    )
    assert status
    attrs = wrapped.attrs
    assert attrs["Config"]["User"] == "10001:10001"
    assert attrs["HostConfig"]["ReadonlyRootfs"] is True
    assert attrs["HostConfig"]["CapDrop"] == ["ALL"]
    for binding in attrs["NetworkSettings"]["Ports"]["7000/tcp"]:
        assert binding["HostIp"] == "127.0.0.1"
    exit_code, output = wrapped.exec_run(["id", "-u"])
    assert (exit_code, output.strip()) == (0, b"10001")
    assert wrapped.exec_run(["sleep", "0"]).exit_code == 0  # the Kubernetes preStop hook
    image = docker_client.images.get(images["echo"])
    assert image.attrs["Config"]["Entrypoint"][:2] == ["/usr/bin/tini", "--"]
    labels = image.attrs["Config"]["Labels"]
    assert labels["org.opencontainers.image.title"] == "wirekit-echo"
    assert labels["org.opencontainers.image.version"] == VERSION  # the VERSION file
    _, out = wrapped.exec_run(["wirekit-echo", "--version"])
    assert out.decode().strip() == f"wirekit-echo {VERSION}"


def test_docker_stop_during_traffic_delivers_replies_and_exits_zero(
    images: dict[str, str], start: Start
) -> None:
    container = _started_echo(images, start, WIREKIT_ECHO_TIMEOUT_DRAIN_S="5")
    port = host_port(container, "7001/tcp")
    replies = [0] * 20
    failures: list[str] = []
    go = threading.Event()

    def ping_pong(i: int) -> None:
        rng = random.Random(i)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                while True:
                    payload = rng.randbytes(rng.choice([10, 1000, 50_000]))
                    try:
                        send_frame(s, payload)
                    except OSError:
                        return  # the server half-closed between two requests: fine
                    try:
                        reply = recv_frame(s)
                    except (FramingError, OSError) as exc:
                        failures.append(f"client {i}: reply cut: {exc!r}")
                        return
                    if reply is None:
                        return  # clean end of stream before this request was read: fine
                    if reply != payload:
                        failures.append(f"client {i}: wrong reply")
                        return
                    replies[i] += 1
                    if all(replies):
                        go.set()
        except OSError as exc:
            failures.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=ping_pong, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    # Stop only once every connection has been accepted and answered: a connection still in
    # the kernel's accept queue when the server stops accepting is reset (as with nginx or
    # HAProxy), and this test is about replies in flight on established connections.
    assert go.wait(30), f"not every client got a first reply: {replies} {failures}"
    wrapped = container.get_wrapped_container()
    wrapped.stop(timeout=20)  # SIGTERM, then (after 20 s) SIGKILL: we want the former to suffice
    for t in threads:
        t.join(30)
    wrapped.reload()
    assert wrapped.attrs["State"]["ExitCode"] == 0
    assert failures == []
    assert sum(replies) > 0
    logs = wrapped.logs().decode()
    assert "every connection finished" in logs or "closed the rest" in logs


def _process_tree(top: dict[str, Any], root: str) -> list[list[str]]:
    """The processes of `docker top` descended from the container's init (`root`, host PID),
    itself included. A HEALTHCHECK run (a `docker exec`) is a child of the runtime's shim, not
    of init, so it is left out however the two happen to coincide."""
    pid, ppid = top["Titles"].index("PID"), top["Titles"].index("PPID")
    rows = top["Processes"]
    tree = {root}
    grew = True
    while grew:
        grew = False
        for row in rows:
            if row[ppid] in tree and row[pid] not in tree:
                tree.add(row[pid])
                grew = True
    return [row for row in rows if row[pid] in tree]


def test_two_workers_in_the_image_serve_one_instance(images: dict[str, str], start: Start) -> None:
    """--workers in the hardened image (non-root, read-only, no capability): both workers
    serve through the published ports, /metrics adds them up, docker stop drains them: 0."""
    container = _started_echo(images, start, WIREKIT_ECHO_WORKERS="2")
    metrics = f"http://127.0.0.1:{host_port(container, '9700/tcp')}/metrics"
    wait_until(lambda: scrape(metrics, "echo_workers", state="up") == 2, 30, "2 workers up")
    ports = {m: host_port(container, p) for m, p in (("raw", "7000/tcp"), ("framed", "7001/tcp"))}
    sent = sum(_session(ports["raw"], "raw", seed) for seed in range(20))
    wait_until(lambda: scrape(metrics, "echo_received_bytes_total", mode="raw") == sent, 10, "sum")
    wrapped = container.get_wrapped_container()
    wrapped.reload()
    tree = _process_tree(wrapped.top(), root=str(wrapped.attrs["State"]["Pid"]))
    assert len(tree) == 4, tree  # tini, the supervisor, two workers
    wrapped.stop(timeout=20)
    wrapped.reload()
    assert wrapped.attrs["State"]["ExitCode"] == 0
    logs = wrapped.logs().decode()
    assert "Traceback" not in logs
    assert '"level": "ERROR"' not in logs


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        pytest.param({"WIREKIT_ECHO_RAW_PORT": "-1"}, "raw_port", id="negative-port"),
        pytest.param({"WIREKIT_ECHO_TIMEOUT_IDLE_S": "soon"}, "timeout_idle_s", id="not-a-number"),
    ],
)
def test_bad_settings_exit_nonzero_with_one_clear_line(
    images: dict[str, str], docker_client: docker.DockerClient, env: dict[str, str], needle: str
) -> None:
    container = docker_client.containers.run(
        images["echo"], environment=env, detach=True, read_only=True, cap_drop=["ALL"]
    )
    try:
        result = container.wait(timeout=60)
        logs = container.logs().decode().strip().splitlines()
    finally:
        container.remove(force=True)
    assert result["StatusCode"] == 2
    assert len(logs) == 1, logs
    assert logs[0].startswith("wirekit-echo: invalid settings:")
    assert needle in logs[0]


def test_nc_echoes_through_the_published_port(images: dict[str, str], start: Start) -> None:
    nc = shutil.which("nc")
    if nc is None:
        if os.environ.get("CI"):
            pytest.fail("nc is missing (install netcat-openbsd)")
        pytest.skip("nc not installed")
    container = _started_echo(images, start)
    port = host_port(container, "7000/tcp")
    result = subprocess.run(
        [nc, "-N", "127.0.0.1", str(port)], input=b"hello from nc\n",
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.stdout == b"hello from nc\n"


def test_the_images_run_the_compiled_build_where_a_compiler_made_it(
    images: dict[str, str], docker_client: docker.DockerClient, start: Start
) -> None:
    """`make wheelhouse` compiles the per-message paths (mypyc, C) where a C compiler is found and
    the venv's Python is 3.11 (the images'), and builds pure-Python wheels otherwise: the images
    run what was built, and say so."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    expected = "compiled" if compiler and sys.version_info[:2] == (3, 11) else "pure"
    command = ["-m", "wirekit_servicekit.accel", "--expect", expected,
               "wirekit_echo", "wirekit_udp"]  # fmt: skip
    out = docker_client.containers.run(
        images["echo"], command, entrypoint="python3", remove=True, read_only=True,
        cap_drop=["ALL"], network_disabled=True,
    )  # fmt: skip
    lines = out.decode().splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == [expected] * 3, lines  # codec, echo, udp
    container = _started_echo(images, start)
    starting = [
        json.loads(line)
        for line in container.get_wrapped_container().logs().decode().splitlines()
        if '"starting wirekit-echo"' in line
    ]
    assert [line.get("build") for line in starting] == [expected], starting
