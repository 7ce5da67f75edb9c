"""Named identities: the policy file (validation with line numbers), the policy table against
the real server over sockets, per-identity limits and metrics, and reload on SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from wirekit_harness import CmdexecHarness, StartCmdexec
from wirekit_testkit import make_test_pki, service_process

from wirekit_cmdexec.client import CmdexecClient, RemoteError
from wirekit_cmdexec.identities import PolicyFileError, parse_policy
from wirekit_cmdexec.tokens import hash_token
from wirekit_servicekit.testing import until

ALICE, ALICE_NEXT, BOB, CAROL = (
    "alice-UBIpx-W42TpMB2TgNE8CStHmI5ero2z-", "alice-next-B-Qybed4m3cijyQ15pw8Io2MXaxNSYaE",
    "bob-vnI5WM3f1QqbFuGaUQ1jzG2osAWYi7Q3", "carol-sz5GrBkVmTASlnxYTasQL1HSyrLfmH9X",
)  # fmt: skip


def policy(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


BASE = f"""\
    version: 1
    identities:
      alice:
        tokens: ["{hash_token(ALICE)}"]
        allow: [echo, uname, sleep]
        sources: [127.0.0.0/8]
        limit_runs: 1
      bob:
        tokens: ["{hash_token(BOB)}"]
        allow: [uname]
        arg_patterns: {{uname: "-[sr]"}}
      carol:
        tokens: ["{hash_token(CAROL)}"]
        sources: [10.0.0.0/8, "fd00::/8"]
