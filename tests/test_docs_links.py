"""The documentation's links resolve: every relative link and image in README.md, CHANGELOG.md and docs/*.md
names an existing file (relative to the linking file's folder) and, for `#anchor` links, a heading of the
target (GitHub's slugs). Also: the README stays a short guide. Pure stdlib; well under a second."""

from __future__ import annotations

import re
import tempfile
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 260

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target), with an optional "title"; the text may hold one level of brackets.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, HTML comments removed."""
    text = HTML_COMMENT.sub("", text)
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * 3
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            continue
        out.append(line)
    return out


def links(text: str) -> list[str]:
    """Every link target of a markdown text, outside code."""
    return [m.group(1) for line in prose_lines(text) for m in LINK.finditer(INLINE_CODE.sub("", line))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation other than hyphens and
    underscores dropped, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of every heading of a markdown text (repeats get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def problems(md: Path) -> list[str]:
    """What is wrong with the links of one markdown file: missing targets and anchors without a heading."""
    found = []
    for target in links(md.read_text(encoding="utf-8")):
        if not target or re.match(r"(?i)^(https?:|mailto:)", target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (md.parent / unquote(path_part)).resolve() if path_part else md
        if not dest.exists():
            found.append(f"{md.name}: link to {target}: {dest} does not exist")
            continue
        if anchor and dest.is_file() and dest.suffix.lower() == ".md":
            if unquote(anchor).lower() not in anchors(dest.read_text(encoding="utf-8")):
                found.append(f"{md.name}: link to {target}: no heading #{anchor} in {dest.name}")
    return found


def documents() -> list[Path]:
    docs = sorted((ROOT / "docs").glob("*.md"))
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *docs]


@pytest.mark.parametrize("md", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path) -> None:
    assert md.is_file(), f"{md} is missing"
    assert problems(md) == []


def test_docs_folder_is_there() -> None:
    assert len(documents()) > 2, "docs/*.md: no reference pages found"


def test_readme_is_a_short_guide() -> None:
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): the reference goes in docs/"


def test_the_checker_finds_broken_links() -> None:
    """The check can fail: a renamed target, a missing heading and a missing image are each reported, while
    links in code, external links and good anchors are not."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "sub").mkdir()
        (d / "sub" / "page.md").write_text(
            "# The page\n\n## Harvest: several ranks, one store\n\n## `--overwrite` and you\n")
        (d / "index.md").write_text(
            "# Index\n\n## A plan for 10^9 tokens\n\n"
            "[ok](sub/page.md) [ok](sub/page.md#harvest-several-ranks-one-store)\n"
            "[ok](sub/page.md#--overwrite-and-you)\n"
            "[ok](#a-plan-for-109-tokens) [ok](#index) [web](https://example.org/x.md) [mail](mailto:a@b.c)\n"
            "`[in code](nowhere.md)`\n```\n[in a fence](nowhere.md)\n# not a heading\n```\n"
            "[renamed](sub/old-page.md) [bad anchor](sub/page.md#no-such-heading) ![img](missing.png)\n"
            "[not a heading in a fence](#not-a-heading)\n")
        found = problems(d / "index.md")
    assert len(found) == 4, found
    for needle in ("old-page.md", "#no-such-heading", "missing.png", "#not-a-heading"):
        assert any(needle in f for f in found), (needle, found)
