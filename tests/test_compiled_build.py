"""The compiled build of the per-message path is optional: `make wheelhouse` asks for it only
where a C compiler is found, and the build hook left off gives the pure-Python wheel. (That the
compiled wheels work is shown by the images, test_echo_container.py, and by `make
test-compiled`; here, the fallback.)"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = Path(sys.executable)


def _wheelhouse_plan(**variables: str) -> str:
    """What `make wheelhouse` would run (make -n: nothing is built)."""
    args = [f"{k}={v}" for k, v in {"BIN": str(PY.parent), **variables}.items()]
    out = subprocess.run(
        ["make", "-n", "-s", "wheelhouse", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout


@pytest.mark.parametrize(
    ("variables", "compiled"),
    [
        ({"CC": "cc"}, True),
        ({"CC": "/nonexistent/cc"}, False),
        ({"CC": "cc", "ACCEL": "0"}, False),
    ],
)
def test_wheelhouse_compiles_only_where_a_compiler_is_found(
    variables: dict[str, str], compiled: bool
) -> None:
    plan = _wheelhouse_plan(**variables)
    want = "true" if compiled else "false"
    # both hooks: framing's mypyc, echo's and udp's C (tools/hatch_cext.py)
    assert f"HATCH_BUILD_HOOK_ENABLE_MYPYC={want} HATCH_BUILD_HOOK_ENABLE_CUSTOM={want} " in plan
    # the other members are built as they always were, and what the build leaves is removed
    assert "services/cmdexec services/probe" in plan
    so = "shared/framing/src/*/*.so services/echo/src/*/*.so services/udp/src/*/*.so"
    assert f"rm -f {so}" in plan


def test_wheelhouse_compiles_only_with_the_images_python(tmp_path: Path) -> None:
    """The images' python3.11 installs cp311 wheels only: a venv of another Python (here a
    stand-in that answers as one would; no other Python is installed) builds pure wheels."""
    other = tmp_path / "python"
    other.write_text("#!/bin/sh\necho 0\n")  # what `print(int(version == (3, 11)))` prints
    other.chmod(0o755)
    plan = _wheelhouse_plan(CC="cc", BIN=str(tmp_path))
    assert "HATCH_BUILD_HOOK_ENABLE_CUSTOM=false " in plan
    assert "HATCH_BUILD_HOOK_ENABLE_CUSTOM=true " in _wheelhouse_plan(CC="cc")


@pytest.mark.parametrize(
    ("member", "package", "module"),
    [
        ("shared/framing", "wirekit_framing", "_codec.py"),
        ("services/echo", "wirekit_echo", "_hot.py"),
        ("services/udp", "wirekit_udp", "_hot.py"),
    ],
)
def test_with_the_hook_off_the_wheel_is_pure_python(
    tmp_path: Path, member: str, package: str, module: str
) -> None:
    env = {**os.environ, "HATCH_BUILD_HOOK_ENABLE_MYPYC": "false",
           "HATCH_BUILD_HOOK_ENABLE_CUSTOM": "false"}  # fmt: skip
    subprocess.run(
        [str(PY), "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "-w", str(tmp_path), str(ROOT / member)],
        env=env, check=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob(f"{package}-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert f"{package}/{module}" in names
    assert not [n for n in names if n.endswith((".so", ".c"))]
    assert not list((ROOT / member / "src" / package).glob("*.so"))
