"""A real Prometheus server scrapes the echo container; its HTTP API sees the traffic we sent."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from testcontainers.core.container import DockerContainer
from wirekit_testkit import (
    Prometheus,
    hardened,
    host_port,
    recv_exactly,
    tool,
    wait_ready,
    wait_until,
)

from wirekit_framing import recv_frame, send_frame

ROOT = Path(__file__).resolve().parents[1]
Start = Callable[[DockerContainer], DockerContainer]


def test_promtool_accepts_the_deploy_config() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_echo_container_and_sees_the_bytes_sent(
    images: dict[str, str], start: Start, prometheus_for: Callable[[dict[str, int]], Prometheus]
) -> None:
    container = start(hardened(images["echo"], "7000/tcp", "7001/tcp", "9700/tcp"))
    wait_ready(container)
    metrics_port = host_port(container, "9700/tcp")
    prom = prometheus_for({"wirekit-echo": metrics_port})

    raw_payload = os.urandom(12_345)
    with socket.create_connection(("127.0.0.1", host_port(container, "7000/tcp")), 10) as s:
        s.sendall(raw_payload)
        assert recv_exactly(s, len(raw_payload)) == raw_payload
    frames = [b"", b"a" * 100, os.urandom(5000)]
    with socket.create_connection(("127.0.0.1", host_port(container, "7001/tcp")), 10) as s:
        for frame in frames:
            send_frame(s, frame)
            assert recv_frame(s) == frame
    framed_bytes = sum(len(f) + 4 for f in frames)

    wait_until(lambda: prom.value('up{job="wirekit-echo"}') == 1.0, 60, "up == 1")
    expected = {
        'echo_received_bytes_total{mode="raw"}': len(raw_payload),
        'echo_sent_bytes_total{mode="raw"}': len(raw_payload),
        'echo_received_bytes_total{mode="framed"}': framed_bytes,
        'echo_sent_bytes_total{mode="framed"}': framed_bytes,
        "echo_frames_total": len(frames),
        'echo_connections_opened_total{mode="raw"}': 1,
    }
    for expr, want in expected.items():
        wait_until(prom.equals(expr, float(want)), 30, f"{expr} == {want}")
