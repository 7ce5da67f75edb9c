"""What may run: an allowlist of executables resolved to absolute paths, per-executable argument
patterns, and an explicit, off-by-default shell mode. Decides before anything is spawned."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import Forbidden
from .messages import Exec

log = logging.getLogger(__name__)

#: argv[0] may only be a plain name or an absolute path made of these characters: no shell
#: metacharacters, no whitespace, no relative paths (``../``).
_SAFE_ARGV0 = re.compile(r"[A-Za-z0-9_.+-]+|/[A-Za-z0-9_.+/-]+")
SHELL = "/bin/sh"


@dataclass(frozen=True)
class Decision:
    path: str  # absolute path that will be executed
    args: tuple[str, ...]  # argv[1:]
    name: str  # the allowlisted name: safe as a metric label and span attribute


class Policy:
    def __init__(
        self,
        allow: Sequence[str],
        arg_patterns: Mapping[str, str],
        search_path: str,
        allow_shell: bool,
    ) -> None:
        self.allow_shell = allow_shell
        self._by_name: dict[str, str] = {}
        self._by_path: dict[str, str] = {}
        for entry in allow:
            path = entry if entry.startswith("/") else shutil.which(entry, path=search_path)
            if not path or not os.access(path, os.X_OK) or ".." in path.split("/"):
                log.warning("allowlist entry not found or not executable: skipped",
                            extra={"entry": entry})  # fmt: skip
                continue
            name = os.path.basename(path)
            self._by_name.setdefault(name, path)
            self._by_path[path] = name
        self._patterns = {name: re.compile(p) for name, p in arg_patterns.items()}

    @property
    def names(self) -> list[str]:
        return sorted(self._by_name)

    def decide(self, req: Exec) -> Decision:
        if any("\x00" in arg for arg in req.argv):
            raise Forbidden("arguments may not contain NUL bytes")
        if req.shell:
            if not self.allow_shell:
                raise Forbidden("shell mode is disabled on this server (allow_shell)")
            if len(req.argv) != 1:
                raise Forbidden("shell mode takes exactly one command string")
            return Decision(SHELL, ("-c", req.argv[0]), "sh")
        argv0, args = req.argv[0], tuple(req.argv[1:])
        if not _SAFE_ARGV0.fullmatch(argv0) or ".." in argv0.split("/"):
            raise Forbidden("executable name is not a plain name or absolute path")
        if argv0.startswith("/"):
            path: str | None = argv0 if argv0 in self._by_path else None
        else:
            path = self._by_name.get(argv0)
        if path is None:
            raise Forbidden(f"{argv0!r} is not on the allowlist")
        name = self._by_path[path]
        pattern = self._patterns.get(name)
        if pattern is not None:
            for i, arg in enumerate(args, 1):
                if not pattern.fullmatch(arg):
                    raise Forbidden(f"argument {i} is not allowed for {name}")
        return Decision(path, args, name)
