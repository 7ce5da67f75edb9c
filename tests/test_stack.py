"""`make stack-up` on a real Docker Swarm: 3 replicas of each service, Prometheus discovering every
replica, a rolling update under load, scaling, and a killed replica (docs/operations.md,
"Replicas on Docker Swarm").

The test deploys under a stack name and image tag of its own, talks to the replicas from a probe
container on the stack's attachable overlay network (tests/stack_probe.py), and removes what it
made: the stack (services, network, configs), its data volume, the Prometheus image tag,
and the swarm itself only if there was none before.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import docker
import pytest
from conftest import BASE_IMAGE, ROOT
from docker.errors import APIError, NotFound
from docker.models.containers import Container
from wirekit_testkit import wait_until

from wirekit_cmdexec.tokens import hash_token

REPLICAS = 3
PROBE = "/probe/stack_probe.py"
SERVICES = {"echo": 9700, "cmdexec": 9710, "udp": 9720}
#: deploy/prometheus/swarm.yml: scrape_interval and the DNS refresh_interval.
SCRAPE_S = REFRESH_S = 5.0
#: "Prometheus follows within two scrape intervals": a new replica is in DNS at once, in
#: Prometheus's targets at the next refresh, scraped within an interval after that; 5 s more
#: for a 2-core machine that also runs the swarm and the replicas.
FOLLOW_S = REFRESH_S + 2 * SCRAPE_S + 5.0


@dataclass
class Stack:
    name: str
    probe: Container
    token_file: Path
    policy_file: Path
    client: docker.DockerClient
    make: list[str]
    env: dict[str, str]

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def deploy(self) -> None:
        """`make stack-up`, as a user runs it on a stack that is already up."""
        up = subprocess.run([*self.make, "stack-up"], cwd=ROOT, capture_output=True, text=True,
                            timeout=900, check=False, env=self.env)  # fmt: skip
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]

    def cmdexec_hostnames(self, token: str) -> dict[str, str]:
        """Each cmdexec replica's address -> what `hostname` printed there, or the error."""
        answers = {}
        for ip in self.probe_json("resolve", "tasks.cmdexec"):
            code, out = self.probe.exec_run(
                ["wirekit-cmdexec-client", "run", "--host", ip, "--", "hostname"],
                environment={"WIREKIT_CMDEXEC_TOKEN": token},
            )
            text = out.decode(errors="replace").strip()
            answers[ip] = text if code == 0 else f"exit {code}: {text}"
        return answers

    def run(self, *args: str) -> str:
        code, out = self.probe.exec_run(list(args))
        text: str = out.decode(errors="replace")
        assert code == 0, f"{args} in the probe: {code}\n{text[-3000:]}"
        return text

    def probe_json(self, *args: str) -> Any:
        return json.loads(self.run("python3", PROBE, *args).splitlines()[-1])

    def up(self, service: str) -> dict[str, str]:
        """instance -> value of `up` for the service's job, as Prometheus has it now."""
        result = self.probe_json("query", f'up{{job="wirekit-{service}"}}')
        return {r["metric"]["instance"]: r["value"][1] for r in result}

    def task_addresses(self, service: str) -> set[str]:
        """The metrics addresses of the service's replicas, as the overlay's DNS has them."""
        ips = self.probe_json("resolve", f"tasks.{service}")
        return {f"{ip}:{SERVICES[service]}" for ip in ips}

    def running_tasks(self, service: str) -> list[dict[str, Any]]:
        svc = self.client.services.get(f"{self.name}_{service}")
        tasks: list[dict[str, Any]] = svc.tasks(filters={"desired-state": "running"})
        return [t for t in tasks if t["Status"]["State"] == "running"]

    def follows(self, service: str, replicas: int) -> bool:
        """Prometheus scrapes exactly the replicas DNS lists, all up, and there are `replicas`."""
        addresses = self.task_addresses(service)
        return len(addresses) == replicas and self.up(service) == dict.fromkeys(addresses, "1")

    def swarm(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(["docker", *args], capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip
        assert done.returncode == 0, f"docker {args}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done.stdout


def _swarm_state(client: docker.DockerClient) -> str:
    return str(client.info()["Swarm"]["LocalNodeState"])


@pytest.fixture(scope="module")
def stack(
    docker_client: docker.DockerClient,
    images: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    tag = images["echo"].split(":", 1)[1]
    name = f"wkit{uuid.uuid4().hex[:8]}"
    secrets = tmp_path_factory.mktemp("stack")
    token_file, policy_file = secrets / "cmdexec_token", secrets / "cmdexec-policy.yaml"
    make = ["make", "-s", f"IMAGE_TAG={tag}", f"SWARM_STACK={name}", f"BASE_IMAGE={BASE_IMAGE}",
            f"BIN={Path(sys.executable).parent}"]  # fmt: skip
    env = {**os.environ, "CMDEXEC_TOKEN_FILE": str(token_file),
           "CMDEXEC_POLICY_FILE": str(policy_file)}  # fmt: skip
    made_swarm = _swarm_state(docker_client) != "active"
    probe: Container | None = None
    try:
        up = subprocess.run([*make, "stack-up"], cwd=ROOT, capture_output=True, text=True,
                            timeout=900, check=False, env=env)  # fmt: skip
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert token_file.stat().st_mode & 0o077 == 0, "the token file is readable by others"
        probe = docker_client.containers.run(
            images["echo"], entrypoint=["sleep", "infinity"], detach=True, read_only=True,
            cap_drop=["ALL"], network=f"{name}_net", name=f"{name}-probe",
            volumes={str(ROOT / "tests/stack_probe.py"): {"bind": PROBE, "mode": "ro"}},
        )  # fmt: skip
        yield Stack(name, probe, token_file, policy_file, docker_client, make, env)
    finally:
        if probe is not None:
            with contextlib.suppress(NotFound):
                probe.remove(force=True)
        down = subprocess.run([*make, "stack-down"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, check=False, env=env)  # fmt: skip
        volume = f"{name}_prometheus-data"
        # The volume outlives the stack (as with `make down`); its container goes a moment later.
        for _ in range(60):
            try:
                docker_client.volumes.get(volume).remove()
            except NotFound:
                break
            except APIError:
                time.sleep(1)
        with contextlib.suppress(NotFound):
            docker_client.images.remove(f"wirekit-prometheus:{tag}", force=True)
        if made_swarm:
            docker_client.swarm.leave(force=True)
            with contextlib.suppress(NotFound):  # swarm init made it; leave does not remove it
                docker_client.networks.get("docker_gwbridge").remove()
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    assert name not in {n.name.split("_")[0] for n in docker_client.networks.list()}


def test_every_replica_runs_healthy_and_prometheus_scrapes_all_nine(stack: Stack) -> None:
    for service in SERVICES:
        assert len(stack.running_tasks(service)) == REPLICAS, service

    def healthy() -> bool:
        containers = stack.client.containers.list(
            filters={"label": f"com.docker.stack.namespace={stack.name}"}
        )
        prometheus = f"{stack.name}_prometheus"
        states = [c.attrs["State"].get("Health", {}).get("Status") for c in containers
                  if c.labels["com.docker.swarm.service.name"] != prometheus]  # fmt: skip
        return states == ["healthy"] * (REPLICAS * len(SERVICES) + 1)  # + the node's prober

    wait_until(healthy, 120, "9 healthy replicas and the prober")
    for service in SERVICES:
        wait_until(partial(stack.follows, service, REPLICAS), 60, f"Prometheus scraping {service}")
    # The node's prober too (one task: global on one node), found by Prometheus like the rest.
    wait_until(lambda: stack.up("probe") == dict.fromkeys(
        {f"{ip}:9730" for ip in stack.probe_json("resolve", "tasks.probe")}, "1") != {},
        60, "Prometheus scraping the prober")  # fmt: skip
    every = stack.probe_json("query", 'count(up{job=~"wirekit-.*"} == 1)')
    assert every[0]["value"][1] == str(REPLICAS * len(SERVICES) + 1)
    rules = stack.probe_json("query", "ALERTS")  # the rules are loaded and nothing fires
    assert [r for r in rules if r["metric"]["alertstate"] == "firing"] == []


def _probed(stack: Stack, module: str) -> dict[str, str]:
    """target -> probe_up of the node's prober for that module's targets, in Prometheus."""
    result = stack.probe_json("query", f'probe_up{{job="wirekit-probe", module="{module}"}}')
    return {r["metric"]["target"]: r["value"][1] for r in result}


def test_the_prober_probes_every_replica_and_follows_scaling(stack: Stack) -> None:
    """The global prober finds every udp and echo task by name (a full mesh with one node),
    every path answers, and a scaled service's new and gone replicas are followed."""

    def mesh(service: str, module: str, port: int) -> bool:
        want = {f"{ip}:{port}" for ip in stack.probe_json("resolve", f"tasks.{service}")}
        return _probed(stack, module) == dict.fromkeys(want, "1")

    wait_until(lambda: mesh("udp", "udp", 7200), 60, "every udp replica probed and up")
    wait_until(lambda: mesh("echo", "tcp-framed", 7001), 60, "every echo replica probed, up")
    lost = stack.probe_json("query", 'sum(probe_probes_lost_total{job="wirekit-probe"})')
    assert float(lost[0]["value"][1]) == 0
    stack.swarm("service", "scale", "--detach=false", f"{stack.name}_udp=4")
    try:
        # The prober resolves every 5 s; Prometheus scrapes it every 5 s.
        wait_until(lambda: len(_probed(stack, "udp")) == 4 and mesh("udp", "udp", 7200),
                   FOLLOW_S + 10, "the fourth udp replica probed")  # fmt: skip
    finally:
        stack.swarm("service", "scale", "--detach=false", f"{stack.name}_udp={REPLICAS}")
    wait_until(lambda: len(_probed(stack, "udp")) == REPLICAS and mesh("udp", "udp", 7200),
               FOLLOW_S + 10, "the removed replica's series gone")  # fmt: skip


def test_clients_on_the_network_reach_every_replica(stack: Stack) -> None:
    """dnsrr: the service name resolves to every replica; clients that pick among the
    addresses spread over all of them (echo, udp, and cmdexec with the policy's token)."""
    echo_ips = set(stack.probe_json("resolve", "tasks.echo"))
    reached = stack.probe_json("spread", "echo", "7000", "30")
    assert set(reached) == echo_ips, reached
    assert sum(reached.values()) == 30
    assert set(stack.probe_json("udp", "udp", "7200")) == set(
        stack.probe_json("resolve", "tasks.udp")
    )
    hostnames = set(stack.cmdexec_hostnames(stack.token).values())
    replica_ids = {c.id[:12] for c in stack.client.containers.list(
        filters={"label": f"com.docker.swarm.service.name={stack.name}_cmdexec"})}  # fmt: skip
    assert hostnames == replica_ids


def test_a_rolling_update_under_load_loses_no_frame(stack: Stack) -> None:
    """`docker service update --force`, one replica at a time, while reconnecting framed clients
    keep sending: no reply is owed when a connection ends cleanly, every frame is answered once,
    every replaced replica drained and exited 0, and the update completes."""
    before = {t["ID"] for t in stack.running_tasks("echo")}
    clients = subprocess.Popen(
        ["docker", "exec", "-i", stack.probe.id, "python3", PROBE,
         "framed", "echo", "7001", "6", "7"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert clients.stdout is not None
        assert json.loads(clients.stdout.readline()) == {"started": 6}
        time.sleep(2)  # the clients are connected and exchanging frames
        stack.swarm(
            "service", "update", "--force", "--detach=false", "--quiet", f"{stack.name}_echo"
        )
        time.sleep(2)  # and keep going on the new replicas
        out, err = clients.communicate("", timeout=120)
    finally:
        if clients.poll() is None:
            clients.kill()
            clients.wait(30)
    assert clients.returncode == 0, err[-3000:]
    result = json.loads(out.splitlines()[-1])
    counts = result["counts"]
    print("rolling update, client side:", result)  # shown with -rP
    assert result["errors"] == [], result
    assert counts.get("lost", 0) == 0, counts
    assert counts["made"] > 0
    assert counts["answered"] == counts["made"], counts
    assert counts["eof"] >= 1, counts  # the drained replicas ended connections cleanly
    svc = stack.client.services.get(f"{stack.name}_echo")
    assert svc.attrs["UpdateStatus"]["State"] == "completed", svc.attrs["UpdateStatus"]
    after = {t["ID"] for t in stack.running_tasks("echo")}
    assert len(after) == REPLICAS
    assert not after & before
    replaced = [t for t in svc.tasks() if t["ID"] in before]
    assert [t["Status"]["ContainerStatus"]["ExitCode"] for t in replaced] == [0] * REPLICAS
    new_ips = set(stack.probe_json("resolve", "tasks.echo"))
    assert new_ips & set(result["peers"]), result  # clients moved to the new replicas
    wait_until(lambda: stack.follows("echo", REPLICAS), FOLLOW_S, "Prometheus on the new replicas")


def test_prometheus_follows_scaling_within_two_scrape_intervals(stack: Stack) -> None:
    for replicas in (5, 2, REPLICAS):
        stack.swarm("service", "scale", "--detach=false", f"{stack.name}_echo={replicas}")
        wait_until(partial(stack.follows, "echo", replicas), FOLLOW_S,
                   f"Prometheus scraping {replicas} echo replicas")  # fmt: skip


def test_a_killed_replica_is_replaced_and_never_alerts(stack: Stack) -> None:
    """SIGKILL one replica's container: swarm starts another, the dead one leaves DNS and
    Prometheus's targets, the new one is scraped. WirekitTargetDown needs 1 minute of `up == 0`
    (deploy/prometheus/rules-tests): a replica replaced sooner never fires it."""
    victim_task = stack.running_tasks("echo")[0]
    victim = stack.client.containers.get(victim_task["Status"]["ContainerStatus"]["ContainerID"])
    victim_ip = victim.attrs["NetworkSettings"]["Networks"][f"{stack.name}_net"]["IPAddress"]
    victim.kill()

    def replaced() -> bool:
        tasks = stack.running_tasks("echo")
        return len(tasks) == REPLICAS and victim_task["ID"] not in {t["ID"] for t in tasks}

    wait_until(replaced, 120, "swarm to replace the killed replica")
    wait_until(lambda: stack.follows("echo", REPLICAS), 60, "Prometheus on the replacement")
    new_ips = set(stack.probe_json("resolve", "tasks.echo"))
    if victim_ip not in new_ips:  # the overlay may give the replacement the same address
        assert f"{victim_ip}:9700" not in stack.up("echo")
    firing = stack.probe_json("query", 'ALERTS{alertname="WirekitTargetDown", alertstate="firing"}')
    assert firing == []


def test_a_new_token_in_the_policy_rolls_over_every_replica(stack: Stack) -> None:
    """docs/operations.md: put the new token's hash in the policy file, `make stack-up` again.
    The stack gets a new config, cmdexec rolls over to it, the old config is removed, the new
    token works on every replica and the old one is refused."""
    old = stack.token
    configs_before = {c.name for c in stack.client.configs.list()}
    new = uuid.uuid4().hex + uuid.uuid4().hex
    stack.token_file.write_text(new + "\n")
    stack.policy_file.write_text(
        f"version: 1\nidentities:\n  admin:\n    tokens: ['{hash_token(new)}']\n"
    )
    stack.deploy()
    replica_ids = {c.id[:12] for c in stack.client.containers.list(
        filters={"label": f"com.docker.swarm.service.name={stack.name}_cmdexec"})}  # fmt: skip
    assert set(stack.cmdexec_hostnames(new).values()) == replica_ids
    refused = stack.cmdexec_hostnames(old)
    assert all("unauthorized: wrong token" in answer for answer in refused.values()), refused
    ours = {c.name for c in stack.client.configs.list()
            if c.name.startswith(f"{stack.name}_cmdexec_policy_")}  # fmt: skip
    assert len(ours) == 1
    assert not ours & configs_before
