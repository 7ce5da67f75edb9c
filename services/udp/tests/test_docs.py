"""The README stays true: every udp setting is documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from wirekit_udp.settings import UdpSettings

README = Path(__file__).resolve().parents[3] / "README.md"


@pytest.mark.parametrize("name", sorted(UdpSettings.model_fields))
def test_every_setting_is_in_the_readme(name: str) -> None:
    text = README.read_text()
    assert f"`WIREKIT_UDP_{name.upper()}`" in text
    assert f"`--{name.replace('_', '-')}`" in text
