"""The book's translated editions, as a Sphinx extension loaded by every build of the book.

The English edition is built into ``_build/html/`` and each translated edition into
``_build/html/<language>/`` (``scripts/i18n.py build``), from the same sources and the same
saved notebook outputs; the prose comes from ``locales/<language>/LC_MESSAGES/<page>.po``.
This extension adds what Sphinx's gettext support leaves out:

- a language switcher in the sidebar of every page, linking to the same page in the other
  editions by relative links (so it works over ``file://`` as well as ``http://``), and
  ``<link rel="alternate" hreflang>`` tags naming the same pages;
- the sidebar's part titles: sphinx-external-toc inserts the toctrees from ``_toc.yml``
  after Sphinx has applied the translations, so they would stay English; they are
  translated here, later, from the root page's catalog (where the gettext builder puts them);
- the book's title and author, and the labels of the toggles over hidden notebook cells,
  which are configuration rather than text of a page: put into the root page's catalog and
  translated on every page (the toggles' after myst-nb writes them, also past the
  translation);
- a tag ``edition_<language>`` for ``{only}`` blocks that exist in one edition only (the
  Japanese front page's note that outputs stay English); the gettext builder sets every
  edition's tag, so such blocks are extracted for translation like any other text;
- a Japanese search splitter (see :class:`JapaneseCompoundSplitter`).
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.builders.gettext import MsgOrigin
from sphinx.config import Config
from sphinx.locale import init as init_locale
from sphinx.search.ja import JanomeSplitter
from sphinx.transforms import SphinxTransform
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util.i18n import docname_to_domain

HERE = Path(__file__).resolve().parent
# Hiragana, katakana and the CJK ideographs.
JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")

# The editions, in the switcher's order: language code -> (the language's own name, the
# edition's folder under the English edition's output). English is the source language.
EDITIONS: dict[str, tuple[str, str]] = {
    "en": ("English", ""),
    "ja": ("日本語", "ja/"),
}
SOURCE_LANGUAGE = "en"

# Settings an edition needs unless the configuration gives its own.
LANGUAGE_CONFIG: dict[str, dict[str, Any]] = {
    "ja": {"html_search_options": {"type": "deliverylab_i18n.JapaneseCompoundSplitter"}},
}

# Configuration strings a page shows that are not text of any page.
TRANSLATED_CONFIG = ("html_title", "author")
# myst-nb's toggles over hidden cells ("Show code cell source"): its configured prompts with
# each kind of hidden part it puts in place of {type}.
PROMPT_CONFIG = ("nb_code_prompt_show", "nb_code_prompt_hide")
PROMPT_TYPES = ("content", "source", "output", "outputs")

# sphinx-book-theme's default sidebar (its theme.conf), with the switcher under the title.
SIDEBAR = [
    "navbar-logo.html",
    "edition-switcher.html",
    "icon-links.html",
    "search-button-field.html",
    "sbt-sidebar-nav.html",
]


def language_of(config: Config) -> str:
    """The edition a build makes: the configured language, English when none is set."""
    return config.language or SOURCE_LANGUAGE


def translated_editions() -> list[str]:
    """The languages with a translated edition, in switcher order."""
    return [lang for lang in EDITIONS if lang != SOURCE_LANGUAGE]


def page_catalog(app: Sphinx, docname: str) -> Any:
    """The compiled catalog of one page for the build's language (a no-op in English)."""
    dirs = [str(Path(app.srcdir) / d) for d in app.config.locale_dirs]
    domain = docname_to_domain(docname, app.config.gettext_compact)
    catalog, _found = init_locale(dirs, language_of(app.config), domain)
    return catalog


def edition_links(pagename: str, current: str, target_uri: str) -> list[dict[str, Any]]:
    """One link per edition to the same page, relative to the page ``pagename`` of edition
    ``current``. ``target_uri`` is the page's file relative to an edition's root
    (``chapters/01_guarantees.html``)."""
    # Up from the page to its edition's root, then up out of a translated edition's folder.
    up = "../" * pagename.count("/") + "../" * EDITIONS[current][1].count("/")
    links = []
    for lang, (label, folder) in EDITIONS.items():
        links.append({
            "lang": lang,
            "label": label,
            "current": lang == current,
            "href": f"{up}{folder}{target_uri}",
        })
    return links


class TranslatePartTitles(SphinxTransform):
    """Translate the captions of the toctrees sphinx-external-toc inserts (its transform
    runs at priority 100, after Sphinx's translation at 20), before the doctree is stored
    for the sidebar (the doctree-read event, at 880)."""

    default_priority = 150

    def apply(self, **kwargs: Any) -> None:
        if language_of(self.config) == SOURCE_LANGUAGE:
            return
        catalog = None
        for toctree in self.document.findall(addnodes.toctree):
            caption = toctree.get("rawcaption") or toctree.get("caption")
            if not caption:
                continue
            catalog = catalog or page_catalog(self.app, self.env.docname)
            translated = catalog.gettext(caption)
            if translated and translated != caption:
                toctree["rawcaption"] = caption
                toctree.apply_translated_message(caption, translated)


