"""The translated editions' machinery (scripts/i18n.py, scripts/sphinx/deliverylab_i18n.py),
on small catalogs written here: the coverage check names every gap with its file, the update
keeps translations, marks changed English fuzzy with the previous English beside it, and
brings new messages in untranslated; the language switcher's links; the Japanese search
splitter; and the extraction itself, run on the book.

The built Japanese edition is checked in a browser by tests/docs/test_book_ja.py.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog, Message
from babel.messages.pofile import read_po, write_po
from support.translations import i18n

ROOT = Path(__file__).resolve().parents[2]
import deliverylab_i18n as ext  # noqa: E402  (on the path once scripts/i18n.py is loaded)


def write(path: Path, messages: dict[str, str], *, fuzzy: set[str] = frozenset(),
          obsolete: dict[str, str] | None = None) -> Path:
    """A catalog (or, with empty strings, a template) holding ``messages`` in this order."""
    catalog = Catalog(locale="ja", fuzzy=False)
    for msgid, msgstr in messages.items():
        catalog.add(msgid, msgstr, flags={"fuzzy"} if msgid in fuzzy else ())
    for msgid, msgstr in (obsolete or {}).items():
        catalog.obsolete[msgid] = Message(msgid, msgstr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        write_po(f, catalog, include_previous=True)
    return path


@pytest.fixture
def book(tmp_path: Path) -> tuple[Path, Path]:
    """Templates for two pages, and a Japanese catalog translating both completely."""
    templates, locales = tmp_path / "gettext", tmp_path / "locales"
    write(templates / "intro.pot", {"Who this is for": "", "Chapter map": ""})
    write(templates / "chapters" / "01_guarantees.pot", {"Three promises": "", "Setup": ""})
    write(locales / "ja" / "LC_MESSAGES" / "intro.po",
          {"Who this is for": "対象読者", "Chapter map": "各章の内容"})
    write(locales / "ja" / "LC_MESSAGES" / "chapters" / "01_guarantees.po",
          {"Three promises": "三つの約束", "Setup": "準備"})
    return templates, locales


def run_check(templates: Path, locales: Path) -> tuple[int, str]:
    out = io.StringIO()
    status = i18n.check(["ja"], templates, locales, out=out)
    return status, out.getvalue()


# --- the coverage check ----------------------------------------------------------------------


def test_a_complete_translation_passes(book) -> None:
    status, out = run_check(*book)
    assert status == 0, out
    assert "every message of every page is translated" in out
    assert i18n.complete_pages("ja", *book) == ["chapters/01_guarantees", "intro"]


def test_an_untranslated_message_fails_and_is_named_with_its_file(book) -> None:
    templates, locales = book
    po = write(locales / "ja" / "LC_MESSAGES" / "chapters" / "01_guarantees.po",
               {"Three promises": "三つの約束", "Setup": ""})
    status, out = run_check(templates, locales)
    assert status == 1
    assert f"{po}: untranslated: 'Setup'" in out
    assert "Three promises" not in out  # translated: not reported
    assert i18n.complete_pages("ja", templates, locales) == ["intro"]


def test_a_fuzzy_message_fails_though_it_has_a_translation(book) -> None:
    templates, locales = book
    po = write(locales / "ja" / "LC_MESSAGES" / "intro.po",
               {"Who this is for": "対象読者", "Chapter map": "各章の内容"},
               fuzzy={"Chapter map"})
    status, out = run_check(templates, locales)
    assert status == 1
    assert f"{po}: fuzzy: 'Chapter map'" in out
    assert "intro" not in i18n.complete_pages("ja", templates, locales)


def test_a_catalog_behind_the_english_fails(book) -> None:
    # The English gained a paragraph the catalog has not been updated with: the reader of the
    # edition would see it in English although the catalog itself is "complete".
    templates, locales = book
    write(templates / "intro.pot", {"Who this is for": "", "Chapter map": "", "A new one": ""})
    status, out = run_check(templates, locales)
    assert status == 1
    assert "intro.po: missing: 'A new one'" in out
    assert "make i18n-update" in out
    assert i18n.complete_pages("ja", templates, locales) == ["chapters/01_guarantees"]


def test_a_page_without_a_catalog_fails_with_every_message(book) -> None:
    templates, locales = book
    write(templates / "reference" / "glossary.pot", {"Glossary": "", "lease": ""})
    status, out = run_check(templates, locales)
    assert status == 1
    assert "glossary.po: missing: 'Glossary'" in out
    assert "glossary.po: missing: 'lease'" in out


def test_obsolete_entries_do_not_count(book) -> None:
    templates, locales = book
    write(locales / "ja" / "LC_MESSAGES" / "intro.po",
          {"Who this is for": "対象読者", "Chapter map": "各章の内容"},
          obsolete={"An old paragraph": ""})
    assert run_check(templates, locales)[0] == 0


def test_long_messages_are_shortened_in_the_report(book) -> None:
    templates, locales = book
    long = "word " * 60
    write(templates / "intro.pot", {long: ""})
    status, out = run_check(templates, locales)
    first = out.splitlines()[0]
    assert status == 1
    assert first.endswith("...'") and len(first.split("missing: ", 1)[1]) == 102


# --- updating after the English changed ------------------------------------------------------


def test_update_keeps_translations_marks_changes_fuzzy_and_brings_new_messages(book) -> None:
    templates, locales = book
    po = locales / "ja" / "LC_MESSAGES" / "intro.po"
    template = Catalog(locale="ja")
    template.add("Who this is for")                 # unchanged
    template.add("The chapter map")                 # was "Chapter map"
    template.add("Build and check it yourself")     # new
    catalog = i18n.merge(template, i18n.read_catalog(po, "ja"))
    i18n.write_catalog(po, catalog)

    text = po.read_text(encoding="utf-8")
    updated = i18n.read_catalog(po, "ja")
    assert updated["Who this is for"].string == "対象読者"
    assert not updated["Who this is for"].fuzzy
    changed = updated["The chapter map"]
    assert changed.fuzzy and changed.string == "各章の内容"
    # The previous English stays beside the fuzzy entry, for the reviewer.
    assert '#| msgid "Chapter map"\nmsgid "The chapter map"' in text
    assert updated["Build and check it yourself"].string == ""


def test_update_fills_in_messages_that_are_only_code(book) -> None:
    _, locales = book
    po = locales / "ja" / "LC_MESSAGES" / "intro.po"
    template = Catalog(locale="ja")
    for msgid in ("`Queue.receive`", "`orders`, `queue`", "The `orders` table"):
        template.add(msgid)
    catalog = i18n.merge(template, i18n.read_catalog(po, "ja"))
    assert catalog["`Queue.receive`"].string == "`Queue.receive`"
    assert catalog["`orders`, `queue`"].string == "`orders`, `queue`"
    assert not catalog["The `orders` table"].string  # prose around the code: translate it


def test_update_keeps_a_removed_message_as_obsolete(book) -> None:
    _, locales = book
    po = locales / "ja" / "LC_MESSAGES" / "chapters" / "01_guarantees.po"
    template = Catalog(locale="ja")
    template.add("Setup")
    i18n.write_catalog(po, i18n.merge(template, i18n.read_catalog(po, "ja")))
    text = po.read_text(encoding="utf-8")
    assert '#~ msgid "Three promises"\n#~ msgstr "三つの約束"' in text
    assert [m.id for m in read_po(po.open("rb")) if m.id] == ["Setup"]


def test_orphan_catalogs_are_found(book) -> None:
    templates, locales = book
    (templates / "chapters" / "01_guarantees.pot").unlink()
    assert i18n.orphans("ja", templates, locales) == [
        locales / "ja" / "LC_MESSAGES" / "chapters" / "01_guarantees.po"]


def test_words_are_counted_in_markup() -> None:
    assert i18n.english_words("The {doc}`reference/glossary` defines **every** term.") == 6
    assert i18n.english_words("[The lost ACK](chapters/02_ack_loss.ipynb) (30 minutes)") == 5
    assert i18n.english_words("") == 0


# --- the language switcher's links ----------------------------------------------------------


def links(pagename: str, current: str) -> dict[str, str]:
    return {e["lang"]: e["href"] for e in ext.edition_links(pagename, current,
                                                             f"{pagename}.html")}


def test_switcher_links_are_relative_to_the_page_in_each_edition() -> None:
    assert links("intro", "en") == {"en": "intro.html", "ja": "ja/intro.html"}
    assert links("intro", "ja") == {"en": "../intro.html", "ja": "../ja/intro.html"}
    assert links("chapters/01_guarantees", "en") == {
        "en": "../chapters/01_guarantees.html", "ja": "../ja/chapters/01_guarantees.html"}
    assert links("chapters/01_guarantees", "ja") == {
        "en": "../../chapters/01_guarantees.html", "ja": "../../ja/chapters/01_guarantees.html"}


def test_the_switcher_marks_the_current_edition() -> None:
    [current] = [e for e in ext.edition_links("intro", "ja", "intro.html") if e["current"]]
    assert current["lang"] == "ja" and current["label"] == "日本語"


# --- Japanese search -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splitter() -> ext.JapaneseCompoundSplitter:
    return ext.JapaneseCompoundSplitter({})


@pytest.mark.parametrize("text, term", [
    ("確認応答が失われると、メッセージは再配信されます。", "確認応答"),
    ("冪等なコンシューマー", "冪等"),
    ("冪等性を保つ", "冪等性"),
    ("インボックスに記録します", "インボックス"),
    ("二人の将軍問題", "将軍問題"),
])
def test_the_splitter_indexes_compound_terms_whole(splitter, text: str, term: str) -> None:
    assert term in splitter.split(text)


def test_the_splitter_keeps_the_morphemes_and_joins_no_particle(splitter) -> None:
    words = splitter.split("確認応答が失われる")
    assert {"確認", "応答", "確認応答"} <= set(words)
    assert not any("が" in w and len(w) > 1 for w in words)  # runs stop at particles


def test_plain_janome_misses_the_terms_the_compound_splitter_finds() -> None:
    # Why the book has its own splitter: Sphinx's JanomeSplitter alone cuts these apart, and
    # a query is looked up as a whole term.
    from sphinx.search.ja import JanomeSplitter

    plain = JanomeSplitter({})
    assert "確認応答" not in plain.split("確認応答が失われる")
    assert "インボックス" not in plain.split("インボックスに記録します")


# --- extraction, on the book ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # Jupyter Book's extensions
def test_extraction_puts_each_page_in_its_catalog_and_the_part_titles_in_the_root(
        tmp_path: Path) -> None:
    import yaml

    assert i18n.extract(tmp_path / "gettext", tmp_path / "doctrees") == 0
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    from support.built_book import PAGES

    assert i18n.pages(tmp_path / "gettext") == sorted(PAGES)
    intro = {m.id for m in read_po((tmp_path / "gettext" / "intro.pot").open("rb")) if m.id}
    captions = {part["caption"] for part in toc["parts"]}
    assert captions <= intro, "the part titles are not in the root page's catalog"
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    assert {config["title"], config["author"]} <= intro
    # The translated editions' only-blocks are extracted too, though English never shows them.
    assert any(m.startswith("This edition translates the prose only") for m in intro)
    chapter = {m.id for m in read_po(
        (tmp_path / "gettext" / "chapters" / "01_guarantees.pot").open("rb")) if m.id}
    # Prose is extracted, code cells and their outputs are not.
    assert "The three guarantee families" in chapter
    assert not any(m.startswith(("from deliverylab", "import ")) for m in chapter)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # Jupyter Book's extensions
def test_the_strict_build_fails_on_a_translation_that_drops_a_reference(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A copy of the catalogs in which one translation of the front page lost its {doc} link.
    locales = tmp_path / "locales"
    shutil.copytree(i18n.LOCALES, locales, ignore=shutil.ignore_patterns("*.mo"))
    po = i18n.catalog_path("ja", "intro", locales)
    catalog = i18n.read_catalog(po, "ja")
    role = "{doc}`reference/glossary`"
    message = next(m for m in catalog if m.id and role in m.id and role in m.string)
    message.string = message.string.replace(role, "用語集")
    i18n.write_catalog(po, catalog)
    status = i18n.sphinx_build("html", tmp_path / "html", tmp_path / "doctrees", language="ja",
                               strict=True, config={"locale_dirs": [str(locales)]})
    assert status != 0
    assert "inconsistent term references in translated message" in capsys.readouterr().err
