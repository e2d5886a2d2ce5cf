"""The documentation's links resolve, the README stays a front door, and every quoted command
output is one that docs/regenerate.py can rerun.

Links are checked as GitHub renders them: a relative path must name a file in the repository, and
a `#fragment` into a markdown file must name one of its headings by GitHub's slug rules.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
README_MAX_LINES = 200

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)


def documents() -> list[Path]:
    """README.md, docs/*.md, BENCHMARKS.md and benchmarks/*.md."""
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        BENCHMARKS,
        *sorted((ROOT / "benchmarks").glob("*.md")),
    ]


def without_code(text: str) -> str:
    """The text with fenced blocks and code spans blanked: links and headings there are not."""
    text = FENCE.sub(lambda m: "\n" * m[0].count("\n"), text)
    return CODE_SPAN.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lowercased, punctuation dropped (letters,
    digits, spaces, hyphens and underscores stay), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = "".join(c for c in text.lower() if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives `path`'s headings (repeats numbered -1, -2, ...), and HTML ones."""
    text = path.read_text(encoding="utf-8")
    found: set[str] = set(HTML_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", text)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """The link targets in `path` that are not URLs of another site."""
    text = without_code(path.read_text(encoding="utf-8"))
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


def broken(path: Path, target: str) -> str | None:
    """Why `target`, a link in `path`, does not resolve; None when it does."""
    file_part, _, fragment = target.partition("#")
    if file_part:
        linked = (path.parent / unquote(file_part)).resolve()
        if not linked.is_relative_to(ROOT):
            return "points outside the repository"
        if not linked.exists():
            return "no such file"
        candidates = [linked]
    else:
        # benchmarks/*.md are also pieces of BENCHMARKS.md (benchmarks/report.py copies them in),
        # so a bare #fragment there may name a heading of the whole page.
        candidates = [path, BENCHMARKS] if path.parent.name == "benchmarks" else [path]
    if not fragment or candidates[0].suffix != ".md":
        return None
    if any(unquote(fragment) in anchors(c) for c in candidates):
        return None
    return f"no heading with the anchor #{fragment}"


def test_every_relative_link_resolves() -> None:
    problems = [
        f"{path.relative_to(ROOT)}: ({target}) {why}"
        for path in documents()
        for target in links(path)
        if (why := broken(path, target)) is not None
    ]
    assert not problems, "\n".join(problems)


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    """The link test cannot pass vacuously: it sees links, and it rejects a bad one."""
    readme = ROOT / "README.md"
    assert any(t.startswith("docs/") for t in links(readme))
    assert broken(readme, "docs/loss.md#backends") is None
    assert broken(readme, "docs/loss.md#no-such-heading") is not None
    assert broken(readme, "docs/no-such-page.md") is not None
    assert broken(readme, "../outside.md") is not None


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Comparing modes: `fastdml compare`", "comparing-modes-fastdml-compare"),
        ("The pairwise sum in O(K)", "the-pairwise-sum-in-ok"),
        ("5. Posterior entropy", "5-posterior-entropy"),
        ("Compiled for sm_90 and sm_80", "compiled-for-sm_90-and-sm_80"),
        ("(K, N, C) = (2, 128, 100), float32", "k-n-c--2-128-100-float32"),
    ],
)
def test_slug_follows_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the rest belongs in docs/"


def test_every_quoted_output_can_be_regenerated() -> None:
    """Each `<!-- output: COMMAND -->` block names a command docs/regenerate.py knows how to run."""
    spec = importlib.util.spec_from_file_location("regenerate", ROOT / "docs" / "regenerate.py")
    assert spec is not None and spec.loader is not None
    regenerate = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("regenerate", regenerate)  # dataclasses look their module up there
    spec.loader.exec_module(regenerate)
    quoted = {c for path in regenerate.documents() for c in regenerate.quoted_commands(path)}
    assert "fastdml compare" in quoted
    assert quoted <= set(regenerate.COMMANDS), quoted - set(regenerate.COMMANDS)
    for path in regenerate.documents():
        text = path.read_text(encoding="utf-8")
        opened, closed = text.count("<!-- output:"), text.count("<!-- /output -->")
        assert opened == closed == len(regenerate.quoted_commands(path)), path