class TranslateCellToggles(SphinxPostTransform):
    """Translate the labels of myst-nb's toggles over hidden cells, which it writes into the
    doctree after the translation (its HideInputCells post-transform, priority 199), from the
    root page's catalog, where extraction puts them."""

    default_priority = 250
    formats = ("html",)

    def run(self, **kwargs: Any) -> None:
        if language_of(self.config) == SOURCE_LANGUAGE:
            return
        from myst_nb.sphinx_ import HideCodeCellNode

        catalog = None
        for node in self.document.findall(HideCodeCellNode):
            catalog = catalog or page_catalog(self.app, self.config.root_doc)
            for key in ("prompt_show", "prompt_hide"):
                node[key] = catalog.gettext(node[key])


def cell_toggle_prompts(config: Config) -> list[str]:
    """Every label myst-nb may give a toggle over a hidden cell, as configured."""
    return [config[key].replace("{type}", kind) for key in PROMPT_CONFIG if key in config
            for kind in PROMPT_TYPES]


def configure(app: Sphinx, config: Config) -> None:
    """Tag the build with its edition, and add the edition's settings, the switcher's
    template and its style sheet."""
    language = language_of(config)
    app.tags.add(f"edition_{language}")
    for key, value in LANGUAGE_CONFIG.get(language, {}).items():
        if not config[key]:
            config[key] = value
    if not config.html_sidebars:
        config.html_sidebars = {"**": SIDEBAR}
    config.templates_path.append(str(HERE / "templates"))
    config.html_static_path.append(str(HERE / "static"))


def prepare_builder(app: Sphinx) -> None:
    """For extraction: every edition's only-blocks, and the translated configuration strings."""
    if app.builder.name == "gettext":
        # Extract every edition's only-blocks, and the configuration strings, into the root
        # page's catalog, beside the part titles.
        for lang in translated_editions():
            app.tags.add(f"edition_{lang}")
        domain = docname_to_domain(app.config.root_doc, app.config.gettext_compact)
        strings = [app.config[key] for key in TRANSLATED_CONFIG if app.config[key]]
        for value in strings + cell_toggle_prompts(app.config):
            app.builder.catalogs[domain].add(value, MsgOrigin("_config.yml", 0))


def add_page_context(app: Sphinx, pagename: str, templatename: str,
                     context: dict[str, Any], doctree: nodes.document | None) -> None:
    """Give the switcher its links and the page its translated title and author."""
    current = language_of(app.config)
    if current not in EDITIONS:
        return
    links = edition_links(pagename, current, app.builder.get_target_uri(pagename))
    context["deliverylab_editions"] = links
    alternates = "".join(
        f'<link rel="alternate" hreflang="{e["lang"]}" href="{html.escape(e["href"])}" />\n'
        for e in links if not e["current"]
    )
    context["metatags"] = context.get("metatags", "") + alternates
    if current != SOURCE_LANGUAGE:
        catalog = page_catalog(app, app.config.root_doc)
        if context.get("docstitle"):
            context["docstitle"] = catalog.gettext(app.config.html_title)
        if context.get("author"):
            context["author"] = catalog.gettext(app.config.author)


class JapaneseCompoundSplitter(JanomeSplitter):
    """Janome's morphemes, plus every run of adjacent Japanese nouns joined back together.

    Sphinx's search looks a query word up as a whole term (or, from three characters, as a
    part of one), and Janome's dictionary cuts the book's terms into pieces: 確認応答 into
    確認 + 応答, 冪等 into 冪 + 等, インボックス into イン + ボックス. Indexing each run of
    adjacent nouns (and every shorter run inside it) as a term too makes the compound terms
    findable as the reader types them, and their parts as well. Latin words are left as
    Janome cuts them: a query splits at their hyphens and spaces the same way.
    """

    MAX_RUN = 6  # the longest joined term, in morphemes

    def split(self, input: str) -> list[str]:
        words: list[str] = []
        run: list[str] = []

        def flush() -> None:
            for start in range(len(run)):
                for end in range(start + 2, min(len(run), start + self.MAX_RUN) + 1):
                    words.append("".join(run[start:end]))
            run.clear()

        for token in self.tokenizer.tokenize(input):
            surface = token.surface.strip()
            if not surface:
                flush()
                continue
            words.append(surface)
            pos = token.part_of_speech.split(",", 1)[0]
            if pos in ("名詞", "接頭詞") and JAPANESE.search(surface):
                run.append(surface)
            else:
                flush()
        flush()
        return words


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("config-inited", configure)
    app.connect("builder-inited", prepare_builder)
    app.connect("html-page-context", add_page_context)
    app.add_transform(TranslatePartTitles)
    app.add_post_transform(TranslateCellToggles)
    app.add_css_file("edition-switcher.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
