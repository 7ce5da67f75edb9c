"""Which build runs (wirekit_servicekit.accel), told apart on real modules of both kinds."""

from __future__ import annotations

import pytest

from wirekit_servicekit import accel


def test_python_modules_are_pure_and_extension_modules_compiled() -> None:
    assert accel.build_of("wirekit_servicekit.hub") == "pure"
    assert accel.build_of("uvloop.loop") == "compiled"  # Cython: an extension module
    assert accel.summary(["wirekit_servicekit.hub", "uvloop.loop"]) == "mixed"
    assert accel.summary(["uvloop.loop", "uvloop.loop"]) == "compiled"
    assert accel.summary(["wirekit_servicekit.hub"]) == "pure"
    assert accel.summary([]) == "pure"


@pytest.mark.parametrize("package", ["wirekit_echo"])
def test_the_command_lists_a_services_modules_and_checks_the_expected_build(
    package: str, capsys: pytest.CaptureFixture[str]
) -> None:
    modules = __import__(f"{package}.__main__", fromlist=["SERVICE"]).SERVICE.compiled
    assert modules, f"{package} names the modules of its compiled build"
    builds = {accel.build_of(module) for module in modules}
    assert len(builds) == 1, "make accel and make pure build or remove all of them"
    (build,) = builds
    other = "pure" if build == "compiled" else "compiled"
    assert accel.main(["--expect", build, package]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{package}: {m} {build}" for m in modules]
    assert accel.main(["--expect", other, package]) == 1
    assert accel.main([package]) == 0