"""


def running(start: StartCmdexec, path: str, **kw: Any) -> Any:
    return start(token=None, policy_file=path, allow=["echo", "true"], **kw)


# -- the file -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        pytest.param("version: 1\nidentities:\n  a:\n    tokens: [abc]\n", 4,
                     "identities.a.tokens.0", id="token-in-clear"),
        pytest.param("version: 1\nidentities:\n  a:\n    allow: [x]\n    alow: [y]\n", 5,
                     "identities.a.alow: Extra inputs", id="unknown-key"),
        pytest.param("version: 1\nidentities:\n  a: {}\n  a: {}\n", 4, "'a' is given twice",
                     id="identity-twice"),
        pytest.param("version: 1\nidentities:\n  a:\n    sources: [10.0.0.0/33]\n", 4,
                     "identities.a.sources.0", id="bad-cidr"),
        pytest.param("version: 1\nidentities:\n  a:\n    arg_patterns: {ls: '('}\n", 4,
                     "not a regular expression", id="bad-regex"),
        pytest.param("version: 2\nidentities:\n  a: {}\n", 1, "version", id="version"),
        pytest.param("version: 1\nidentities:\n  a:\n    limit_runs: 0\n", 4,
                     "greater than or equal to 1", id="limit-zero"),
        pytest.param("version: 1\nidentities: {}\n", 2, "identities", id="no-identity"),
        pytest.param("version: 1\nidentities:\n  a: [\n", 4, "expected", id="yaml-syntax"),
        pytest.param("version: 1\nidentities:\n  'bad name!': {}\n", 3, "pattern",
                     id="identity-name"),
        pytest.param("version: 1\nidentities:\n  a:\n    shell: yes\n", 4,
                     "identities.a.shell: Input should be a valid boolean", id="yes-is-no-bool"),
        pytest.param("version: 1\nidentities:\n  a:\n    allow_shell: yes\n", 4,
                     "identities.a.allow_shell: Input should be a valid boolean",
                     id="yes-is-no-bool-setting-name"),
    ],
)  # fmt: skip
def test_a_bad_policy_file_is_refused_naming_the_line(text: str, line: int, needle: str) -> None:
    with pytest.raises(PolicyFileError) as err:
        parse_policy(text, "p.yaml")
    assert f"p.yaml:{line}:" in str(err.value)
    assert needle in str(err.value)


def test_a_credential_of_two_identities_is_refused() -> None:
    digest = hash_token("shared")
    text = (
        f"version: 1\nidentities:\n  a: {{tokens: ['{digest}']}}\n  b: {{tokens: ['{digest}']}}\n"
    )
    with pytest.raises(PolicyFileError, match="a token hash belongs to both 'a' and 'b'"):
        parse_policy(text)
    text = "version: 1\nidentities:\n  a: {certificates: [CN=x]}\n  b: {certificates: [CN=x]}\n"
    with pytest.raises(PolicyFileError, match="CN=x belongs to both"):
        parse_policy(text)


def test_the_shipped_example_is_valid() -> None:
    example = Path(__file__).resolve().parents[3] / "deploy/cmdexec-policy.example.yaml"
    parsed = parse_policy(example.read_text(), str(example))
    assert len(parsed.identities) >= 2


def test_token_new_prints_a_token_and_its_hash() -> None:
    done = subprocess.run([sys.executable, "-m", "wirekit_cmdexec", "token", "new"],
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines())
    token, digest = lines["token"].strip(), lines["hash"].strip()
    assert len(token) >= 43
    assert digest == hash_token(token)
    again = subprocess.run([sys.executable, "-m", "wirekit_cmdexec", "token", "hash"],
                           input=token + "\n", capture_output=True, text=True, timeout=60,
                           check=True)  # fmt: skip
    assert again.stdout.strip() == digest


def test_an_unusable_policy_file_at_start_is_one_clear_line(tmp_path: Path) -> None:
    """YAML's `true` is a boolean, not the executable: refused with the line, exit 2."""
    path = policy(tmp_path, "version: 1\nidentities:\n  a:\n    allow: [true]\n")
    env = {**os.environ, "WIREKIT_CMDEXEC_POLICY_FILE": path, "WIREKIT_CMDEXEC_ALLOW_ROOT": "true"}
    done = subprocess.run([sys.executable, "-m", "wirekit_cmdexec"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [f"wirekit-cmdexec: invalid policy file: {path}:4: identities.a.allow.0: "
                     "Input should be a valid string"], lines  # fmt: skip


async def test_the_test_harness_reports_a_refused_policy_file_at_once(
    start_cmdexec: StartCmdexec, tmp_path: Path
) -> None:
    """The in-process harness raises the service's own error when it ends before it is ready
    (it used to wait for readiness until its 10 s timeout and report only that)."""
    path = policy(tmp_path, "version: 1\nidentities:\n  a:\n    allow: [true]\n")
    with pytest.raises(PolicyFileError, match=r":4: identities\.a\.allow\.0"):
        async with running(start_cmdexec, path):
            pass


def test_token_and_policy_file_exclude_each_other(tmp_path: Path) -> None:
    env = {**os.environ, "WIREKIT_CMDEXEC_TOKEN": "t",
           "WIREKIT_CMDEXEC_POLICY_FILE": policy(tmp_path, BASE)}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "wirekit_cmdexec"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2
    assert "token and policy_file exclude each other" in done.stderr


# -- the policy table, against the real server -------------------------------------------------
TABLE = [
    # identity's token, argv -> the outcome: "ok", or the ERROR's code and a piece of its message
    (ALICE, ["echo", "hi"], "ok", ""),
    (ALICE, ["uname", "-a"], "ok", ""),
    (ALICE, ["true"], "forbidden", "'true' is not on the allowlist"),  # hers, not the server's
    (BOB, ["uname", "-s"], "ok", ""),
    (BOB, ["uname", "-a"], "forbidden", "argument 1 is not allowed for uname"),
    (BOB, ["echo", "hi"], "forbidden", "'echo' is not on the allowlist"),
    (CAROL, ["echo", "hi"], "unauthorized", "may not connect from 127.0.0.1"),  # at AUTH
    ("nobody", ["echo", "hi"], "unauthorized", "wrong token"),
]


async def test_policy_table(start_cmdexec: StartCmdexec, tmp_path: Path) -> None:
    async with running(start_cmdexec, policy(tmp_path, BASE)) as h:
        for token, argv, code, reason in TABLE:
            got_code, message = await asyncio.to_thread(_outcome, h, token, argv)
            assert got_code == code, (token, argv, message)
            assert reason in message, (token, argv, message)
        assert h.value("cmdexec_identity_runs_total", identity="alice", result="ok") == 2
        assert h.value("cmdexec_identity_runs_total", identity="alice", result="denied") == 1
        assert h.value("cmdexec_identity_runs_total", identity="bob", result="denied") == 2
        assert h.value("cmdexec_identity_logins_total", identity="carol") == 0
        assert h.value("cmdexec_auth_failures_total", reason="source") == 1
        assert h.value("cmdexec_auth_failures_total", reason="token") == 1


def _run(h: CmdexecHarness, token: str, argv: list[str]) -> int | None:
    with CmdexecClient(h.sock(), token) as client:
        return _run_on(client, argv)


def _run_on(client: CmdexecClient, argv: list[str]) -> int | None:
    return client.run(argv, on_stdout=lambda _: None, on_stderr=lambda _: None).code


def _outcome(h: CmdexecHarness, token: str, argv: list[str]) -> tuple[str, str]:
    """("ok", "") or the ERROR's (code, message)."""
    try:
        code = _run(h, token, argv)
    except RemoteError as exc:
        return exc.code, exc.message
    return ("ok" if code == 0 else f"exit {code}"), ""


async def test_an_identity_has_its_own_run_limit(
    start_cmdexec: StartCmdexec, tmp_path: Path
) -> None:
    async with running(start_cmdexec, policy(tmp_path, BASE), limit_runs=8) as h:
        first = asyncio.ensure_future(asyncio.to_thread(_run, h, ALICE, ["sleep", "1"]))
        await until(lambda: h.value("cmdexec_runs_active") == 1)
        with pytest.raises(RemoteError, match="1 commands of 'alice' are running") as err:
            await asyncio.to_thread(_run, h, ALICE, ["echo", "x"])
        assert err.value.code == "busy"
        assert await asyncio.to_thread(_run, h, BOB, ["uname", "-s"]) == 0  # bob is not limited
        assert await first == 0


@pytest.mark.parametrize("env_key", ["child_env", "env"])  # the setting's name; the first one
async def test_an_identity_has_its_own_limits_workdir_and_environment(
    start_cmdexec: StartCmdexec, tmp_path: Path, env_key: str
) -> None:
    """timeout_run_s, limit_output_bytes, workdir and child_env of the identity, not the
    server's."""
    (tmp_path / "work").mkdir()
    path = policy(tmp_path, f"""\
        version: 1
        identities:
          tight:
            tokens: ["{hash_token(ALICE)}"]
            allow: [sleep, yes, env, ls]
            timeout_run_s: 0.5
            limit_output_bytes: 1000
            workdir: {tmp_path / "work"}
            {env_key}: {{STAGE: test}}
        """)  # fmt: skip
    async with running(start_cmdexec, path, timeout_run_s=30) as h:

        def run(argv: list[str]) -> tuple[Any, bytes]:
            out = bytearray()
            with CmdexecClient(h.sock(), ALICE) as client:
                return client.run(argv, on_stdout=out.extend, on_stderr=out.extend), bytes(out)

        exit_, _ = await asyncio.to_thread(run, ["sleep", "5"])
        assert exit_.timed_out
        exit_, out = await asyncio.to_thread(run, ["yes"])
        assert exit_.output_capped
        assert len(out) == 1000
        _, out = await asyncio.to_thread(run, ["env"])
        env = dict(line.split("=", 1) for line in out.decode().splitlines())
        assert env["STAGE"] == "test"
        assert env["HOME"] == str(tmp_path / "work")
        (tmp_path / "work" / "marker").touch()
        _, out = await asyncio.to_thread(run, ["ls"])
        assert out == b"marker\n"  # run in the identity's workdir


def test_no_policy_text_crashes_the_parser() -> None:
    """Whatever the file holds, the parser answers with a config or a PolicyFileError."""

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(
        st.text(max_size=300),
        st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                     max_leaves=20).map(lambda d: yaml.safe_dump({"version": 1, "identities": d})),
    ))  # fmt: skip
    def check(text: str) -> None:
        try:
            parse_policy(text)
        except PolicyFileError as exc:
            message = str(exc)
        else:
            message = "valid"
        assert message

    check()


