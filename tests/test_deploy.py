"""The deploy kit is valid as written, and `make up OFFLINE=1` gets to an alert firing."""

from __future__ import annotations

import contextlib
import ipaddress
import json
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
from wirekit_testkit import Prometheus, scrape, wait_until

from wirekit_framing import FramingError, encode, recv_frame

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
    assert len(published) >= 10  # echo x3, cmdexec x2, udp x2, probe, prometheus, jaeger
    for mapping in published:
        assert mapping.startswith("127.0.0.1:"), mapping
    services = text[text.index("  echo:") : text.index("  prometheus:")]
    assert services.count("<<: *hardened") == 4
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
    assert set(services) == {"echo", "cmdexec", "udp", "probe", "prometheus"}
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
    # One prober per node, probing every replica of udp and echo by their tasks' names.
    probe = services["probe"]
    assert probe["deploy"]["mode"] == "global"
    assert json.loads(probe["environment"]["WIREKIT_PROBE_TARGETS"]) == [
        "udp://tasks.udp:7200", "tcp-framed://tasks.echo:7001"]  # fmt: skip
    assert probe["healthcheck"]["test"][-1] == "9730"


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
STACK_TCP_PORTS = (7000, 7001, 9700, 7100, 9710, 9720, 9730, 9090)


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
        for image in ("echo", "cmdexec", "udp", "probe", "prometheus"):
            with contextlib.suppress(NotFound):
                docker_client.images.remove(f"wirekit-{image}:{tag}", force=True)
        docker_client.images.prune(filters={"dangling": True, "label": "org.wirekit.stage=build"})
    assert down is not None, "`make down` timed out"
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]


def test_make_up_offline_gets_to_alerts_firing(offline_stack: list[str], tmp_path: Path) -> None:
    """docs/operations.md, on a machine without a registry: `make up OFFLINE=1`, every target
    up (the prober's too), then both of its "see an alert fire" recipes: wrong cmdexec tokens
    and a stopped udp -- which the prober reports as well."""
    prom = Prometheus("http://127.0.0.1:9090")

    def every_target_up() -> bool:
        try:
            ups = {str(r["metric"]["job"]): r["value"][1] for r in prom.query("up")}  # type: ignore[index]
        except OSError:
            return False
        return ups == {"wirekit-echo": "1", "wirekit-cmdexec": "1", "wirekit-udp": "1",
                       "wirekit-probe": "1"}  # fmt: skip

    wait_until(every_target_up, 120, "Prometheus in the stack scraping all four services")
    # The prober in the stack reaches its three targets by name.
    wait_until(lambda: prom.value("sum(probe_up)") == 3.0, 120, "the prober's targets up")
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
    # The prober saw it too: its udp target stopped answering (the name's last address is kept).
    wait_until(lambda: any(a["labels"]["alertname"] == "WirekitProbeTargetUnreachable"
                           and a["labels"].get("module") == "udp" and a["state"] == "firing"
                           for a in prom.alerts()), 240,
               "WirekitProbeTargetUnreachable firing for udp")  # fmt: skip


# -- the compose profile "proxy": HAProxy in front of echo-proxied (PROXY protocol v2) -----------
PROXY_SERVICES = {"echo-proxied", "haproxy"}
#: What the profile publishes on 127.0.0.1: HAProxy's raw and framed fronts, echo-proxied's metrics.
PROXY_TCP_PORTS = (7400, 7401, 9702)
ONLINE = ("deploy/compose.yaml",)
OFFLINE = ("deploy/compose.yaml", "deploy/compose.offline.yaml")


def _compose_config(files: tuple[str, ...], *, profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    """The files as compose resolves them (no BASE_IMAGE, IMAGE_TAG or PROXY_SUBNET from the
    caller's environment: the defaults as written)."""
    args = [*(a for f in files for a in ("-f", str(ROOT / f))),
            *(a for p in profiles for a in ("--profile", p))]  # fmt: skip
    env = {k: v for k, v in os.environ.items()
           if k not in ("BASE_IMAGE", "IMAGE_TAG", "PROXY_SUBNET")}  # fmt: skip
    for extra in (["-q"], []):
        result = subprocess.run([*_compose(), *args, "config", *extra], capture_output=True,
                                text=True, timeout=60, check=False, env=env)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def _enabled(services: dict[str, Any], profiles: tuple[str, ...] = ()) -> set[str]:
    """What `up` starts: compose v1's `config` (and `config --services`) lists profiled-out
    services too, so this is the rule `up` applies: no profile, or one that is enabled."""
    return {name for name, svc in services.items()
            if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)}  # fmt: skip


