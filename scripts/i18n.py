"""The book's translated editions: extract the prose, update the catalogs, check them, build.

The English prose is the source. Sphinx's gettext builder extracts every translatable message
of every page (without executing a notebook) into one template per page; the translations
live in one catalog per page, ``locales/<language>/LC_MESSAGES/<page>.po``, committed; the
compiled ``.mo`` files are build output. Usage:

    python scripts/i18n.py extract                 # templates (.pot) into _build/gettext/
    python scripts/i18n.py update [LANGUAGE ...]   # extract, then merge into the catalogs
    python scripts/i18n.py check [LANGUAGE ...]    # exit 1, naming every untranslated or
                                                   # fuzzy message; 0 when all are translated
    python scripts/i18n.py stats [LANGUAGE ...]    # messages and words per page
    python scripts/i18n.py build [LANGUAGE ...] [--strict]   # _build/html/LANGUAGE/

``update`` keeps every translation whose English did not change; a message whose English
changed comes back fuzzy with the previous English kept beside it (``#| msgid``), a new one
comes back untranslated, and a removed one is kept at the end of the catalog as obsolete
(``#~``), so that a moved paragraph's translation can be found again. Fuzzy and untranslated
messages show in English in the built edition; ``check`` names them.

``build`` extracts first, so that ``_build/gettext/`` is as fresh as the edition it builds
(the browser tests compare them), then builds each edition with Sphinx through Jupyter Book's
own configuration pipeline (the same ``_config.yml`` and ``_toc.yml``), without executing a
notebook: the translated edition shows the outputs saved in the notebooks, which nbval keeps
equal to what the engine prints. ``--strict`` is the English strict build's ``-W -n --keep-going``: a translation that
drops a reference, names a term the glossary lacks or breaks a link fails the build.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po, write_po

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "_build"
TEMPLATES = BUILD / "gettext"
LOCALES = ROOT / "locales"
HTML = BUILD / "html"

sys.path.insert(0, str(ROOT / "scripts" / "sphinx"))
from deliverylab_i18n import translated_editions  # noqa: E402

LANGUAGES = translated_editions()


# --- building with Sphinx ------------------------------------------------------------------


def sphinx_build(builder: str, outdir: Path, doctreedir: Path, *, language: str | None = None,
                 strict: bool = False, config: dict[str, object] | None = None) -> int:
    """Run Sphinx on the book as ``jupyter-book build`` does, with the notebooks not executed,
    and ``config`` over ``_config.yml``'s settings. Returns Sphinx's status (0 on success)."""
    from jupyter_book.sphinx import build_sphinx

    overrides: dict[str, object] = {
        "external_toc_path": (ROOT / "_toc.yml").as_posix(),
        "latex_individualpages": False,
        # The saved outputs: extraction does not need them run, and a translated edition
        # shows the outputs the English one was checked against.
        "nb_execution_mode": "off",
    }
    if language:
        overrides["language"] = language
    if strict:
        overrides["nitpicky"] = True
    overrides.update(config or {})
    result = build_sphinx(
        ROOT, outdir, noconfig=True, path_config=ROOT / "_config.yml", confoverrides=overrides,
        builder=builder, doctreedir=doctreedir, freshenv=True, warningiserror=strict,
        keep_going=strict,
    )
    if isinstance(result, BaseException):
        return 1
    return int(result or 0)


def extract(outdir: Path = TEMPLATES, doctreedir: Path = BUILD / ".doctrees-gettext") -> int:
    """Write one message template per page into ``outdir`` (``_build/gettext/``)."""
    shutil.rmtree(outdir, ignore_errors=True)  # no template of a page that is gone
    return sphinx_build("gettext", outdir, doctreedir)


def build(language: str, strict: bool) -> int:
    """Build one translated edition into ``_build/html/<language>/``."""
    started = time.monotonic()
    # From scratch: Sphinx would otherwise carry the previous search index's terms over, and
    # keep the pages of a removed chapter.
    shutil.rmtree(HTML / language, ignore_errors=True)
    status = sphinx_build("html", HTML / language, BUILD / f".doctrees-{language}",
                          language=language, strict=strict)
    # myst-nb writes the notebooks' output files next to the output folder, here into the
    # English edition's; the edition's pages use their own copies under <language>/_images/.
    shutil.rmtree(HTML / "jupyter_execute", ignore_errors=True)
    outcome = "built" if status == 0 else "FAILED"
    print(f"i18n: the {language} edition {outcome} in {time.monotonic() - started:.1f} s, "
          f"{(HTML / language).relative_to(ROOT)}/intro.html")
    return status


# --- the catalogs ------------------------------------------------------------------------


def pages(templates: Path = TEMPLATES) -> list[str]:
    """Every page with a message template, as ``chapters/01_guarantees``, sorted."""
    return sorted(p.relative_to(templates).with_suffix("").as_posix()
                  for p in templates.rglob("*.pot"))


def catalog_path(language: str, page: str, locales: Path = LOCALES) -> Path:
    """Where the catalog of ``page`` in ``language`` lives."""
    return locales / language / "LC_MESSAGES" / f"{page}.po"


def read_catalog(path: Path, language: str | None = None) -> Catalog:
    """A catalog or template, as babel reads it."""
    with path.open("rb") as f:
        return read_po(f, locale=language)


# A message that is nothing but inline code (a heading such as `Queue.receive`, a tab title):
# there is nothing to translate, so the update fills it in as it is.
CODE_ONLY = re.compile(r"(?:`[^`]+`[\s,/]*)+")


def merge(template: Catalog, catalog: Catalog) -> Catalog:
    """``catalog`` updated to ``template``: unchanged messages keep their translation, changed
    ones come back fuzzy with their previous English, new ones untranslated (but for those
    that are only inline code, which are their own translation)."""
    catalog.update(template, no_fuzzy_matching=False, update_header_comment=False,
                   keep_user_comments=True, update_creation_date=False)
    for message in catalog:
        if message.id and not message.string and CODE_ONLY.fullmatch(message.id.strip()):
            message.string = message.id
    return catalog


def write_catalog(path: Path, catalog: Catalog) -> None:
    """Write a catalog as ``update`` does: previous English kept, obsolete entries kept, and
    each message on one line (wrapping cuts Japanese at arbitrary points, and a one-word
    change to the English would rewrap the rest of its paragraph)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        write_po(f, catalog, width=0, include_previous=True, ignore_obsolete=False)


