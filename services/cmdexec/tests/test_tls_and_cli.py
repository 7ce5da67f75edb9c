"""TLS and mutual TLS; the client CLI end to end; memory stays bounded while streaming."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from wirekit_harness import StartCmdexec
from wirekit_testkit import CMDEXEC_TOKEN, OtlpReceiver, make_test_pki, service_process, wait_until

TOKEN = CMDEXEC_TOKEN


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def _client_ctx(pki: dict[str, Path], cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    if cert:
        ctx.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
    return ctx


async def test_tls_runs_commands_and_refuses_untrusted_clients(
    start_cmdexec: StartCmdexec, pki: dict[str, Path]
) -> None:
    async with start_cmdexec(
        tls_cert_file=str(pki["server.pem"]), tls_key_file=str(pki["server.key"])
    ) as h:
        h.tls = _client_ctx(pki, cert=False)
        res = await h.run(["echo", "over tls"])
        assert res.stdout == b"over tls\n"
        h.tls = ssl.create_default_context()  # does not trust the test CA
        with pytest.raises(ssl.SSLCertVerificationError):
            await h.run(["echo", "no"])
        h.tls = None  # plaintext to a TLS port: no command runs
        with pytest.raises((ConnectionError, OSError)):
            await h.run(["echo", "no"])
        assert h.value("cmdexec_runs_total", result="ok") == 1


async def test_mutual_tls_requires_a_client_certificate(
    start_cmdexec: StartCmdexec, pki: dict[str, Path]
) -> None:
    async with start_cmdexec(
        tls_cert_file=str(pki["server.pem"]), tls_key_file=str(pki["server.key"]),
        tls_client_ca_file=str(pki["ca.pem"]),
    ) as h:  # fmt: skip
        h.tls = _client_ctx(pki, cert=True)
        assert (await h.run(["echo", "mtls"])).stdout == b"mtls\n"
        h.tls = _client_ctx(pki, cert=False)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            await h.run(["echo", "no"])
        assert h.value("cmdexec_runs_total", result="ok") == 1


# -- the service and its client as real processes ---------------------------------------------
@contextmanager
def server_process(*args: str, env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """The service as a process; at the end SIGTERM, and it must exit 0. (The tests run as
    root: the service is told that this is meant; the attack suite runs it as a user.)"""
    env = {"WIREKIT_CMDEXEC_TOKEN": TOKEN, "WIREKIT_CMDEXEC_ALLOW_ROOT": "true", **(env or {})}
    with service_process("wirekit_cmdexec", "--port", "0", "--metrics-port", "0", *args,
                         env=env) as proc:  # fmt: skip
        yield {"popen": proc.popen, "port": proc.ports["cmdexec"]}
        proc.popen.terminate()
        assert proc.popen.wait(15) == 0
        proc.assert_clean_log()


def cli(port: int, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "wirekit_cmdexec.client", *args[:1], "--port", str(port), *args[1:]],
        input=stdin, capture_output=True, timeout=60, check=False,
        env={**os.environ, "WIREKIT_CMDEXEC_TOKEN": TOKEN},
    )  # fmt: skip


ALLOW = '["echo", "sh", "sleep", "cat", "head", "true"]'


def test_cli_streams_to_the_right_streams_and_exits_with_the_remote_status() -> None:
    with server_process("--allow", ALLOW) as srv:
        port = srv["port"]
        res = cli(port, "run", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 3")
        assert (res.returncode, res.stdout, res.stderr) == (3, b"to-out\n", b"to-err\n")
        res = cli(port, "run", "--", "sh", "-c", "kill -TERM $$")
        assert res.returncode == 128 + 15
        res = cli(port, "run", "--timeout", "0.3", "--", "sleep", "30")
        assert res.returncode == 124
        assert b"timed out" in res.stderr
        res = cli(port, "run", "--stdin", "--", "cat", stdin=b"forwarded\x00bytes")
        assert (res.returncode, res.stdout) == (0, b"forwarded\x00bytes")
        res = cli(port, "run", "--", "rm", "-rf", "/")
        assert res.returncode == 255
        assert b"forbidden" in res.stderr
        res = cli(port, "shell", stdin=b"echo one\n\necho 'two words'\nquit\necho never\n")
        assert (res.returncode, res.stdout) == (0, b"one\ntwo words\n")


def test_client_with_a_wrong_token_exits_255_and_takes_no_token_flag(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("nope\n")
    with server_process("--auth-failure-delay-s", "0") as srv:
        res = subprocess.run(
            [sys.executable, "-m", "wirekit_cmdexec.client", "run", "--port", str(srv["port"]),
             "--token-file", str(token_file), "--", "echo", "x"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert res.returncode == 255
        assert b"unauthorized: wrong token" in res.stderr  # the reason, as the server gave it
    flag = subprocess.run(
        [sys.executable, "-m", "wirekit_cmdexec.client", "run", "--token", "x", "--", "true"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert flag.returncode == 2
    assert b"unrecognized arguments: --token" in flag.stderr


def _hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_streaming_100_mb_keeps_server_memory_bounded() -> None:
    """Back-pressure: the server never holds more than socket buffers' worth of output."""
    with server_process("--allow", ALLOW, "--limit-output-bytes", str(200 * 1024 * 1024)) as srv:
        pid = srv["popen"].pid
        before = _hwm_kib(pid)
        proc = subprocess.Popen(
            [sys.executable, "-m", "wirekit_cmdexec.client", "run", "--port", str(srv["port"]),
             "--", "head", "-c", "100000000", "/dev/zero"],
            stdout=subprocess.PIPE, env={**os.environ, "WIREKIT_CMDEXEC_TOKEN": TOKEN},
        )  # fmt: skip
        assert proc.stdout is not None
        total = 0
        time.sleep(0.5)  # a slow reader at first: the server must wait, not buffer
        while chunk := proc.stdout.read(1 << 20):
            total += len(chunk)
        assert proc.wait(60) == 0
        assert total == 100_000_000
        grew_mib = (_hwm_kib(pid) - before) / 1024
        assert grew_mib < 40, f"server peak memory grew by {grew_mib:.0f} MiB"


