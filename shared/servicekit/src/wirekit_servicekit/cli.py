"""What the clients share: the seed's interactive loop."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TextIO

__all__ = ["prompt_lines"]


def prompt_lines(lines: Iterable[str], out: TextIO, prompt: str | None) -> Iterator[str]:
    """The seed client's loop: yield each non-empty line (without its newline) until ``quit``
    or end of input, writing ``prompt`` before each read when interactive (``prompt`` set)."""
    if prompt:
        out.write(prompt)
        out.flush()
    for line in lines:
        text = line.rstrip("\r\n")
        if text.strip() == "quit":
            return
        if text.strip():
            yield text
        if prompt:
            out.write(prompt)
            out.flush()
