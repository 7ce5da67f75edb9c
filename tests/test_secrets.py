"""No secret's value in any refusal, log line or metric, whichever service, whichever way the
secret came in and whatever else was wrong with the settings.

The matrix is built from the settings models themselves: every field typed as a secret, given
through each of the three ways operators use (variable, ``*_FILE``, a secrets-directory file),
combined with each other field set to a value that field refuses (found by trying), and with
the rules that span fields. Then the real processes: refusals on stderr, and a service that
runs, its logs and /metrics.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic_settings import SettingsConfigDict
from wirekit_testkit import http_get, scrape, service_process

from wirekit_cmdexec.client import CmdexecClient, RemoteError
from wirekit_cmdexec.settings import CmdexecSettings
from wirekit_echo.settings import EchoSettings
from wirekit_servicekit import ServiceSettings, load_settings
from wirekit_udp.settings import UdpSettings

SERVICES: tuple[type[ServiceSettings], ...] = (EchoSettings, CmdexecSettings, UdpSettings)
WAYS = ("env", "file", "secrets_dir")
#: Values tried on a field until one is refused (each type refuses at least one of them).
CANDIDATES = ("not-a-number", "{not json", "-5", "maybe", "70000", "0")
#: Rules that span fields, by service: the extra variables that break one.
CROSS_FIELD: dict[type[ServiceSettings], dict[str, str]] = {
    CmdexecSettings: {"POLICY_FILE": "/etc/wirekit/policy.yaml"},
}


def _prefix(cls: type[ServiceSettings]) -> str:
    return str(cls.model_config.get("env_prefix"))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("WIREKIT_"):
            monkeypatch.delenv(name)
    return monkeypatch


def _with_secrets_dir(cls: type[ServiceSettings], directory: Path) -> type[ServiceSettings]:
    config = SettingsConfigDict(**{**cls.model_config, "secrets_dir": str(directory)})
    return type(cls.__name__, (cls,), {"model_config": config})


def _refused_value(cls: type[ServiceSettings], name: str, env: pytest.MonkeyPatch) -> str | None:
    """A value ``name`` refuses on its own (None: it takes any string)."""
    var = f"{_prefix(cls)}{name.upper()}"
    for candidate in CANDIDATES:
        env.setenv(var, candidate)
        try:
            cls.load([])
        except Exception:  # refused, whichever way
            return candidate
        finally:
            env.delenv(var)
    return None


def _matrix() -> Iterator[tuple[type[ServiceSettings], str]]:
    for cls in SERVICES:
        for name in sorted(cls.secret_fields()):
            yield cls, name


def test_the_models_declare_their_secrets() -> None:
    """The matrix is not empty: the token is a secret-typed field (so the masking knows it)."""
    assert list(_matrix()) == [(CmdexecSettings, "token")]


@pytest.mark.parametrize(
    ("cls", "secret"), list(_matrix()), ids=lambda v: str(getattr(v, "__name__", v))
)
@pytest.mark.parametrize("way", WAYS)
def test_no_refusal_carries_a_secret(
    cls: type[ServiceSettings], secret: str, way: str, clean_env: pytest.MonkeyPatch,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    refused = {}
    for name in cls.model_fields:
        if name != secret and (bad := _refused_value(cls, name, clean_env)) is not None:
            refused[name] = bad
    assert len(refused) >= 10, refused  # the matrix covers most fields, not a few
    value = "s3cr3t-" + secrets.token_urlsafe(24)
    var = f"{_prefix(cls)}{secret.upper()}"
    target = cls
    if way == "env":
        clean_env.setenv(var, value)
    elif way == "file":
        (tmp_path / "secret").write_text(value + "\n")
        clean_env.setenv(f"{var}_FILE", str(tmp_path / "secret"))
    else:
        (tmp_path / "run-secrets").mkdir()
        (tmp_path / "run-secrets" / var.lower()).write_text(value + "\n")
        target = _with_secrets_dir(cls, tmp_path / "run-secrets")
    assert getattr(target.load([]), secret).get_secret_value() == value  # it does come in
    cases = [{name: bad} for name, bad in refused.items()]
    cases.append(dict(CROSS_FIELD.get(cls, {})))
    cases.append({**dict(CROSS_FIELD.get(cls, {})), **{n.upper(): b for n, b in refused.items()}})
    for case in cases:
        if not case:
            continue
        for name, bad in case.items():
            clean_env.setenv(f"{_prefix(cls)}{name.upper()}", bad)
        with pytest.raises(SystemExit) as exited:
            load_settings(target, [])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "invalid settings" in err, err
        assert value not in err, f"{case}: {err}"
        for name in case:
            clean_env.delenv(f"{_prefix(cls)}{name.upper()}")
    settings = target.load([])
    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert value not in shown


def _cmdexec(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WIREKIT_")}
    return subprocess.run([sys.executable, "-m", "wirekit_cmdexec", *args],
                          env={**clean, "WIREKIT_CMDEXEC_ALLOW_ROOT": "true", **env},
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


@pytest.mark.parametrize("way", ["env", "file"])
@pytest.mark.parametrize(
    "broken",
    [
        pytest.param({"WIREKIT_CMDEXEC_POLICY_FILE": "POLICY"}, id="token-and-policy-file"),
        pytest.param({"WIREKIT_CMDEXEC_PORT": "seventy"}, id="bad-port"),
        pytest.param({"WIREKIT_CMDEXEC_TLS_CERT_FILE": "/nonexistent.pem"}, id="bad-tls-file"),
        pytest.param({"WIREKIT_CMDEXEC_RLIMIT_WRAPPER": "nope"}, id="bad-choice"),
        pytest.param({"WEAK": "1"}, id="weak-token"),
    ],
)
def test_the_service_refuses_without_echoing_the_token(
    broken: dict[str, str], way: str, tmp_path: Path
) -> None:
    """The real process: exit 2, one line, and the token nowhere in it."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nidentities: {}\n")
    token = "weak-token-1234" if "WEAK" in broken else "s3cr3t-" + secrets.token_urlsafe(24)
    env = {k: v.replace("POLICY", str(policy)) for k, v in broken.items() if k != "WEAK"}
    if way == "env":
        env["WIREKIT_CMDEXEC_TOKEN"] = token
    else:
        (tmp_path / "token").write_text(token + "\n")
        env["WIREKIT_CMDEXEC_TOKEN_FILE"] = str(tmp_path / "token")
    done = _cmdexec(env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert token not in done.stderr + done.stdout
    if "WEAK" in broken:
        assert "too weak" in done.stderr
        assert "wirekit-cmdexec token new" in done.stderr


def test_a_running_service_never_shows_its_token(tmp_path: Path) -> None:
    """Started with a token through the environment, two workers: the token is in no log line,
    in no metric, and refused tokens are not echoed either."""
    token = "s3cr3t-" + secrets.token_urlsafe(24)
    wrong = "guess-" + secrets.token_urlsafe(24)
    env = {"WIREKIT_CMDEXEC_TOKEN": token, "WIREKIT_CMDEXEC_ALLOW_ROOT": "true",
           "WIREKIT_CMDEXEC_AUTH_FAILURE_DELAY_S": "0"}  # fmt: skip
    with service_process("wirekit_cmdexec", "--port", "0", "--metrics-port", "0",
                         "--workers", "2", env=env) as svc:  # fmt: skip
        for offered in (token, wrong):
            with socket.create_connection(("127.0.0.1", svc.ports["cmdexec"]), timeout=10) as s:
                try:
                    CmdexecClient(s, offered).run(["true"], on_stdout=print, on_stderr=print)
                except RemoteError:
                    assert offered == wrong
        status, metrics = http_get(svc.url("/metrics"))
        assert status == 200
        assert token not in metrics
        assert wrong not in metrics
        assert scrape(svc.url("/metrics"), "cmdexec_auth_failures_total", reason="token") == 1
        svc.popen.terminate()
        svc.popen.wait(30)
    logged = "".join(svc.lines)
    assert "listening" in logged
    assert token not in logged
    assert wrong not in logged
    svc.assert_clean_log()


@pytest.mark.parametrize("argv", [["--toke=VALUE"], ["--tok", "VALUE"], ["--tokens", "VALUE"]],
                         ids=["near-miss-equals", "near-miss-space", "longer"])  # fmt: skip
def test_a_mistyped_secret_flag_is_not_echoed(argv: list[str]) -> None:
    """argparse's "unrecognized arguments" would repeat a secret typed after a mistyped flag
    (found by review): the flags are named, their values masked."""
    value = "s3cr3t-" + secrets.token_urlsafe(24)
    done = _cmdexec({}, *[a.replace("VALUE", value) for a in argv])
    assert done.returncode == 2
    assert "unrecognized arguments" in done.stderr
    assert value not in done.stderr + done.stdout