def test_cli_span_and_server_span_share_one_trace() -> None:
    receiver = OtlpReceiver("127.0.0.1")
    receiver.thread.start()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    try:
        with server_process("--allow", ALLOW, env=otel) as srv:
            res = subprocess.run(
                [sys.executable, "-m", "wirekit_cmdexec.client", "run", "--port", str(srv["port"]),
                 "--", "echo", "traced"],
                capture_output=True, timeout=60, check=False,
                env={**os.environ, "WIREKIT_CMDEXEC_TOKEN": TOKEN, **otel},
            )  # fmt: skip
            assert res.returncode == 0, res.stderr

            def both() -> dict[str, Any]:
                spans = {span.name: (res_attrs, span) for res_attrs, span in receiver.spans()}
                return spans if {"cmdexec.run", "cmdexec.client run"} <= spans.keys() else {}

            spans = wait_until(both, 30, "client and server spans")
        (client_res, client_span) = spans["cmdexec.client run"]
        (server_res, server_span) = spans["cmdexec.run"]
        assert client_res["service.name"] == "wirekit-cmdexec-client"
        assert server_res["service.name"] == "wirekit-cmdexec"
        assert server_span.trace_id == client_span.trace_id
        assert server_span.parent_span_id == client_span.span_id
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        pytest.param(["--token", "s3cret"], {}, "--token is not accepted", id="token-flag"),
        pytest.param(["--token=s3cret"], {}, "--token is not accepted", id="token-flag-equals"),
        pytest.param([], {}, "refusing to run as root", id="root"),
    ],
)
def test_token_flag_and_root_are_refused_with_one_line(
    args: list[str], env: dict[str, str], needle: str
) -> None:
    if os.geteuid() != 0 and needle.startswith("refusing"):
        pytest.skip("runs as root only")
    res = subprocess.run(
        [sys.executable, "-m", "wirekit_cmdexec", "--port", "0", *args],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "WIREKIT_CMDEXEC_TOKEN": TOKEN, **env},
    )  # fmt: skip
    assert res.returncode == 2
    assert needle in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "s3cret" not in res.stderr
