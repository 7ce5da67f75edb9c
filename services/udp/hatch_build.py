"""wirekit-udp's build hook: the C build of ``wirekit_udp._hot`` (``src/wirekit_udp/_hot.c``).

Off by default (``enable-by-default = false`` in pyproject.toml): editable installs and a plain
``pip wheel`` are pure Python. ``make wheelhouse`` (hence the images) and ``make accel`` turn it
on where a C compiler is found (``HATCH_BUILD_HOOK_ENABLE_CUSTOM=true``). The extension is
compiled by setuptools' ``build_ext`` (the compiler and flags of the Python that builds it),
in place beside ``_hot.py`` -- the Makefile removes it afterwards, as it removes mypyc's -- and
added to the wheel, which is then tagged for that Python and platform.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

MODULE = "wirekit_udp._hot"
SOURCE = "src/wirekit_udp/_hot.c"


class HotBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        from setuptools import Distribution, Extension  # type: ignore[import-untyped]
        from setuptools.command.build_ext import build_ext  # type: ignore[import-untyped]

        here = os.getcwd()
        os.chdir(self.root)  # build_ext's in-place paths are relative to the project
        try:
            dist = Distribution({
                "name": "wirekit-udp",
                "package_dir": {"": "src"},
                "ext_modules": [Extension(MODULE, [SOURCE], extra_compile_args=["-Wall"])],
            })  # fmt: skip
            command = build_ext(dist)
            command.inplace = True
            with tempfile.TemporaryDirectory() as temp:
                command.build_temp = temp
                command.ensure_finalized()
                command.run()
            built = Path(self.root, command.get_ext_fullpath(MODULE))
        finally:
            os.chdir(here)
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        build_data["force_include"][str(built)] = f"wirekit_udp/{built.name}"
