"""The deploy kit is valid as written, and `make up OFFLINE=1` gets to an alert firing."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from docker.errors import NotFound
from wirekit_testkit import Prometheus, wait_until

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> list[str]:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    if os.environ.get("CI"):
        pytest.fail("neither `docker compose` nor docker-compose is installed")
    pytest.skip("no compose tool")


def test_compose_file_is_valid() -> None:
    result = subprocess.run(
        [*_compose(), "-f", str(ROOT / "deploy/compose.yaml"), "config", "-q"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_publishes_on_loopback_only_and_runs_hardened() -> None:
    text = (ROOT / "deploy/compose.yaml").read_text()
    published = re.findall(r'^\s*-\s*"([^"]*:\d+:\d+(?:/udp)?)"', text, flags=re.MULTILINE)
    assert len(published) >= 9  # echo x3, cmdexec x2, udp x2, prometheus, jaeger
    for mapping in published:
        assert mapping.startswith("127.0.0.1:"), mapping
    services = text[text.index("  echo:") : text.index("  prometheus:")]
    assert services.count("<<: *hardened") == 3
    for line in ("read_only: true", "cap_drop: [ALL]", "no-new-privileges:true"):
        assert line in text


def _stack_services() -> dict[str, Any]:
    """deploy/stack.yaml as `docker stack deploy` reads it (variables and anchors resolved)."""
    docker = shutil.which("docker")
    if docker is None:
        if os.environ.get("CI"):
            pytest.fail("docker (the CLI) is not installed")
        pytest.skip("no docker CLI")
    env = {**os.environ, "IMAGE_TAG": "t", "CMDEXEC_POLICY_FILE": "/dev/null", "SWARM_STACK": "s",
           "CMDEXEC_POLICY_VERSION": "1", "PROMETHEUS_CONFIG_VERSION": "2",
           "PROMETHEUS_RULES_VERSION": "3"}  # fmt: skip
    command = [docker, "stack", "config", "-c", "deploy/stack.yaml"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    return services


def test_stack_runs_every_service_hardened_replicated_and_reachable_by_dns() -> None:
    """What the swarm test cannot see from outside: every service hardened, on dnsrr (no VIP,
    no ingress: nothing published), updated start-first with rollback, stopped only after the
    drain (the services' 8 s timeout_drain_s), limited in CPU and memory."""
    services = _stack_services()
    assert set(services) == {"echo", "cmdexec", "udp", "prometheus"}
    for name, svc in services.items():
        assert svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"], name
        assert svc["deploy"]["endpoint_mode"] == "dnsrr", name
        assert "ports" not in svc, name
        assert "limits" in svc["deploy"]["resources"], name
    for name in ("echo", "cmdexec", "udp"):
        svc = services[name]
        assert svc["image"] == f"wirekit-{name}:t"
        assert svc["deploy"]["replicas"] == 3
        update = svc["deploy"]["update_config"]
        assert (update["order"], update["parallelism"], update["failure_action"]) == (
            "start-first",
            1,
            "rollback",
        )
        assert "rollback_config" in svc["deploy"]
        assert svc["healthcheck"]["test"][-1] == str(
            {"echo": 9700, "cmdexec": 9710, "udp": 9720}[name]
        )
        grace = float(svc["stop_grace_period"].removesuffix("s"))
        assert grace > 8 + 2, name  # the drain, then the last replies' 2 s
        assert {"type": "tmpfs", "target": "/tmp", "tmpfs": {"size": 16777216}} in svc["volumes"]
    policy = services["cmdexec"]["configs"][0]
    assert (policy["target"], policy["uid"], policy["mode"]) == (
        "/etc/wirekit/cmdexec-policy.yaml",
        "10001",
        0o440,
    )
    assert services["cmdexec"]["environment"]["WIREKIT_CMDEXEC_POLICY_FILE"] == policy["target"]


def test_offline_compose_override_is_valid() -> None:
    files = [
        "-f",
        str(ROOT / "deploy/compose.yaml"),
        "-f",
        str(ROOT / "deploy/compose.offline.yaml"),
    ]
    result = subprocess.run(
        [*_compose(), *files, "config", "--services"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # Profiled-out services are listed too; what matters is that nothing is pulled by default.
    assert {"echo", "cmdexec", "udp", "prometheus"} <= set(result.stdout.split())


# -- the stack, from `make up` to an alert, as docs/operations.md walks it ------------------------
#: What compose.yaml publishes on 127.0.0.1 (TCP); the stack test needs them free.
STACK_TCP_PORTS = (7000, 7001, 9700, 7100, 9710, 9720, 9090)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def offline_stack(docker_client: docker.DockerClient, tmp_path: Path) -> Iterator[list[str]]:
    """`make up OFFLINE=1` under a project and tag of its own; everything removed at the end."""
    busy = [p for p in STACK_TCP_PORTS if not _port_free(p)]
    if busy:
        message = f"the stack's ports are in use on 127.0.0.1 (is `make up` running?): {busy}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    run_id = uuid.uuid4().hex[:8]
    name, tag = f"wirekit-it-{run_id}", f"it-{run_id}"
    make = ["make", "-s", "OFFLINE=1", f"STACK_NAME={name}", f"IMAGE_TAG={tag}",
            f"BIN={Path(sys.executable).parent}"]  # fmt: skip
    compose = [*_compose(), "-p", name, "-f", "deploy/compose.yaml",
               "-f", "deploy/compose.offline.yaml"]  # fmt: skip
    # cmdexec's token and policy: made by `make up` here, not in the checkout's deploy/secrets.
    env = {**os.environ, "CMDEXEC_TOKEN_FILE": str(tmp_path / "token"),
           "CMDEXEC_POLICY_FILE": str(tmp_path / "policy.yaml")}  # fmt: skip
    try:
        up = subprocess.run([*make, "up"], cwd=ROOT, capture_output=True, text=True,
                            timeout=900, check=False, env=env)  # fmt: skip
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield compose
    finally:
        down = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            down = subprocess.run([*make, "down"], cwd=ROOT, capture_output=True, text=True,
                                  timeout=300, check=False, env=env)  # fmt: skip
        subprocess.run([*compose, "down", "-v"], cwd=ROOT, capture_output=True, timeout=300,
                       check=False, env={**env, "IMAGE_TAG": tag})  # fmt: skip
        for image in ("echo", "cmdexec", "udp", "prometheus"):
            with contextlib.suppress(NotFound):
                docker_client.images.remove(f"wirekit-{image}:{tag}", force=True)
        docker_client.images.prune(filters={"dangling": True, "label": "org.wirekit.stage=build"})
    assert down is not None, "`make down` timed out"
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]


def test_make_up_offline_gets_to_alerts_firing(offline_stack: list[str], tmp_path: Path) -> None:
    """docs/operations.md, on a machine without a registry: `make up OFFLINE=1`, every target
    up, then both of its "see an alert fire" recipes: wrong cmdexec tokens and a stopped udp."""
    prom = Prometheus("http://127.0.0.1:9090")

    def every_target_up() -> bool:
        try:
            ups = {str(r["metric"]["job"]): r["value"][1] for r in prom.query("up")}  # type: ignore[index]
        except OSError:
            return False
        return ups == {"wirekit-echo": "1", "wirekit-cmdexec": "1", "wirekit-udp": "1"}

    wait_until(every_target_up, 120, "Prometheus in the stack scraping all three services")
    # A scrape that failed while a service was still starting may leave an alert pending until
    # the next rule evaluation; a healthy stack then has none.
    wait_until(lambda: prom.alerts() == [], 60, "no alert in the healthy stack")

    stop = subprocess.run([*offline_stack, "stop", "udp"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert stop.returncode == 0, stop.stderr
    client = Path(sys.executable).parent / "wirekit-cmdexec-client"
    # The policy `make up` made and mounted: its identity's token runs a command.
    right = subprocess.run([str(client), "run", "--token-file", str(tmp_path / "token"), "--",
                            "echo", "admin"], capture_output=True, text=True, timeout=60,
                           check=False)  # fmt: skip
    assert (right.returncode, right.stdout) == (0, "admin\n"), right.stderr
    for _ in range(11):
        guess = subprocess.run([str(client), "run", "--", "true"], capture_output=True,
                               text=True, timeout=60, check=False,
                               env={**os.environ, "WIREKIT_CMDEXEC_TOKEN": "wrong"})  # fmt: skip
        assert guess.returncode != 0
        assert "unauthorized" in guess.stderr, guess.stderr

    def firing(name: str, job: str) -> bool:
        return any(a["labels"]["alertname"] == name and a["labels"].get("job") == job
                   and a["state"] == "firing" for a in prom.alerts())  # fmt: skip

    wait_until(lambda: firing("WirekitCmdexecAuthFailures", "wirekit-cmdexec"), 120,
               "WirekitCmdexecAuthFailures firing in the stack")  # fmt: skip
    wait_until(lambda: firing("WirekitTargetDown", "wirekit-udp"), 180,
               "WirekitTargetDown firing for the stopped udp")  # fmt: skip
    assert not firing("WirekitTargetDown", "wirekit-echo")
