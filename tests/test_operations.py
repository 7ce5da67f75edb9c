"""The operations kit, checked: metric names against the running services, Prometheus rules and
their unit tests, Grafana provisioning, and the Kubernetes manifests against the schemas."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from wirekit_testkit import service_process, tool, wait_until

from wirekit_cmdexec.client import CmdexecClient, RemoteError
from wirekit_servicekit.settings import TcpServiceSettings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.32.0"
SERVICES = {"echo": "wirekit_echo", "cmdexec": "wirekit_cmdexec", "udp": "wirekit_udp"}
METRIC = re.compile(r"\b((?:echo|cmdexec|udp|probe|process)_[a-z_]+)\b")


# -- the names the services really export ------------------------------------------------------
@pytest.fixture(scope="module")
def exported_names() -> Iterator[set[str]]:
    """Start the services and the prober for real and collect every sample name from their
    /metrics."""
    names = {"up"}
    env = {"PATH": "/usr/bin:/bin", "WIREKIT_CMDEXEC_TOKEN": "ops-wjKPM2YiFjTX8b0Hn92Sdfuzo8jSygo_",
           "WIREKIT_CMDEXEC_ALLOW_ROOT": "true"}  # the tests run as root  # fmt: skip
    with contextlib.ExitStack() as stack:
        procs = {}
        for module in SERVICES.values():
            ports0 = ["--raw-port", "0", "--framed-port", "0"] if module == "wirekit_echo" else [
                "--port", "0"]  # fmt: skip
            procs[module] = stack.enter_context(
                service_process(module, "--metrics-port", "0", *ports0, env=env)
            )
        # The prober, with a target of each module (its per-target families have samples).
        udp, echo = procs["wirekit_udp"].ports["udp"], procs["wirekit_echo"].ports
        targets = [f"udp://127.0.0.1:{udp}", f"tcp-framed://127.0.0.1:{echo['framed']}",
                   f"tcp-connect://127.0.0.1:{echo['raw']}"]  # fmt: skip
        prober = stack.enter_context(service_process(
            "wirekit_probe", "--metrics-port", "0", "--targets", json.dumps(targets),
            "--rate-per-target", "20"))  # fmt: skip
        wait_until(lambda: "probe_rtt_seconds_bucket" in urllib.request.urlopen(
            prober.url("/metrics"), timeout=10).read().decode(), 10, "probe series")  # fmt: skip
        for proc in [*procs.values(), prober]:
            with urllib.request.urlopen(proc.url("/metrics"), timeout=10) as resp:
                text = resp.read().decode()
            for family in text_string_to_metric_families(text):
                names.update(sample.name for sample in family.samples)
        yield names


def _rule_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus/rules/wirekit.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    out: list[str] = []
    for path in sorted((DEPLOY / "grafana/dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            out.extend(t["expr"] for t in panel.get("targets", []))
    return out


@pytest.mark.parametrize("source", ["rules", "dashboards"])
def test_every_metric_name_used_exists_in_the_real_metrics(
    exported_names: set[str], source: str
) -> None:
    exprs = _rule_exprs() if source == "rules" else _dashboard_exprs()
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert len(used) >= 8
    missing = sorted(used - exported_names)
    assert missing == [], f"{source} use metrics no service exports: {missing}"


def test_the_name_check_can_fail(exported_names: set[str]) -> None:
    assert "echo_no_such_metric_total" not in exported_names
    assert "echo_received_bytes_total" in exported_names
    assert "cmdexec_runs_total" in exported_names
    assert "udp_datagrams_dropped_total" in exported_names


# -- Prometheus -------------------------------------------------------------------------------
def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd=DEPLOY / "prometheus")  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("check", "config", "prometheus.yml"), id="check-config"),
        pytest.param(("check", "config", "swarm.yml"), id="check-config-swarm"),
        pytest.param(("check", "rules", "rules/wirekit.yml"), id="check-rules"),
        pytest.param(("test", "rules", "rules-tests/wirekit.test.yaml"), id="test-rules"),
    ],
)
def test_promtool(args: tuple[str, ...]) -> None:
    result = _promtool(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_severity_summary_and_a_unit_test() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus/rules/wirekit.yml").read_text())
    tests = (DEPLOY / "prometheus/rules-tests/wirekit.test.yaml").read_text()
    operations = (ROOT / "docs/operations.md").read_text()
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 7
    for rule in alerts:
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"]
        assert f"alertname: {rule['alert']}" in tests, f"{rule['alert']} has no unit test"
        assert rule["alert"] in operations, f"{rule['alert']} is not explained in operations.md"


# -- Grafana ----------------------------------------------------------------------------------
def test_grafana_provisioning_and_dashboards() -> None:
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uid = datasources["datasources"][0]["uid"]
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/wirekit.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = (DEPLOY / "compose.yaml").read_text()
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in compose
    uids = set()
    for name in SERVICES:
        dashboard = json.loads((DEPLOY / f"grafana/dashboards/{name}.json").read_text())
        uids.add(dashboard["uid"])
        titles = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
        assert titles[:2] == ["Rate", "Errors"] or titles[:2] == ["Rate", "Errors and drops"]
        assert "Saturation" in titles
        for panel in dashboard["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == uid
                assert panel["targets"]
    probe = json.loads((DEPLOY / "grafana/dashboards/probe.json").read_text())
    uids.add(probe["uid"])
    rows = [p["title"] for p in probe["panels"] if p["type"] == "row"]
    assert rows == ["Loss", "Latency", "Path", "Prober"]
    titles = [p["title"] for p in probe["panels"]]
    assert "Loss matrix (prober x target, over the range)" in titles
    assert "Jitter (RFC 3550)" in titles
    for panel in probe["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid
            assert panel["targets"]
    assert len(uids) == 4


# -- Kubernetes -------------------------------------------------------------------------------
def _render(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / overlay)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


OVERLAYS = ["base", "overlays/dev", "overlays/production"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_validate_against_the_kubernetes_schemas(overlay: str) -> None:
    docs = _render(overlay)
    kinds = sorted({d["kind"] for d in docs})
    for needed in ("Deployment", "Service", "NetworkPolicy", "HorizontalPodAutoscaler",
                   "Namespace"):  # fmt: skip
        assert needed in kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # cmdexec's identities: the operator's Secret, mounted where the setting points.
    (cmdexec,) = [
        d for d in docs if d["kind"] == "Deployment" and "cmdexec" in d["metadata"]["name"]
    ]
    pod = cmdexec["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "wirekit-cmdexec-policy"
    assert volume["secret"].get("optional") is not True  # no policy, no pod: nothing open
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    item = volume["secret"]["items"][0]["path"]
    assert env["WIREKIT_CMDEXEC_POLICY_FILE"] == f"{mount['mountPath']}/{item}"


def test_schema_validation_can_fail() -> None:
    bad = _render("base")[-1]
    bad = {**bad, "spec": {**bad["spec"], "no_such_field": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


DRAIN_S = TcpServiceSettings.model_fields["timeout_drain_s"].default


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_meets_the_restricted_profile(overlay: str) -> None:
    docs = _render(overlay)
    namespace = next(d for d in docs if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {f"wirekit-{s}" for s in SERVICES}
    hpas = {
        d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"
    }
    for dep in deployments:
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "wirekit"  # selected by the NetworkPolicy
        assert dep["metadata"]["name"] in hpas
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "add" not in sc["capabilities"]
            assert sc["seccompProfile"]["type"] == "RuntimeDefault"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            # the preStop pause plus the default drain fit in the grace period
            pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
            assert pause > 0
            assert pause + DRAIN_S < pod["terminationGracePeriodSeconds"]
            assert container["resources"]["requests"]
            assert container["resources"]["limits"]
            assert annotations["prometheus.io/port"] == str(
                next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
            )
    udp_service = next(
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "wirekit-udp"
    )
    assert {p["protocol"] for p in udp_service["spec"]["ports"]} == {"UDP", "TCP"}


# -- an alert firing for real ------------------------------------------------------------------
def test_the_shipped_rules_fire_in_a_real_prometheus(prometheus_for: Any, tmp_path: Path) -> None:
    """cmdexec as a process, Debian's Prometheus with deploy/prometheus/rules, wrong tokens:
    WirekitCmdexecAuthFailures fires (no `for:`, so on the next evaluation)."""
    env = {"PATH": "/usr/bin:/bin", "WIREKIT_CMDEXEC_ALLOW_ROOT": "true",
           "WIREKIT_CMDEXEC_TOKEN": "right-dZwMtY4yDEQE_Up7pwU4_3ejoPkbhrMR"}  # fmt: skip
    with service_process("wirekit_cmdexec", "--port", "0", "--metrics-port", "0",
                         "--auth-failure-delay-s", "0", env=env) as proc:  # fmt: skip
        ports = proc.ports
        prom = prometheus_for(
            {"wirekit-cmdexec": ports["metrics"]}, (DEPLOY / "prometheus/rules/wirekit.yml",)
        )
        wait_until(lambda: prom.value('up{job="wirekit-cmdexec"}') == 1.0, 60, "first scrape")
        for _ in range(15):
            with socket.create_connection(("127.0.0.1", ports["cmdexec"]), timeout=10) as s:
                client = CmdexecClient(s, "guess")
                with pytest.raises(RemoteError):
                    client.run(["true"], on_stdout=print, on_stderr=print)

        def firing() -> bool:
            return any(a["labels"]["alertname"] == "WirekitCmdexecAuthFailures"
                       and a["state"] == "firing" for a in prom.alerts())  # fmt: skip

        wait_until(firing, 60, "WirekitCmdexecAuthFailures firing")
        assert not any(a["labels"]["alertname"] == "WirekitTargetDown" for a in prom.alerts())
