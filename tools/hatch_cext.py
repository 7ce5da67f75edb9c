"""The build hook of the members with a C build (echo's and udp's ``_hot``): hatchling's
``custom`` hook, pointed here by each member's pyproject.toml, which names the extension module
(``module = "wirekit_echo._hot"``; its source is ``src/wirekit_echo/_hot.c``).

Off by default (``enable-by-default = false``): editable installs and a plain ``pip wheel`` are
pure Python. ``make wheelhouse`` (hence the images) and ``make accel`` turn it on where a C
compiler is found (``HATCH_BUILD_HOOK_ENABLE_CUSTOM=true``). The extension is compiled by
setuptools' ``build_ext`` (the compiler and flags of the Python that builds it), in place
beside the pure-Python module of the same name -- the Makefile removes it afterwards, as it
removes mypyc's -- and added to the wheel, which is then tagged for that Python and platform.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: -ffp-contract=off: the C token buckets compute what Python's floats do, bit for bit (no fused
#: multiply-add, which compilers use on arm64 by default).
CFLAGS = ["-Wall", "-ffp-contract=off"]


class CExtensionHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        from setuptools import Distribution, Extension  # type: ignore[import-untyped]
        from setuptools.command.build_ext import build_ext  # type: ignore[import-untyped]

        module = str(self.config["module"])  # e.g. wirekit_echo._hot
        package, name = module.rsplit(".", 1)
        source = f"src/{package.replace('.', '/')}/{name}.c"
        here = os.getcwd()
        os.chdir(self.root)  # build_ext's in-place paths are relative to the project
        try:
            dist = Distribution({
                "name": self.metadata.name,
                "package_dir": {"": "src"},
                "ext_modules": [Extension(module, [source], extra_compile_args=CFLAGS)],
            })  # fmt: skip
            command = build_ext(dist)
            command.inplace = True
            with tempfile.TemporaryDirectory() as temp:
                command.build_temp = f"{temp}/temp"  # nothing left in the project but the
                command.build_lib = f"{temp}/lib"  # module beside its .py
                command.ensure_finalized()
                command.run()
            built = Path(self.root, command.get_ext_fullpath(module))
        finally:
            os.chdir(here)
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        target = f"{package.replace('.', '/')}/{built.name}"
        build_data["force_include"][str(built)] = target
