"""Every relative link in the pack's Markdown (README, docs, bench, node help pages) reaches a file that exists, and
every ``#anchor`` a heading of that file as GitHub slugs it — a README a user follows unaided has no dead links."""
from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "outputs", "node_modules", ".git"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def markdown_files() -> list[Path]:
    """The tracked Markdown files (git); outside a git checkout, every one not under a hidden or generated folder."""
    try:
        listed = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True, check=True)
        return sorted(REPO / line for line in listed.stdout.splitlines() if line)
    except (OSError, subprocess.CalledProcessError):
        return sorted(p for p in REPO.rglob("*.md")
                      if not any(part in SKIP_DIRS or part.startswith(".") for part in p.relative_to(REPO).parts))


def github_slug(heading: str) -> str:
    """GitHub's heading anchor: markup and punctuation dropped (hyphens and underscores kept), lower case, spaces to
    hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags go, their text stays
    text = re.sub(r"(?<!\w)[*_]+|[*_]+(?!\w)", "", text)  # emphasis markers (not underscores inside a word)
    text = text.replace("`", "").strip().lower()
    text = "".join(c for c in text if c in "- _" or (c.isalnum() and not c.isdigit()) or c.isdecimal())
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    """Every anchor GitHub gives ``path``'s headings (a repeated slug gains -1, -2, …) and any explicit id/name."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: Counter[str] = Counter()
    anchors = set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    for line in text.splitlines():
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        anchors.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return anchors


def relative_links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def test_slugs_follow_github():
    assert github_slug("Edit Transfer's transformer widened") == "edit-transfers-transformer-widened"
    assert github_slug("The LoRA ceilings and the FLUX.1-Kontext-like backbone") == \
        "the-lora-ceilings-and-the-flux1-kontext-like-backbone"
    assert github_slug("Why `remove_discs` stays far") == "why-remove_discs-stays-far"
    assert github_slug("Try it on a fresh machine: two commands") == "try-it-on-a-fresh-machine-two-commands"
    assert github_slug("R² fit, *emphasis* and <sub>x</sub>") == "r-fit-emphasis-and-x"  # ² is no digit to GitHub
    assert github_slug("A′ → B′ × 2") == "a--b--2"


def test_the_checker_sees_a_dead_link(tmp_path):
    """The test below would pass on nothing: it must find these links and tell the broken ones."""
    (tmp_path / "b.md").write_text("# Real heading\n## Twice\n## Twice\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#real-heading) [second](b.md#twice-1) [gone](b.md#no-such) [file](c.md)\n"
                    "`[code](x.md)` [web](https://example.com)\n")
    assert relative_links(page) == ["b.md#real-heading", "b.md#twice-1", "b.md#no-such", "c.md"]
    assert dead_links(page) == ["b.md#no-such (no heading)", "c.md (no file)"]


def dead_links(path: Path) -> list[str]:
    dead = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not linked.exists():
            dead.append(f"{target} (no file)")
        elif anchor and linked.suffix == ".md" and unquote(anchor) not in anchors_of(linked):
            dead.append(f"{target} (no heading)")
    return dead


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path: Path):
    assert relative_links(path) or path.name != "README.md" or path.parent != REPO, "the README's links were not found"
    assert dead_links(path) == [], f"{path.relative_to(REPO)} links to what is not there"