# -- reload -------------------------------------------------------------------------------------
def _rotated(text: str) -> str:
    return text.replace(f'tokens: ["{hash_token(ALICE)}"]',
                        f'tokens: ["{hash_token(ALICE_NEXT)}"]')  # fmt: skip


async def _reloaded(h: CmdexecHarness, result: str) -> None:
    before = h.value("cmdexec_config_reloads_total", result=result)
    os.kill(os.getpid(), signal.SIGHUP)
    await until(lambda: h.value("cmdexec_config_reloads_total", result=result) == before + 1)


async def test_rotation_two_tokens_then_the_old_one_refused_after_reload(
    start_cmdexec: StartCmdexec, tmp_path: Path
) -> None:
    """Both tokens valid during the rotation; the connection opened with the old one keeps its
    running command, and its next EXEC, under the new rules, is refused; a new connection with
    the old token is refused at AUTH."""
    both = BASE.replace(f'tokens: ["{hash_token(ALICE)}"]',
                        f'tokens: ["{hash_token(ALICE)}", "{hash_token(ALICE_NEXT)}"]')  # fmt: skip
    path = policy(tmp_path, both)
    async with running(start_cmdexec, path) as h:
        assert await asyncio.to_thread(_run, h, ALICE, ["echo", "old"]) == 0
        assert await asyncio.to_thread(_run, h, ALICE_NEXT, ["echo", "new"]) == 0
        sha_before = _info(h)
        old_conn = CmdexecClient(h.sock(), ALICE)
        try:
            running_cmd = asyncio.ensure_future(asyncio.to_thread(
                old_conn.run, ["sleep", "1"], on_stdout=lambda _: None,
                on_stderr=lambda _: None))  # fmt: skip
            await until(lambda: h.value("cmdexec_runs_active") == 1)
            policy(tmp_path, _rotated(BASE))
            await _reloaded(h, "ok")
            assert (await running_cmd).code == 0  # the run in progress finished under its rules
            with pytest.raises(RemoteError, match="no longer valid") as err:
                await asyncio.to_thread(_run_on, old_conn, ["echo", "again"])
            assert err.value.code == "unauthorized"
        finally:
            old_conn.close()
        with pytest.raises(RemoteError, match="wrong token"):
            await asyncio.to_thread(_run, h, ALICE, ["echo", "old"])
        assert await asyncio.to_thread(_run, h, ALICE_NEXT, ["echo", "new"]) == 0
        assert _info(h) != sha_before
        await until(lambda: h.value("cmdexec_connections_active") == 0)


