"""The docs stay true: every setting of every service is documented on its service's page
(docs/<service>.md), with its flag and its real default; the README keeps its set-up commands;
and no relative link in README.md or docs/*.md points at a missing file or heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from wirekit_cmdexec.settings import CmdexecSettings
from wirekit_echo.settings import EchoSettings
from wirekit_probe.settings import ProbeSettings
from wirekit_udp.settings import UdpSettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
#: Each service's settings are documented on its own page.
PAGES: dict[type[BaseSettings], Path] = {
    EchoSettings: ROOT / "docs/echo.md",
    CmdexecSettings: ROOT / "docs/cmdexec.md",
    UdpSettings: ROOT / "docs/udp.md",
    ProbeSettings: ROOT / "docs/probe.md",
}
SETTINGS: list[type[BaseSettings]] = list(PAGES)
#: The two commands of "## Set up", as the README gives them (a fresh clone's first steps).
SET_UP = [
    "make run     # echo on loopback: raw 127.0.0.1:7000, framed 127.0.0.1:7001, metrics :9700",
    "make check   # everything CI checks: installs what the tests need, then lint, images,"
    " all tests",
]
MARKDOWN: list[Path] = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _ids(value: object) -> str:
    return value if isinstance(value, str) else getattr(value, "__name__", str(value))


@pytest.mark.parametrize(
    ("cls", "name"),
    [(cls, name) for cls in SETTINGS for name in sorted(cls.model_fields)],
    ids=_ids,
)
def test_every_setting_is_on_its_service_page(cls: type[BaseSettings], name: str) -> None:
    page = PAGES[cls].read_text()
    prefix = str(cls.model_config["env_prefix"])
    where = PAGES[cls].relative_to(ROOT)
    assert f"`{prefix}{name.upper()}`" in page, f"{prefix}{name.upper()} is not in {where}"
    assert f"`--{name.replace('_', '-')}`" in page, f"--{name.replace('_', '-')} is not in {where}"


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@pytest.mark.parametrize(
    ("cls", "name"),
    [(cls, name) for cls in SETTINGS for name, field in sorted(cls.model_fields.items())
     if isinstance(field.default, bool | int | float | str) and field.default is not None],
    ids=_ids,
)  # fmt: skip
def test_every_documented_default_is_the_real_one(cls: type[BaseSettings], name: str) -> None:
    prefix = str(cls.model_config["env_prefix"])
    rows = [
        line
        for line in PAGES[cls].read_text().splitlines()
        if line.startswith(f"| `{prefix}{name.upper()}`")
    ]
    assert rows, f"no settings row for {prefix}{name.upper()} in {PAGES[cls].relative_to(ROOT)}"
    default_cell = rows[0].split("|")[3].strip()
    assert default_cell == f"`{_shown(cls.model_fields[name].default)}`", rows[0]


@pytest.mark.parametrize("command", SET_UP, ids=lambda c: c.split("#")[0].strip())
def test_the_readme_keeps_its_set_up_commands(command: str) -> None:
    set_up = README.split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    assert command in set_up.splitlines()


@pytest.mark.parametrize("page", sorted(PAGES.values()), ids=lambda p: p.name)
def test_the_readme_links_every_service_page(page: Path) -> None:
    assert f"]({page.relative_to(ROOT).as_posix()})" in README


# -- links -----------------------------------------------------------------------------------------


def _without_fences(text: str) -> str:
    """The text without its fenced code blocks (whose `# ...` lines are no headings)."""
    kept: list[str] = []
    fence = ""
    for line in text.splitlines():
        marker = line.lstrip()[:3]
        if fence:
            if marker == fence:
                fence = ""
            continue
        if marker in ("```", "~~~"):
            fence = marker
            continue
        kept.append(line)
    return "\n".join(kept)


def _prose(text: str) -> str:
    """The text without code blocks and inline code spans: what can hold a link."""
    return re.sub(r"`[^`\n]*`", "", _without_fences(text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but '-' and '_' dropped, spaces '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in _without_fences(path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match[1])
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: Path) -> list[str]:
    text = _prose(path.read_text())
    inline = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    references = re.findall(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, re.MULTILINE)
    return sorted(set(inline + references))


RELATIVE_LINKS = [
    (path, target)
    for path in MARKDOWN
    for target in _links(path)
    if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target)  # http:, https:, mailto: ...
]


def test_links_are_found() -> None:
    """The parser sees the README's links (else the test below would pass on nothing)."""
    assert (ROOT / "README.md", "docs/cmdexec.md") in RELATIVE_LINKS


@pytest.mark.parametrize(
    ("path", "target"),
    RELATIVE_LINKS,
    ids=[f"{path.relative_to(ROOT)}->{target}" for path, target in RELATIVE_LINKS],
)
def test_every_relative_link_resolves(path: Path, target: str) -> None:
    file, _, anchor = target.partition("#")
    linked = (path.parent / file).resolve() if file else path
    assert linked.exists(), f"{path.relative_to(ROOT)}: {target}: no such file"
    if anchor and linked.suffix == ".md":
        assert anchor in _anchors(linked), f"{path.relative_to(ROOT)}: {target}: no such heading"
