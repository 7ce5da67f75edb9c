"""A real Prometheus server scrapes the echo container; its HTTP API sees the traffic we sent."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from testcontainers.core.container import DockerContainer
from wirekit_testkit import (
    free_port,
    hardened,
    host_port,
    http_ok,
    recv_exactly,
    wait_ready,
    wait_until,
)

from wirekit_framing import recv_frame, send_frame

ROOT = Path(__file__).resolve().parents[1]
Start = Callable[[DockerContainer], DockerContainer]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing (install Debian's prometheus package)")
        pytest.skip(f"{name} not installed")
    return path


def test_promtool_accepts_the_deploy_config() -> None:
    result = subprocess.run(
        [_tool("promtool"), "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str) -> list[dict[str, object]]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None  # type: ignore[index]


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[dict[str, int]], Prometheus]]:
    """Start Debian's prometheus on loopback, scraping the given targets every second."""
    procs: list[subprocess.Popen[bytes]] = []

    def _start(targets: dict[str, int]) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
            for job, port in targets.items()
        )
        config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n{jobs}")
        check = subprocess.run(
            [_tool("promtool"), "check", "config", str(config)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    _tool("prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(base + "/-/ready"), 60, "prometheus ready")
        return Prometheus(base)

    yield _start
    for proc in procs:  # stopped by PID, never by name
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


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
        wait_until(lambda e=expr, w=want: prom.value(e) == float(w), 30, f"{expr} == {want}")
