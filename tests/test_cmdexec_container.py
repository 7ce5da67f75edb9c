"""The cmdexec image, hardened and with --pids-limit: commands over TLS through the published
port, the token as a Docker secret, Prometheus sees the counters, the span joins the client's
trace at the OTLP receiver."""

from __future__ import annotations

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
    wait_ready,
    wait_until,
)

from wirekit_cmdexec.client import CmdexecClient, RemoteError

Start = Callable[[DockerContainer], DockerContainer]
TOKEN = "integration-token-" + "z" * 24
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
