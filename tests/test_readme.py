"""The README stays true: every setting of every service is documented, with its flag."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from wirekit_cmdexec.settings import CmdexecSettings
from wirekit_echo.settings import EchoSettings
from wirekit_udp.settings import UdpSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SETTINGS: list[type[BaseSettings]] = [EchoSettings, CmdexecSettings, UdpSettings]


@pytest.mark.parametrize(
    ("cls", "name"),
    [(cls, name) for cls in SETTINGS for name in sorted(cls.model_fields)],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_every_setting_is_in_the_readme(cls: type[BaseSettings], name: str) -> None:
    prefix = str(cls.model_config["env_prefix"])
    assert f"`{prefix}{name.upper()}`" in README
    assert f"`--{name.replace('_', '-')}`" in README


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@pytest.mark.parametrize(
    ("cls", "name"),
    [(cls, name) for cls in SETTINGS for name, field in sorted(cls.model_fields.items())
     if isinstance(field.default, bool | int | float | str) and field.default is not None],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)  # fmt: skip
def test_every_documented_default_is_the_real_one(cls: type[BaseSettings], name: str) -> None:
    prefix = str(cls.model_config["env_prefix"])
    row = next(
        line for line in README.splitlines() if line.startswith(f"| `{prefix}{name.upper()}`")
    )
    default_cell = row.split("|")[3].strip()
    assert default_cell == f"`{_shown(cls.model_fields[name].default)}`", row