def new_catalog(language: str, page: str) -> Catalog:
    """An empty catalog for a page that has none yet."""
    return Catalog(locale=language, project="deliverylab", fuzzy=False,
                   header_comment=f"# {language} translation of the deliverylab book: {page}.\n"
                                  "# Updated by `make i18n-update`; see scripts/i18n.py.")


def update(languages: Iterable[str]) -> int:
    """Extract, then bring every catalog of ``languages`` up to date with the English."""
    status = extract()
    if status:
        return status
    for language in languages:
        untranslated = fuzzy = 0
        for page in pages():
            template = read_catalog(TEMPLATES / f"{page}.pot")
            path = catalog_path(language, page)
            catalog = read_catalog(path, language) if path.is_file() else new_catalog(language, page)
            merge(template, catalog)
            untranslated += sum(1 for m in catalog if m.id and not m.string)
            fuzzy += sum(1 for m in catalog if m.id and m.string and m.fuzzy)
            write_catalog(path, catalog)
        for orphan in orphans(language):
            print(f"i18n: {orphan.relative_to(ROOT)} belongs to no page any more; delete it "
                  "once its translations are of no more use")
        print(f"i18n: {language}: catalogs updated; {untranslated} messages untranslated, "
              f"{fuzzy} fuzzy (their English changed): see `make i18n-check`")
    return 0


def orphans(language: str, templates: Path = TEMPLATES, locales: Path = LOCALES) -> list[Path]:
    """Catalogs of ``language`` whose page has no template (the page was removed)."""
    known = set(pages(templates))
    base = locales / language / "LC_MESSAGES"
    return sorted(p for p in base.rglob("*.po")
                  if p.relative_to(base).with_suffix("").as_posix() not in known)


# --- coverage ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Gap:
    """One message the reader of a translated edition would see in English."""

    path: Path    # the catalog (which may not exist yet)
    kind: str     # "untranslated", "fuzzy" or "missing" (not in the catalog: run update)
    msgid: str

    def describe(self, root: Path = ROOT) -> str:
        where = self.path.relative_to(root) if self.path.is_relative_to(root) else self.path
        text = self.msgid if len(self.msgid) <= 100 else self.msgid[:97] + "..."
        return f"{where}: {self.kind}: {text!r}"


