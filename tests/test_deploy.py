"""The deploy kit is valid as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> list[str]:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    if os.environ.get("CI"):
        pytest.fail("neither `docker compose` nor docker-compose is installed")
    pytest.skip("no compose tool")


def test_compose_file_is_valid() -> None:
    result = subprocess.run(
        [*_compose(), "-f", str(ROOT / "deploy/compose.yaml"), "config", "-q"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_publishes_on_loopback_only_and_runs_hardened() -> None:
    text = (ROOT / "deploy/compose.yaml").read_text()
    published = re.findall(r'^\s*-\s*"([^"]*:\d+:\d+(?:/udp)?)"', text, flags=re.MULTILINE)
    assert len(published) >= 9  # echo x3, cmdexec x2, udp x2, prometheus, jaeger
    for mapping in published:
        assert mapping.startswith("127.0.0.1:"), mapping
    services = text[text.index("  echo:") : text.index("  prometheus:")]
    assert services.count("<<: *hardened") == 3
    for line in ("read_only: true", "cap_drop: [ALL]", "no-new-privileges:true"):
        assert line in text
