"""The README and docs/ hold together: every relative link resolves (file and heading anchor), every
command of `maisi --help` is documented in docs/cli.md, and the README stays a front page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _outside_code(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def github_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file (lower case, punctuation dropped,
    spaces to hyphens, ``-1``, ``-2`` … for repeats)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        match = re.match(r"^#{1,6} (.*)", line)
        if in_code or not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_outside_code(page.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z]+:", t)]


def test_every_relative_link_resolves():
    assert len(PAGES) >= 10, "docs/ pages are missing"
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            file_part, _, anchor = target.partition("#")
            destination = (page.parent / file_part).resolve() if file_part else page
            if not destination.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and destination.suffix == ".md" and anchor not in github_anchors(destination):
                broken.append(f"{page.relative_to(REPO)}: {target} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_command_is_documented_in_cli_md():
    import argparse

    from maisicore.cli import build_parser

    cli_doc = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    names = sorted(commands.choices)
    assert {"generate", "inpaint", "batch", "evaluate", "train"} <= set(names)
    missing = [name for name in names if f"`maisi {name}" not in cli_doc]
    assert not missing, f"commands of `maisi --help` not documented in docs/cli.md: {missing}"


def test_readme_is_a_front_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    for section in ("## Install in Slicer", "## The Slicer workflow", "## Quick start", "## The command line",
                    "## Tests", "## License"):
        assert section in readme
    linked = {Path(t.partition("#")[0]).name for t in relative_links(REPO / "README.md")}
    unlinked = [p.name for p in PAGES[1:] if p.name not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


@pytest.mark.parametrize("page", [p.name for p in PAGES[1:]])
def test_docs_page_has_one_title(page):
    text = _outside_code((REPO / "docs" / page).read_text(encoding="utf-8"))
    titles = re.findall(r"^# .*", text, flags=re.M)
    assert len(titles) == 1, f"docs/{page}: {len(titles)} top-level titles"