def _host_ips(svc: dict[str, Any]) -> list[str]:
    """The host address of each published port, in v1's short ("IP:HOST:CONTAINER/tcp") and
    v2's long ({host_ip, published, target}) forms."""
    return [p["host_ip"] if isinstance(p, dict) else str(p).rsplit(":", 2)[0]
            for p in svc["ports"]]  # fmt: skip


@pytest.mark.parametrize("files", [ONLINE, OFFLINE], ids=["compose", "compose-offline"])
def test_proxy_profile_is_opt_in_loopback_only_and_hardened(files: tuple[str, ...]) -> None:
    default = _compose_config(files)
    services = default["services"]
    before = {"echo", "cmdexec", "udp", "probe", "prometheus"} | (set() if files == OFFLINE
                                                         else {"grafana", "jaeger"})  # fmt: skip
    assert _enabled(services) == before  # `make up` without the profile: as it was
    with_proxy = _compose_config(files, profiles=("proxy",))
    services = with_proxy["services"]
    assert _enabled(services, ("proxy",)) == before | PROXY_SERVICES
    for name in PROXY_SERVICES:
        svc = services[name]
        assert svc["profiles"] == ["proxy"], name
        assert _host_ips(svc), name
        assert set(_host_ips(svc)) == {"127.0.0.1"}, (name, svc["ports"])
        assert svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert "privileged" not in svc, name
        assert "cap_add" not in svc, name
    echo, haproxy = services["echo-proxied"], services["haproxy"]
    assert echo["image"] == services["echo"]["image"]
    assert echo["build"] == services["echo"]["build"]
    # The one network echo-proxied takes headers from, and only HAProxy (and itself) is on it.
    subnet = with_proxy["networks"]["proxy"]["ipam"]["config"][0]["subnet"]
    assert echo["environment"]["WIREKIT_ECHO_PROXY_PROTOCOL"] == "v2"
    assert json.loads(echo["environment"]["WIREKIT_ECHO_PROXY_TRUSTED"]) == [subnet]
    assert set(haproxy["networks"]) == {"proxy"}
    assert [n for n, s in services.items() if "proxy" in (s.get("networks") or {})] == sorted(
        PROXY_SERVICES
    )
    assert haproxy["image"] == "wirekit-haproxy:0.1.0"
    assert haproxy["volumes"][0].endswith(":/usr/local/etc/haproxy/haproxy.cfg:ro")
    if files == OFFLINE:  # built on the local base, as Prometheus; no Jaeger to send spans to
        assert haproxy["build"]["args"]["BASE_IMAGE"] == "wirekit-base:local"
        assert echo["environment"]["OTEL_TRACES_EXPORTER"] == "none"


