"""The reference pages hold together: every glossary term is used by a chapter, every term a
chapter links to is defined, and every work the bibliography lists is cited.

The strict book build (``-W -n``) already fails on a ``{term}`` or ``{cite}`` that points
nowhere; these tests check the other direction, which no build warning covers: a glossary
entry no chapter links to, or a bibliography entry nothing cites, is dead weight.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GLOSSARY = ROOT / "reference" / "glossary.md"
BIB = ROOT / "reference" / "references.bib"
TERM_ROLE = re.compile(r"\{term\}`([^`<]+?)(?:\s*<([^>]+)>)?`")
CITE_ROLE = re.compile(r"\{cite(?::[pt])?\}`([^`]+)`")


def glossary_terms() -> set[str]:
    """The terms the glossary defines: the unindented lines of its ``{glossary}`` block."""
    text = GLOSSARY.read_text(encoding="utf-8")
    block = text.split("```{glossary}", 1)[1].split("\n```", 1)[0]
    return {line.strip().lower() for line in block.splitlines()
            if line.strip() and not line.startswith((" ", "\t"))}


def markdown_sources() -> dict[str, str]:
    """Every chapter's markdown and every page's text, by file name."""
    out = {}
    for nb in sorted((ROOT / "chapters").glob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        out[nb.name] = "\n".join("".join(c["source"]) for c in cells
                                 if c["cell_type"] == "markdown")
    for page in [ROOT / "intro.md", *sorted((ROOT / "reference").glob("*.md"))]:
        out[page.name] = page.read_text(encoding="utf-8")
    return out


def linked_terms(text: str) -> set[str]:
    return {(target or word).strip().lower() for word, target in TERM_ROLE.findall(text)}


def test_the_glossary_defines_terms() -> None:
    terms = glossary_terms()
    assert len(terms) >= 20 and {"lease", "receipt", "inbox", "outbox", "redrive"} <= terms


def test_every_chapter_links_to_the_glossary() -> None:
    sources = markdown_sources()
    unlinked = [name for name, text in sources.items()
                if name.endswith(".ipynb") and not linked_terms(text)]
    assert not unlinked, f"chapters that link no glossary term: {unlinked}"


def test_every_linked_term_is_defined_and_every_term_is_linked_from_a_chapter() -> None:
    terms = glossary_terms()
    sources = markdown_sources()
    chapters = set().union(*(linked_terms(t) for n, t in sources.items() if n.endswith(".ipynb")))
    everywhere = set().union(*(linked_terms(t) for t in sources.values()))
    assert not everywhere - terms, f"links to terms the glossary lacks: {everywhere - terms}"
    # A term may be defined as an alias of another (two names, one definition): count a
    # definition as used when any name it goes by is linked.
    text = GLOSSARY.read_text(encoding="utf-8")
    block = text.split("```{glossary}", 1)[1].split("\n```", 1)[0]
    groups, current = [], []
    for line in block.splitlines():
        if line.strip() and not line.startswith((" ", "\t")):
            current.append(line.strip().lower())
        elif current:
            groups.append(current)
            current = []
    unused = [g for g in groups if not set(g) & chapters]
    assert not unused, f"glossary entries no chapter links to: {unused}"


def test_every_bibliography_entry_is_cited() -> None:
    keys = set(re.findall(r"^@\w+\{([^,]+),", BIB.read_text(encoding="utf-8"), re.M))
    cited = set()
    for text in markdown_sources().values():
        for group in CITE_ROLE.findall(text):
            cited |= {k.strip() for k in group.split(",")}
    assert keys, "the bibliography is empty"
    assert not cited - keys, f"citations of works the bibliography lacks: {cited - keys}"
    assert not keys - cited, f"works listed but never cited: {sorted(keys - cited)}"
