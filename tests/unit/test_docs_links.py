"""Every relative link in README.md and docs/**/*.md resolves, as GitHub renders them.

A link or image whose target is relative (not ``http(s):``, ``mailto:`` or another scheme)
must name a file or directory that exists, relative to the page it is on; a ``#anchor`` on a
Markdown target (or a bare ``#anchor`` on the page itself) must be the slug of one of that
page's headings. Slugs follow GitHub (github-slugger): the heading's text lower-cased, every
character that is not a letter, digit, ``_``, ``-`` or space removed, spaces turned into
``-``; a repeated slug gets ``-1``, ``-2``... Anchors on other files (``api.py#L10``) are not
checked: GitHub makes those from line numbers.

Markdown is parsed with markdown-it-py (CommonMark plus tables), so links inside code blocks
and code spans are not links, and reference-style links are resolved like inline ones.
``test_the_checker_finds_each_kind_of_breakage`` runs the checker on broken pages to prove
it can fail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

ROOT = Path(__file__).resolve().parents[2]

# Pages another branch of issue 11 adds (docs/python.md: the Python client's guide, part 5).
_MARKDOWN = MarkdownIt("commonmark").enable("table")
_NOT_IN_SLUG = re.compile(r"[^\w\- ]")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class Link:
    """One link or image: the page it is on, its 1-based line, and its target as written."""

    page: Path
    line: int
    target: str


def doc_pages(root: Path) -> list[Path]:
    """README.md and every Markdown page under docs/, in a stable order."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def github_slug(text: str) -> str:
    """The anchor GitHub gives a heading whose rendered text is *text* (before de-duplication)."""
    return _NOT_IN_SLUG.sub("", text.strip().lower()).replace(" ", "-")


def unique_slugs(headings: list[str]) -> list[str]:
    """Slugs of *headings* in page order, repeated ones numbered as github-slugger does."""
    occurrences: dict[str, int] = {}
    slugs: list[str] = []
    for heading in headings:
        original = result = github_slug(heading)
        while result in occurrences:
            occurrences[original] += 1
            result = f"{original}-{occurrences[original]}"
        occurrences[result] = 0
        slugs.append(result)
    return slugs


def _inline_text(children: list[Token]) -> str:
    """The rendered text of a heading's inline tokens (code spans and link texts included)."""
    return "".join(c.content for c in children if c.type in ("text", "code_inline"))


def parse_page(page: Path) -> tuple[list[Link], list[str]]:
    """(links and images, heading texts) of one Markdown page, in page order."""
    tokens = _MARKDOWN.parse(page.read_text(encoding="utf-8"))
    links: list[Link] = []
    headings: list[str] = []
    for i, token in enumerate(tokens):
        if token.type != "inline" or token.children is None:
            continue
        if i > 0 and tokens[i - 1].type == "heading_open":
            headings.append(_inline_text(token.children))
        line = token.map[0] + 1 if token.map else 0
        for child in token.children:
            if child.type in ("softbreak", "hardbreak"):
                line += 1
            target = child.attrs.get("href") if child.type == "link_open" else None
            if child.type == "image":
                target = child.attrs.get("src")
            if isinstance(target, str):
                links.append(Link(page, line, target))
    return links, headings


def broken_links(pages: list[Path], root: Path) -> list[str]:
    """Every relative link on *pages* that does not resolve, as ``page:line: target: why``."""
    slugs_of: dict[Path, set[str]] = {}

    def slugs(page: Path) -> set[str]:
        if page not in slugs_of:
            slugs_of[page] = set(unique_slugs(parse_page(page)[1]))
        return slugs_of[page]

    problems: list[str] = []
    for page in pages:
        for link in parse_page(page)[0]:
            if _SCHEME.match(link.target) or link.target.startswith("//"):
                continue
            parts = urlsplit(link.target)
            path, anchor = unquote(parts.path), unquote(parts.fragment)
            target = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(root)}:{link.line}: {link.target}"
            try:
                shown = target.relative_to(root).as_posix()
            except ValueError:
                problems.append(f"{where}: points outside the repository")
                continue
            if not target.exists():
                problems.append(f"{where}: no file {shown}")
            elif anchor and target.suffix == ".md" and anchor not in slugs(target):
                problems.append(f"{where}: {shown} has no heading with the slug {anchor!r}")
    return problems


def test_every_relative_link_in_readme_and_docs_resolves() -> None:
    problems = broken_links(doc_pages(ROOT), ROOT)
    assert problems == [], "broken links:\n" + "\n".join(problems)


def test_readme_links_every_page_in_docs() -> None:
    links, _ = parse_page(ROOT / "README.md")
    linked = {urlsplit(link.target).path for link in links}
    pages = [p.relative_to(ROOT).as_posix() for p in doc_pages(ROOT)[1:]]
    missing = [p for p in pages if p not in linked]
    assert missing == [], f"README.md links none of: {missing}"


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Chaos: `python -m chaos`", "chaos-python--m-chaos"),
        ("Data flow: W8, and what it cost", "data-flow-w8-and-what-it-cost"),
        ("Scheduling: priority, startAt, keys", "scheduling-priority-startat-keys"),
        ("What's new in 0.2?", "whats-new-in-02"),
        ("snake_case and dash-case", "snake_case-and-dash-case"),
        ("Größe über alles", "größe-über-alles"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_repeated_headings_are_numbered_like_github() -> None:
    assert unique_slugs(["Errors", "Errors", "Errors-1", "Errors"]) == [
        "errors",
        "errors-1",
        "errors-1-1",
        "errors-2",
    ]


def test_the_checker_finds_each_kind_of_breakage(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# A page\n\n## Errors\n\n## Errors\n\n```text\n[not a link](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    (tmp_path / "docs" / "pic.png").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "# Front\n\n"
        "[ok](docs/a.md#errors-1) [ok](#front) ![ok](docs/pic.png) [ok](https://x.org/y.md#z)\n"
        "`[code](gone.md)` [ok](docs/a.md)\n\n"
        "[missing file](docs/gone.md)\n"
        "[missing anchor](docs/a.md#errors-2)\n"
        "[missing local anchor](#back)\n"
        "![missing image](docs/gone.png)\n"
        "[reference][ref]\n"
        "[outside](../elsewhere.md)\n\n"
        "| table | [missing in a table](docs/a.md#nope) |\n|---|---|\n\n"
        "[ref]: docs/a.md#no-such\n",
        encoding="utf-8",
    )
    problems = broken_links(doc_pages(tmp_path), tmp_path)
    assert problems == [
        "README.md:6: docs/gone.md: no file docs/gone.md",
        "README.md:7: docs/a.md#errors-2: docs/a.md has no heading with the slug 'errors-2'",
        "README.md:8: #back: README.md has no heading with the slug 'back'",
        "README.md:9: docs/gone.png: no file docs/gone.png",
        "README.md:10: docs/a.md#no-such: docs/a.md has no heading with the slug 'no-such'",
        "README.md:11: ../elsewhere.md: points outside the repository",
        "README.md:13: docs/a.md#nope: docs/a.md has no heading with the slug 'nope'",
    ]
