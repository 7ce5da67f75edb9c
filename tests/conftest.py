"""Integration fixtures: images built once per session, hardened containers, cleanup.

Docker is required. Without it these tests skip on a laptop, and fail when ``CI`` is set.
Ryuk (testcontainers' reaper) is off: its image cannot be pulled on registry-less machines, and
the fixtures remove what they create themselves.
"""

from __future__ import annotations

import os

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

import contextlib
import ipaddress
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
from docker.errors import DockerException, NotFound
from testcontainers.core.container import DockerContainer
from wirekit_testkit import VERSION, OtlpReceiver, Prometheus, free_port, http_ok, tool, wait_until

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("echo", "cmdexec", "udp", "probe")
#: The base the test images build FROM: CI builds wirekit-base:local (`make base-image`).
BASE_IMAGE = os.environ.get("WIREKIT_BASE_IMAGE", "wirekit-base:local")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(ROOT / "tests"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Docker is required in CI and does not answer: {exc}")
        pytest.skip(f"no Docker engine: {exc}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def images(docker_client: docker.DockerClient) -> Iterator[dict[str, str]]:
    """Build every service image once (layers cached across runs); remove the tags at the end."""
    subprocess.run(
        ["make", "-s", "wheelhouse", f"BIN={Path(sys.executable).parent}"],
        cwd=ROOT, check=True, timeout=600,
    )  # fmt: skip
    run_id = uuid.uuid4().hex[:8]
    built: dict[str, str] = {}
    try:
        for service in SERVICES:
            tag = f"wirekit-{service}:it-{run_id}"
            subprocess.run(
                ["docker", "build", "-q", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                 "--build-arg", f"VERSION={VERSION}", "--target", service, "-t", tag, "."],
                cwd=ROOT, check=True, timeout=900, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            built[service] = tag
        yield built
    finally:
        for tag in built.values():
            with contextlib.suppress(NotFound):
                docker_client.images.remove(tag, force=True)
        # The legacy builder keeps each multi-stage build's intermediate stage as an untagged image.
        docker_client.images.prune(filters={"dangling": True, "label": "org.wirekit.stage=build"})


@pytest.fixture
def start() -> Iterator[Callable[[DockerContainer], DockerContainer]]:
    """Start containers; stop and remove every one at the end of the test."""
    started: list[DockerContainer] = []

    def _start(container: DockerContainer) -> DockerContainer:
        started.append(container)  # before start(): a container that fails to start is removed too
        return container.start()

    yield _start
    for container in started:
        with contextlib.suppress(NotFound):
            container.stop()  # stop + remove (with volumes); a no-op if never created


@pytest.fixture(scope="session")
def docker_gateway(docker_client: docker.DockerClient) -> str:
    """The host's address on Docker's default bridge: where containers reach a test receiver."""
    config = docker_client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    # Older engines leave Gateway out for the default bridge: it is the subnet's first address.
    return str(config.get("Gateway") or ipaddress.ip_network(config["Subnet"])[1])


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[dict[str, int]], Prometheus]]:
    """Start Debian's prometheus on loopback, scraping the given targets every second."""
    procs: list[subprocess.Popen[bytes]] = []

    def _start(targets: dict[str, int], rule_files: tuple[Path, ...] = ()) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
            for job, port in targets.items()
        )
        rules = "".join(f"  - {path}\n" for path in rule_files)
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            + (f"rule_files:\n{rules}" if rules else "")
            + f"scrape_configs:\n{jobs}"
        )
        check = subprocess.run(
            [tool("promtool"), "check", "config", str(config)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    tool("prometheus"),
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


@pytest.fixture
def otlp_receiver(docker_gateway: str) -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver(docker_gateway)  # reachable from containers on the default bridge
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()
