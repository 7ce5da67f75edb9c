"""The README stays true: every cmdexec setting is documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from wirekit_cmdexec.settings import CmdexecSettings

README = Path(__file__).resolve().parents[3] / "README.md"


@pytest.mark.parametrize("name", sorted(CmdexecSettings.model_fields))
def test_every_setting_is_in_the_readme(name: str) -> None:
    text = README.read_text()
    assert f"`WIREKIT_CMDEXEC_{name.upper()}`" in text
    assert f"`--{name.replace('_', '-')}`" in text
