"""A digest of what the book's pages are made from, beyond the pages themselves.

`make book` rebuilds incrementally: Sphinx notices a changed page by its time stamp and
re-reads (for a chapter, re-executes) only that page. It cannot see what a chapter imports:
the `deliverylab` package in `src/`, whose change alters every chapter's output, or the build's
configuration. This script prints one SHA-256 over those files' paths and contents; the
Makefile keeps the digest of the last build beside it and rebuilds everything, every chapter
executed, when the digest differs.

    python scripts/book_inputs.py            # print the digest of this checkout
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Single files whose change may alter any page. The bibliography is here because a changed
# entry changes the citing chapters, which Sphinx would not re-read.
FILES = ("_config.yml", "_toc.yml", "requirements.txt", "pyproject.toml",
         "reference/references.bib")
# Folders read whole: the package every chapter runs (and the CLI the command reference is
# generated from).
FOLDERS = ("src",)
# What Python and tools leave in src/ without any source changing.
IGNORED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}
IGNORED_SUFFIXES = (".pyc", ".pyo")


def input_files(root: Path = ROOT) -> Iterator[Path]:
    """Every file the digest covers, in a fixed order (a missing single file is skipped)."""
    for name in FILES:
        path = root / name
        if path.is_file():
            yield path
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            rel = path.relative_to(root)
            if set(rel.parts) & IGNORED_DIRS or ".egg-info" in str(rel):
                continue
            if path.is_file() and not path.name.endswith(IGNORED_SUFFIXES):
                yield path


def digest(root: Path = ROOT) -> str:
    """SHA-256, as hex, over each input file's path (relative to ``root``) and contents."""
    h = hashlib.sha256()
    for path in input_files(root):
        rel = path.relative_to(root).as_posix().encode("utf-8")
        data = path.read_bytes()
        # Length-prefixed, so that no two different sets of files hash alike.
        for part in (rel, data):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print(f"usage: python scripts/book_inputs.py (no arguments), got {args}", file=sys.stderr)
        return 2
    print(digest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