def gaps(language: str, templates: Path = TEMPLATES, locales: Path = LOCALES,
         only: Iterable[str] | None = None) -> Iterator[Gap]:
    """Every message of every page's template that ``language``'s catalogs do not translate:
    absent from the catalog, untranslated, or fuzzy."""
    for page in only if only is not None else pages(templates):
        template = read_catalog(templates / f"{page}.pot")
        path = catalog_path(language, page, locales)
        catalog = read_catalog(path, language) if path.is_file() else Catalog(locale=language)
        for message in template:
            if not message.id:
                continue
            found = catalog.get(message.id)
            if found is None:
                yield Gap(path, "missing", message.id)
            elif not found.string:
                yield Gap(path, "untranslated", message.id)
            elif found.fuzzy:
                yield Gap(path, "fuzzy", message.id)


def complete_pages(language: str, templates: Path = TEMPLATES,
                   locales: Path = LOCALES) -> list[str]:
    """The pages of which ``language``'s catalog translates every message of the English as
    last extracted (``templates``), none fuzzy."""
    return [page for page in pages(templates)
            if next(gaps(language, templates, locales, only=[page]), None) is None]


def check(languages: Iterable[str], templates: Path = TEMPLATES, locales: Path = LOCALES,
          out=sys.stdout) -> int:
    """Print every gap of ``languages`` (file, kind, message) and return 1 if there is
    any, 0 when every message of every page is translated. Extract first."""
    total = 0
    for language in languages:
        found = list(gaps(language, templates, locales))
        for gap in found:
            print(gap.describe(), file=out)
        total += len(found)
        if not found:
            print(f"i18n: {language}: every message of every page is translated", file=out)
    if total:
        print(f"i18n: {total} messages untranslated, fuzzy or missing: translate them in the "
              "files named above (run `make i18n-update` first if any is missing)", file=out)
    return 1 if total else 0


# --- counts ------------------------------------------------------------------------------

WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’_.-]*")
# Role names ({term}, {cite:p}) and link targets are markup, not words a translator writes.
MARKUP = re.compile(r"\{[\w:.-]+\}|\]\([^)]*\)")


def english_words(text: str) -> int:
    """Words of an English message, not counting role names and link targets."""
    return len(WORD.findall(MARKUP.sub(" ", text)))


def stats(languages: Iterable[str], templates: Path = TEMPLATES,
          locales: Path = LOCALES) -> list[dict[str, object]]:
    """Per page: messages and English words, and per language how many are translated."""
    rows = []
    for page in pages(templates):
        template = [m for m in read_catalog(templates / f"{page}.pot") if m.id]
        row: dict[str, object] = {
            "page": page,
            "messages": len(template),
            "words": sum(english_words(m.id) for m in template),
        }
        for language in languages:
            missing = {g.msgid for g in gaps(language, templates, locales, only=[page])}
            row[language] = sum(1 for m in template if m.id not in missing)
        rows.append(row)
    return rows


def print_stats(languages: list[str]) -> None:
    rows = stats(languages)
    header = f"{'page':40} {'messages':>8} {'words':>7}" + "".join(
        f" {lang + ' done':>9}" for lang in languages)
    print(header)
    for row in rows + [{
        "page": "total",
        "messages": sum(r["messages"] for r in rows),
        "words": sum(r["words"] for r in rows),
        **{lang: sum(r[lang] for r in rows) for lang in languages},
    }]:
        print(f"{row['page']:40} {row['messages']:>8} {row['words']:>7}" + "".join(
            f" {row[lang]:>9}" for lang in languages))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("extract", help="write the message templates into _build/gettext/")
    helps = {
        "update": "extract, then update the catalogs in locales/",
        "check": "name every message a catalog lacks, leaves untranslated or has fuzzy",
        "stats": "messages and English words per page, and how many are translated",
        "build": "build translated editions into _build/html/LANGUAGE/",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("languages", nargs="*", metavar="LANGUAGE",
                       help=f"default: every translated edition ({', '.join(LANGUAGES)})")
        if name == "build":
            p.add_argument("--strict", action="store_true",
                           help="warnings are errors, missing references too (-W -n)")
    args = parser.parse_args(argv)
    if args.command == "extract":
        return extract()
    args.languages = args.languages or LANGUAGES
    for language in args.languages:
        if language not in LANGUAGES:
            parser.error(f"language {language!r} has no edition; the editions: "
                         f"{', '.join(LANGUAGES)}")
    if args.command == "update":
        return update(args.languages)
    # Every other command compares with the English as it is now. For the build too: the
    # browser tests look for English prose on the pages complete against these templates.
    status = extract()
    if status:
        return status
    if args.command == "build":
        return max(build(language, args.strict) for language in args.languages)
    if args.command == "check":
        return check(args.languages)
    print_stats(list(args.languages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