def _free_subnet(client: docker.DockerClient) -> str:
    """The profile's default subnet, or the next /24 no Docker network uses (a `make up` of the
    checkout with compose v1 holds the default one: v1 creates every network in the file). In
    10.89.0.0/16: outside Docker's default address pools (172.17-31.0.0/16, 192.168.0.0/16),
    from which compose takes the project's other networks while this one is made."""
    taken = [ipaddress.ip_network(config["Subnet"]) for network in client.networks.list()
             for config in (network.attrs.get("IPAM") or {}).get("Config") or []
             if "Subnet" in config]  # fmt: skip
    for third in range(89, 256):
        candidate = ipaddress.ip_network(f"10.89.{third}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return str(candidate)
    pytest.fail(f"no free /24 in 10.89.89.0-10.89.255.0 for the proxy network: {taken}")


@pytest.fixture
def proxy_stack(docker_client: docker.DockerClient, images: dict[str, str]) -> Iterator[list[str]]:
    """echo-proxied and HAProxy from compose.yaml's profile "proxy" (offline override: the local
    base, no traces), on the session's echo image and a HAProxy image built here, under a project
    of their own; everything removed at the end."""
    busy = [p for p in PROXY_TCP_PORTS if not _port_free(p)]
    if busy:
        message = (f"the proxy profile's ports are in use on 127.0.0.1 (is `make up "
                   f"PROFILES=proxy` running?): {busy}")  # fmt: skip
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    tag = images["echo"].split(":", 1)[1]  # the session's images: wirekit-<service>:it-<run>
    name = f"wirekit-it-proxy-{uuid.uuid4().hex[:8]}"
    base = os.environ.get("WIREKIT_BASE_IMAGE", "wirekit-base:local")
    env = {**os.environ, "IMAGE_TAG": tag, "BASE_IMAGE": base,
           "PROXY_SUBNET": _free_subnet(docker_client)}  # fmt: skip
    compose = [*_compose(), "-p", name, *(a for f in OFFLINE for a in ("-f", f)),
               "--profile", "proxy"]  # fmt: skip
    try:
        build = subprocess.run(
            ["docker", "build", "-q", "--build-arg", f"BASE_IMAGE={base}",
             "-t", f"wirekit-haproxy:{tag}", "deploy/haproxy"],
            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
        up = subprocess.run([*compose, "up", "-d", "--no-build", "echo-proxied", "haproxy"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                            env=env)  # fmt: skip
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield [*compose]
    finally:
        subprocess.run([*compose, "down", "-v", "--timeout", "10"], cwd=ROOT,
                       capture_output=True, timeout=300, check=False, env=env)  # fmt: skip
        with contextlib.suppress(NotFound):
            docker_client.images.remove(f"wirekit-haproxy:{tag}", force=True)


def _echo_through(port: int, payload: bytes, *, framed: bool) -> bytes | None:
    """One connection to 127.0.0.1:``port``: ``payload`` sent (as a frame, or raw), its echo
    read back; None when the path is not there yet (docker-proxy or HAProxy closing it)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            if framed:
                sock.sendall(encode(payload))
                return recv_frame(sock)
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = sock.recv(len(payload) - len(got))
                if not chunk:
                    return None
                got += chunk
            return got
    except (OSError, FramingError):
        return None


def test_proxy_profile_echoes_through_haproxy_with_proxy_v2(proxy_stack: list[str]) -> None:
    """docs/operations.md's `--profile proxy`: a framed and a raw echo through HAProxy, whose
    PROXY v2 header echo-proxied accepts (HAProxy is on its trusted network). HAProxy's health
    checks (v2 LOCAL headers) are counted as such and never as connections. The client address
    the header names is docker-proxy's gateway here, so only the header's acceptance is checked."""
    metrics = "http://127.0.0.1:9702/metrics"

    def headers(mode: str, result: str) -> float:
        return scrape(metrics, "echo_proxy_headers_total", mode=mode, result=result)

    def opened(mode: str) -> float:
        return scrape(metrics, "echo_connections_opened_total", mode=mode)

    payload = b"through haproxy \x00\xff" + uuid.uuid4().bytes
    attempts = 0

    def framed_echo() -> bool:
        nonlocal attempts
        attempts += 1
        return _echo_through(7401, payload, framed=True) == payload

    try:
        wait_until(framed_echo, 60, "a framed echo through HAProxy on 127.0.0.1:7401")
        assert _echo_through(7400, b"raw through haproxy\n", framed=False) == (
            b"raw through haproxy\n"
        )
    except AssertionError:
        logs = subprocess.run([*proxy_stack, "logs", "--no-color", "--tail", "40"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        raise AssertionError(f"no echo through HAProxy; logs:\n{logs.stdout[-6000:]}") from None

    # Every connection echo-proxied served came through HAProxy with an accepted header: ours.
    served = opened("framed")
    assert 1 <= served <= attempts
    assert headers("framed", "accepted") == served
    assert headers("raw", "accepted") == opened("raw") == 1
    for mode in ("framed", "raw"):
        assert headers(mode, "untrusted") == 0, mode
        assert headers(mode, "signature") == 0, mode

    # HAProxy checks each server every 2 s: its checks arrive, and are not connections.
    def checks(mode: str) -> float:
        return headers(mode, "local") + headers(mode, "empty")

    seen = checks("framed")
    wait_until(lambda: checks("framed") >= seen + 2, 15, "two more HAProxy health checks")
    assert checks("raw") >= 1
    assert opened("framed") == served
    assert opened("raw") == 1