def _info(h: CmdexecHarness, label: str = "policy_sha256") -> str:
    """A label of cmdexec_config_info: the configuration in force."""
    for metric in h.registry.collect():
        if metric.name == "cmdexec_config":
            return str(metric.samples[0].labels[label])
    raise AssertionError("no cmdexec_config_info")


async def test_an_invalid_file_on_reload_keeps_the_configuration_in_force(
    start_cmdexec: StartCmdexec, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = policy(tmp_path, BASE)
    failed = ("configuration reload failed: the configuration in force is kept",)
    async with running(start_cmdexec, path, expected_errors=failed) as h:
        sha = _info(h)
        Path(path).write_text(BASE.replace("limit_runs: 1", "limit_runs: none"))
        await _reloaded(h, "error")
        assert _info(h) == sha
        assert await asyncio.to_thread(_run, h, ALICE, ["echo", "still"]) == 0
        errors = [r for r in caplog.records if r.getMessage().startswith("configuration reload")]
        assert len(errors) == 1
        assert f"{path}:7: identities.alice.limit_runs" in errors[0].__dict__["error"]
        Path(path).unlink()  # unreadable: the same
        await _reloaded(h, "error")
        assert await asyncio.to_thread(_run, h, ALICE, ["echo", "still"]) == 0


# -- identities by client certificate, and TLS files reloaded ----------------------------------
def _install(pki: dict[str, Path], into: Path) -> None:
    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copyfile(pki[name], into / name)


def _mtls(pki: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    ctx.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
    return ctx


async def test_certificate_rotation_new_client_accepted_old_ca_refused(
    start_cmdexec: StartCmdexec, tmp_path: Path
) -> None:
    """An identity known by its client certificate's CN (no token). The server's certificate,
    key and client CA are replaced by another PKI's and SIGHUP reloads them: a client of the new
    CA is accepted, the old CA's client is refused at the handshake, connections already open
    go on."""
    old, new = make_test_pki(tmp_path / "old"), make_test_pki(tmp_path / "new")
    (tmp_path / "live").mkdir()
    _install(old, tmp_path / "live")
    live = {n: tmp_path / "live" / n for n in ("server.pem", "server.key", "ca.pem")}
    path = policy(tmp_path, """\
        version: 1
        identities:
          robot:
            certificates: ["CN=wirekit test client"]
            allow: [echo]
        """)  # fmt: skip
    async with running(
        start_cmdexec, path, tls_cert_file=str(live["server.pem"]),
        tls_key_file=str(live["server.key"]), tls_client_ca_file=str(live["ca.pem"]),
    ) as h:  # fmt: skip
        h.tls = _mtls(old)
        open_before = await asyncio.to_thread(lambda: CmdexecClient(h.sock(), ""))
        try:
            assert await asyncio.to_thread(_run_on, open_before, ["echo", "old"]) == 0
            sha = _info(h, "tls_sha256")
            _install(new, tmp_path / "live")
            await _reloaded(h, "ok")
            assert _info(h, "tls_sha256") != sha
            h.tls = _mtls(new)
            assert await asyncio.to_thread(_run, h, "", ["echo", "new"]) == 0
            h.tls = _mtls(old)
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                await asyncio.to_thread(_run, h, "", ["echo", "revoked"])
            # Opened before the reload: goes on.
            assert await asyncio.to_thread(_run_on, open_before, ["echo", "still open"]) == 0
        finally:
            open_before.close()
        assert h.value("cmdexec_identity_logins_total", identity="robot") == 2
        await until(lambda: h.value("cmdexec_auth_failures_total", reason="tls") == 1)


def test_sighup_to_the_supervisor_reloads_every_worker(tmp_path: Path) -> None:
    """A real process with two workers: SIGHUP to the instance reaches both (the supervisor
    forwards it), so the rotated token works and the old one is refused on every worker."""
    path = policy(tmp_path, BASE)
    env = {"WIREKIT_CMDEXEC_ALLOW_ROOT": "true", "WIREKIT_CMDEXEC_POLICY_FILE": path,
           # ten wrong tokens from one address: neither slowed nor limited here
           "WIREKIT_CMDEXEC_AUTH_FAILURE_DELAY_S": "0.01",
           "WIREKIT_CMDEXEC_AUTH_FAILURE_BURST_PER_SOURCE": "100"}  # fmt: skip
    with service_process("wirekit_cmdexec", "--port", "0", "--metrics-port", "0",
                         "--workers", "2", env=env) as proc:  # fmt: skip
        proc.wait_value("cmdexec_workers", 2, state="up")
        policy(tmp_path, _rotated(BASE))
        proc.popen.send_signal(signal.SIGHUP)
        proc.wait_value("cmdexec_config_reloads_total", 2, result="ok")
        port = proc.ports["cmdexec"]
        for _ in range(10):  # connections spread over both workers
            with CmdexecClient(socket.create_connection(("127.0.0.1", port), 10), ALICE_NEXT) as c:
                assert _run_on(c, ["echo", "new"]) == 0
            with (
                CmdexecClient(socket.create_connection(("127.0.0.1", port), 10), ALICE) as c,
                pytest.raises(RemoteError, match="wrong token"),
            ):
                _run_on(c, ["echo", "old"])
        assert proc.value("cmdexec_identity_runs_total", identity="alice", result="ok") == 10
        proc.popen.terminate()
        assert proc.popen.wait(30) == 0
        proc.assert_clean_log()


async def test_a_silent_or_plaintext_client_on_the_tls_port_is_counted_and_closed(
    start_cmdexec: StartCmdexec, tmp_path: Path
) -> None:
    """The handshake has the AUTH deadline: a client that sends nothing is closed after
    timeout_auth_s (`timeout`), one that speaks plaintext at once (`tls`); no slot stays held."""
    pki = make_test_pki(tmp_path / "pki")
    async with start_cmdexec(
        tls_cert_file=str(pki["server.pem"]), tls_key_file=str(pki["server.key"]),
        timeout_auth_s=0.5,
    ) as h:  # fmt: skip

        def silent() -> bytes:
            with socket.create_connection(("127.0.0.1", h.port), timeout=10) as s:
                return s.recv(100)  # b"" (closed) or a reset: either way, not kept open

        def plaintext() -> bytes:
            with socket.create_connection(("127.0.0.1", h.port), timeout=10) as s:
                s.sendall(b"\x00\x00\x00\x10" + b"\x01" + b'{"token": "x"}\n')
                return s.recv(100)

        for probe in (silent, plaintext):
            with contextlib.suppress(ConnectionResetError):
                await asyncio.to_thread(probe)
        await until(lambda: h.value("cmdexec_auth_failures_total", reason="timeout") == 1)
        await until(lambda: h.value("cmdexec_auth_failures_total", reason="tls") == 1)
        await until(lambda: h.value("cmdexec_connections_active") == 0)
