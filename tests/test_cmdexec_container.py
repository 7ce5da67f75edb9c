"""The cmdexec image, hardened and with --pids-limit: commands over TLS through the published
port, the token as a Docker secret, Prometheus sees the counters, the span joins the client's
trace at the OTLP receiver."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from testcontainers.core.container import DockerContainer
from wirekit_testkit import (
    OtlpReceiver,
    Prometheus,
    hardened,
    host_port,
    make_test_pki,
    otlp_value,
    scrape,
    wait_ready,
    wait_until,
)

from wirekit_cmdexec.client import CmdexecClient, RemoteError
from wirekit_cmdexec.tokens import hash_token

Start = Callable[[DockerContainer], DockerContainer]
TOKEN = "integration-axtimtundzq7zFSOzr4QaPeRPanIymR1"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def secrets(tmp_path: Path) -> dict[str, Path]:
    pki = make_test_pki(tmp_path / "tls")
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    (secret_dir / "wirekit_cmdexec_token").write_text(TOKEN + "\n")
    (secret_dir / "wirekit_cmdexec_token").chmod(0o644)
    return {"tls": tmp_path / "tls", "secrets": secret_dir, **pki}


def _container(images: dict[str, str], secrets: dict[str, Path], **env: str) -> DockerContainer:
    return (
        hardened(
            images["cmdexec"],
            "7100/tcp",
            "9710/tcp",
            WIREKIT_CMDEXEC_TLS_CERT_FILE="/run/tls/server.pem",
            WIREKIT_CMDEXEC_TLS_KEY_FILE="/run/tls/server.key",
            WIREKIT_CMDEXEC_AUTH_FAILURE_DELAY_S="0.1",
            docker_kwargs={"pids_limit": 64},
            env=env,
        )
        .with_volume_mapping(str(secrets["tls"]), "/run/tls", "ro")
        .with_volume_mapping(str(secrets["secrets"]), "/run/secrets", "ro")
    )


def _client(port: int, ca: Path, token: str = TOKEN) -> CmdexecClient:
    ctx = ssl.create_default_context(cafile=str(ca))
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    return CmdexecClient(ctx.wrap_socket(raw, server_hostname="localhost"), token)


def test_commands_over_tls_with_prometheus_and_otlp(
    images: dict[str, str],
    start: Start,
    secrets: dict[str, Path],
    otlp_receiver: OtlpReceiver,
    prometheus_for: Callable[[dict[str, int]], Prometheus],
) -> None:
    container = start(
        _container(
            images,
            secrets,
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="200",
        )
    )
    wait_ready(container, "9710/tcp")
    port = host_port(container, "7100/tcp")
    prom = prometheus_for({"wirekit-cmdexec": host_port(container, "9710/tcp")})
    attrs = container.get_wrapped_container().attrs
    assert attrs["HostConfig"]["PidsLimit"] == 64
    assert attrs["HostConfig"]["ReadonlyRootfs"] is True

    client = _client(port, secrets["ca.pem"])
    out: list[bytes] = []
    with client.sock:
        result = client.run(["id", "-u"], on_stdout=out.append, on_stderr=out.append,
                            traceparent=f"00-{TRACE_ID}-b7ad6b7169203331-01")  # fmt: skip
        assert (result.code, b"".join(out)) == (0, b"10001\n")  # the image's non-root user
        for _ in range(4):
            assert client.run(["date", "-u"], on_stdout=out.append, on_stderr=out.append).code == 0
        with pytest.raises(RemoteError) as info:
            client.run(["sh", "-c", "id"], on_stdout=out.append, on_stderr=out.append)
        assert info.value.code == "forbidden"

    # A wrong token over TLS: refused and counted.
    bad = _client(port, secrets["ca.pem"], token="wrong")
    with bad.sock, pytest.raises(RemoteError):
        bad.run(["true"], on_stdout=out.append, on_stderr=out.append)

    wait_until(lambda: prom.value('up{job="wirekit-cmdexec"}') == 1.0, 60, "up == 1")
    for expr, want in {
        'cmdexec_runs_total{result="ok"}': 5,
        'cmdexec_runs_total{result="denied"}': 1,
        'cmdexec_auth_failures_total{reason="token"}': 1,
    }.items():
        wait_until(prom.equals(expr, float(want)), 30, f"{expr} == {want}")

    def run_span() -> list[Span]:
        return [s for _, s in otlp_receiver.spans()
                if s.name == "cmdexec.run" and s.trace_id.hex() == TRACE_ID]  # fmt: skip

    span = wait_until(run_span, 30, "the cmdexec.run span in the client's trace")[0]
    span_attrs = {kv.key: otlp_value(kv.value) for kv in span.attributes}
    assert span_attrs["process.executable.name"] == "id"
    assert span_attrs["process.exit.code"] == 0
    assert span.parent_span_id.hex() == "b7ad6b7169203331"


def test_cli_against_the_container(
    images: dict[str, str], start: Start, secrets: dict[str, Path]
) -> None:
    container = start(_container(images, secrets))
    wait_ready(container, "9710/tcp")
    port = str(host_port(container, "7100/tcp"))
    res = subprocess.run(
        [sys.executable, "-m", "wirekit_cmdexec.client", "run", "--port", port,
         "--ca-file", str(secrets["ca.pem"]), "--server-name", "localhost",
         "--token-file", str(secrets["secrets"] / "wirekit_cmdexec_token"),
         "--", "cat", "/etc/os-release"],
        capture_output=True, timeout=60, check=False, env={**os.environ},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert b"bookworm" in res.stdout


def test_policy_file_mounted_and_reloaded_with_docker_kill_hup(
    images: dict[str, str], start: Start, secrets: dict[str, Path], tmp_path: Path
) -> None:
    """Identities from a mounted policy file; `docker kill --signal HUP` reloads it (a new
    token for ops, a new right for ci); the audit trail goes to a file of its own."""
    ops, ops_next, ci = (
        "ops-nownW0KLVbf0Hj63ktVElrltSIS069Zm", "ops-next-JDzDbO05oI5eAcCCoLqYk6zUHI49zy20",
        "ci-x6jYyjiCXLtEqPqjSU9e1nhh4SiZ1hY1",
    )  # fmt: skip
    conf = tmp_path / "conf"
    conf.mkdir()
    conf.chmod(0o777)  # the image's user writes the audit file there
    policy = conf / "policy.yaml"

    def write(ops_token: str, ci_allow: list[str]) -> None:
        policy.write_text(
            "version: 1\nidentities:\n"
            f"  ops:\n    tokens: ['{hash_token(ops_token)}']\n    allow: [id, uname]\n"
            f"  ci:\n    tokens: ['{hash_token(ci)}']\n    allow: {json.dumps(ci_allow)}\n"
        )  # fmt: skip
        policy.chmod(0o644)

    write(ops, ["true"])
    container = start(
        hardened(
            images["cmdexec"], "7100/tcp", "9710/tcp",
            WIREKIT_CMDEXEC_POLICY_FILE="/run/conf/policy.yaml",
            WIREKIT_CMDEXEC_AUDIT_FILE="/run/conf/audit.jsonl",
            WIREKIT_CMDEXEC_AUTH_FAILURE_DELAY_S="0.1",
        ).with_volume_mapping(str(conf), "/run/conf", "rw")
    )  # fmt: skip
    try:
        wait_ready(container, "9710/tcp")
    except AssertionError:
        raise AssertionError(container.get_wrapped_container().logs().decode()) from None
    port = host_port(container, "7100/tcp")
    metrics = f"http://127.0.0.1:{host_port(container, '9710/tcp')}/metrics"

    def run(token: str, argv: list[str]) -> tuple[str, str]:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        with CmdexecClient(raw, token) as client:
            try:
                code = client.run(argv, on_stdout=lambda _: None, on_stderr=lambda _: None).code
            except RemoteError as exc:
                return exc.code, exc.message
        return f"exit {code}", ""

    assert run(ops, ["uname", "-s"]) == ("exit 0", "")
    assert run(ci, ["true"]) == ("exit 0", "")
    assert run(ci, ["id"])[0] == "forbidden"
    write(ops_next, ["true", "id"])
    container.get_wrapped_container().kill(signal="SIGHUP")
    wait_until(lambda: scrape(metrics, "cmdexec_config_reloads_total", result="ok") == 1, 30,
               "the reload")  # fmt: skip
    assert run(ops_next, ["uname", "-s"]) == ("exit 0", "")
    assert run(ops, ["uname", "-s"]) == ("unauthorized", "wrong token")
    assert run(ci, ["id"]) == ("exit 0", "")
    assert scrape(metrics, "cmdexec_identity_runs_total", identity="ci", result="ok") == 2
    events = [json.loads(line) for line in (conf / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["identity"], e["decision"]) for e in events] == [
        ("auth", "ops", "allowed"), ("exec", "ops", "allowed"),
        ("auth", "ci", "allowed"), ("exec", "ci", "allowed"),
        ("auth", "ci", "allowed"), ("exec", "ci", "denied"),
        ("auth", "ops", "allowed"), ("exec", "ops", "allowed"),
        ("auth", None, "denied"),
        ("auth", "ci", "allowed"), ("exec", "ci", "allowed"),
    ]  # fmt: skip
    assert events[5]["reason"] == "'id' is not on the allowlist"
    assert all(ops not in json.dumps(e) and ci not in json.dumps(e) for e in events)
    wrapped = container.get_wrapped_container()
    wrapped.stop(timeout=20)
    wrapped.reload()
    assert wrapped.attrs["State"]["ExitCode"] == 0
    logs = wrapped.logs().decode()
    assert "Traceback" not in logs
    assert '"wirekit_cmdexec.audit"' not in logs  # the audit trail went to its file only
    assert "configuration reloaded" in logs
