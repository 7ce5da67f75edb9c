"""The settings base: precedence of flags, env, *_FILE and secrets; one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from wirekit_servicekit import ServiceSettings, SettingsLoadError


def make_settings(secrets: Path) -> type[ServiceSettings]:
    class DemoSettings(ServiceSettings):
        model_config = SettingsConfigDict(
            env_prefix="DEMO_", cli_prog_name="demo", secrets_dir=str(secrets)
        )
        token: str = Field("default-token", description="a secret")
        port: int = Field(1, ge=0, le=65535)

    return DemoSettings


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> type[ServiceSettings]:
    for var in ("DEMO_TOKEN", "DEMO_TOKEN_FILE", "DEMO_PORT"):
        monkeypatch.delenv(var, raising=False)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    return make_settings(secrets)


def _get(settings: ServiceSettings, name: str) -> object:
    return getattr(settings, name)


def test_defaults(demo: type[ServiceSettings]) -> None:
    s = demo.load([])
    assert (_get(s, "token"), _get(s, "port"), s.host, s.drain_grace_s) == (
        "default-token", 1, "127.0.0.1", 0.0,
    )  # fmt: skip


def test_precedence_flag_env_file_secret(
    demo: type[ServiceSettings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = Path(str(demo.model_config["secrets_dir"]))
    (secrets / "demo_token").write_text("from-secret\n")
    assert _get(demo.load([]), "token") == "from-secret"
    token_file = tmp_path / "token.txt"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("DEMO_TOKEN_FILE", str(token_file))
    assert _get(demo.load([]), "token") == "from-file"
    monkeypatch.setenv("DEMO_TOKEN", "from-env")
    assert _get(demo.load([]), "token") == "from-env"
    assert _get(demo.load(["--token", "from-flag"]), "token") == "from-flag"


def test_missing_secrets_dir_is_not_an_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "absent").load([])
    assert _get(settings, "token") == "default-token"


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        pytest.param(["--port", "-5"], {}, "port", id="range"),
        pytest.param([], {"DEMO_PORT": "many"}, "port", id="type"),
        pytest.param([], {"DEMO_TOKEN_FILE": "/no/such/file"}, "DEMO_TOKEN_FILE", id="file"),
        pytest.param(["--bogus"], {}, "bogus", id="unknown-flag"),
    ],
)
def test_errors_are_one_line(
    demo: type[ServiceSettings],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    env: dict[str, str],
    needle: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsLoadError) as info:
        demo.load(argv)
    message = str(info.value)
    assert "\n" not in message
    assert needle in message


def test_settings_are_immutable(demo: type[ServiceSettings]) -> None:
    settings = demo.load([])
    with pytest.raises(ValueError, match="frozen"):
        settings.host = "0.0.0.0"  # type: ignore[misc]


def test_metrics_bind_defaults_to_host(demo: type[ServiceSettings]) -> None:
    assert demo.load(["--host", "::1"]).metrics_bind == "::1"
    assert demo.load(["--metrics-host", "0.0.0.0"]).metrics_bind == "0.0.0.0"


def test_clients_start_without_the_server_runtime() -> None:
    """The clients import wirekit_servicekit.cli only: not pydantic, OpenTelemetry or
    prometheus_client (the udp client's --help went from ~0.55 s to ~0.05 s)."""
    import subprocess
    import sys

    code = (
        "import sys, wirekit_udp.client, wirekit_echo.client; "
        "print(sorted(m for m in ('pydantic', 'opentelemetry', 'prometheus_client') "
        "if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    assert res.stdout.strip() == "[]"
