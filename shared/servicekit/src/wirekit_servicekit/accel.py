"""Which build of a service's per-message path is running: compiled or pure Python.

The modules a framed or raw echo passes through (the framing codec, echo's protocols) have an
optional compiled build: mypyc through hatch-mypyc, listed in each package's pyproject.toml,
made by ``make wheelhouse`` (hence the images) and ``make accel`` where a C compiler is found.
The pure-Python modules are the fallback, with the same behaviour and the same tests (``make
test-compiled`` runs them against the compiled build). A service names its modules in
``Service.compiled``; its start log line says which build runs.

``python -m wirekit_servicekit.accel [--expect compiled|pure] SERVICE...`` (``wirekit_echo``)
prints each module's build, and exits 1 when one is not the expected one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from importlib import import_module
from importlib.machinery import EXTENSION_SUFFIXES

__all__ = ["build_of", "summary"]


def build_of(module: str) -> str:
    """``compiled`` when ``module`` was imported from an extension module, else ``pure``."""
    path = getattr(import_module(module), "__file__", None) or ""
    return "compiled" if path.endswith(tuple(EXTENSION_SUFFIXES)) else "pure"


def summary(modules: Iterable[str]) -> str:
    """One word for a service's modules: ``compiled``, ``pure``, or ``mixed``."""
    builds = {build_of(module) for module in modules}
    return builds.pop() if len(builds) == 1 else "mixed" if builds else "pure"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wirekit_servicekit.accel",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--expect", choices=("compiled", "pure"))
    parser.add_argument("packages", nargs="+", metavar="SERVICE", help="e.g. wirekit_echo")
    args = parser.parse_args(argv)
    wrong = 0
    for package in args.packages:
        for module in import_module(f"{package}.__main__").SERVICE.compiled:
            build = build_of(module)
            wrong += args.expect is not None and build != args.expect
            print(f"{package}: {module} {build}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
