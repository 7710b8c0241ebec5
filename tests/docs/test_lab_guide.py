"""The README and the book's "Running the lab" part hold together, without building the book.

- Every `deliverylab` command line they show parses with the command's own parser, so a flag
  renamed in the code cannot linger in the guide.
- Every walkthrough names its own files, schema, queue and stream (none shared with another
  walkthrough, none left to a default such as data/app.db), places an order before it traces
  one, and cleans up everything it made.
- What they make on disk is ignored by git; the pages are all in the table of contents; the
  README stays short, and names only make targets and files that exist.

`test_book_lab_pages.py` checks the built pages in a browser.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml
from support.pages import LAB, README, bash_blocks, shell_lines

from deliverylab.app.cli import build_parser
from deliverylab.brokers import registry

ROOT = Path(__file__).resolve().parents[2]
# The walkthroughs: each starts from nothing and ends with its clean-up. The README's first
# run is one too.
WALKTHROUGHS = ["four_terminals", "relay", "postgres", "rabbitmq", "jetstream", "redis", "cluster"]
# Commands that open the store's database: a walkthrough names it every time, so that none
# falls back on the shared default (data/app.db, or $DELIVERYLAB_DB).
OPENS_STORE = {"init-db", "api", "worker", "relay", "status", "trace", "reconcile", "redrive",
               "drop"}
DEFAULTS = {"data/app.db", "data/nats-cluster"}
# The clean-up command's interface, as the pages use it (--store, --broker, --yes).
CLEANUP_FLAGS = {"--store", "--broker", "--yes"}
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
SHELL_WORDS = {"do", "then", "else", "time", "exec"}


@dataclass
class Command:
    argv: list[str]
    line: str

    @property
    def name(self) -> str:
        return self.argv[0] if self.argv else ""


@dataclass
class Page:
    name: str
    text: str
    commands: list[Command] = field(default_factory=list)  # `deliverylab …`, in page order
    other: list[list[str]] = field(default_factory=list)    # every other command, split


def split_commands(line: str, variables: dict[str, str]) -> list[list[str]]:
    """The simple commands of one shell line, variables expanded, assignments dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
    lex.whitespace_split = True
    lex.commenters = "#"
    tokens = [re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?",
                     lambda m: variables.get(m[1], m[0]), t) for t in lex]
    out, current = [], []
    for token in [*tokens, ";"]:
        if token and set(token) <= set(";&|()"):  # `);` and the like: separators all
            if current:
                out.append(current)
            current = []
        elif not current and (token in SHELL_WORDS or ASSIGNMENT.match(token)):
            continue
        else:
            current.append(token)
    return out


def read_page(name: str, path: Path) -> Page:
    page = Page(name, path.read_text(encoding="utf-8"))
    variables: dict[str, str] = {}
    for block in bash_blocks(page.text):
        for line in shell_lines(block):
            stripped = line.strip()
            m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(\S+)", stripped)
            if m:  # a variable the page sets for the lines after it
                variables[m[1]] = shlex.split(m[2])[0]
                continue
            for argv in split_commands(line, variables):
                if argv[0] == "deliverylab":
                    page.commands.append(Command(argv[1:], stripped))
                elif argv[:3] == ["python", "-m", "deliverylab"]:
                    page.commands.append(Command(argv[3:], stripped))
                else:
                    page.other.append(argv)
    return page


PAGES = {name: read_page(name, LAB / f"{name}.md") for name in WALKTHROUGHS}
FIRST_RUN = read_page("README", README)
EVERY_PAGE = {**{p.stem: read_page(p.stem, p) for p in sorted(LAB.glob("*.md"))},
              "README": FIRST_RUN}
PARSER = build_parser()
SUBCOMMANDS = next(a for a in PARSER._actions
                   if isinstance(a, argparse._SubParsersAction)).choices


def parse(command: Command) -> argparse.Namespace:
    """The command line as the command itself reads it; a refusal fails the test, quoted."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return PARSER.parse_args(command.argv)
        except SystemExit:
            pytest.fail(f"`deliverylab {' '.join(command.argv)}` does not parse:"
                        f" {err.getvalue().strip()}", pytrace=False)


def cleanup_args(command: Command) -> dict[str, str | bool]:
    """The clean-up command's flags, read by its documented interface."""
    args: dict[str, str | bool] = {}
    rest = command.argv[1:]
    while rest:
        flag = rest.pop(0)
        assert flag in CLEANUP_FLAGS, f"`{command.line}`: cleanup takes {CLEANUP_FLAGS}, got {flag}"
        args[flag] = True if flag == "--yes" else rest.pop(0)
    return args


def resource(value: str) -> str:
    """What a --db/--store/--broker value names: a file, a PostgreSQL schema, or the queue or
    stream of an engine of the broker registry."""
    parts = urlsplit(value)
    query = parse_qs(parts.query)
    if parts.scheme.startswith("postgres"):
        options = unquote(query["options"][0])
        return "schema " + options.split("search_path=", 1)[1]
    if registry.is_broker_url(value):  # a broker's queue or stream, named in the query
        return "queue " + (query.get("queue") or query["stream"])[0]
    return "file " + value


def used_resources(page: Page) -> dict[str, str]:
    """Every store and broker the page's commands open, as {resource: a line using it}."""
    found = {}
    for command in page.commands:
        if command.name == "cleanup" or command.name not in SUBCOMMANDS:
            continue
        args = parse(command)
        for flag in ("db", "store", "broker"):
            value = getattr(args, flag, None)
            if value is not None:
                found.setdefault(resource(value), command.line)
        if command.name == "cluster":
            found.setdefault("dir " + args.dir, command.line)
    for command in page.commands:
        if command.name.startswith("deliverylab.book.cluster_run"):
            found.setdefault("dir " + command.argv[1], command.line)
    return found


def cleaned_resources(page: Page) -> set[str]:
    """What the page's clean-up steps remove: cleanup's --store and --broker, and `rm -r`."""
    out = set()
    for command in page.commands:
        if command.name == "cleanup":
            args = cleanup_args(command)
            out |= {resource(str(args[f])) for f in ("--store", "--broker") if f in args}
    for argv in page.other:
        if argv[:2] == ["rm", "-r"]:
            out |= {"dir " + p for p in argv[2:]}
    return out


# --- every command line parses ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EVERY_PAGE))
def test_every_command_line_parses_with_the_cli_parser(name: str) -> None:
    page = EVERY_PAGE[name]
    for command in page.commands:
        if command.name.startswith("deliverylab.book"):
            continue  # a module of its own, run by the cluster page
        if command.name == "cleanup" and "cleanup" not in SUBCOMMANDS:
            # The clean-up command is written to this interface; until the parser has it,
            # hold the pages to the interface itself.
            args = cleanup_args(command)
            assert "--store" in args or "--broker" in args, command.line
            continue
        parse(command)


def test_the_guide_uses_every_command_of_the_cli() -> None:
    used = {c.name for page in EVERY_PAGE.values() for c in page.commands}
    unused = set(SUBCOMMANDS) - used
    assert not unused, f"commands the README and the lab pages never show: {sorted(unused)}"


# --- each walkthrough stands alone ------------------------------------------------------------


@pytest.mark.parametrize("name", [*WALKTHROUGHS, "README"])
def test_a_walkthrough_names_its_store_every_time(name: str) -> None:
    page = FIRST_RUN if name == "README" else PAGES[name]
    assert page.commands, f"{name}: no deliverylab command found"
    for command in page.commands:
        if command.name in OPENS_STORE:
            args = parse(command)
            assert args.db or getattr(args, "store", None), (
                f"{name}: `{command.line}` leaves the store to the default (data/app.db or"
                " $DELIVERYLAB_DB), which another walkthrough may have filled")
        if command.name == "cluster":
            assert "--dir" in command.argv, f"{name}: `{command.line}` uses the default --dir"
    used = used_resources(page)
    shared = {r for r in used if r.split(" ", 1)[1] in DEFAULTS}
    assert not shared, f"{name}: uses a default everyone shares: {shared}"


def test_no_two_walkthroughs_share_a_file_schema_queue_or_stream() -> None:
    owners: dict[str, str] = {}
    for page in [*PAGES.values(), FIRST_RUN]:
        for res in used_resources(page):
            assert owners.setdefault(res, page.name) == page.name, (
                f"{res} is used by both {owners[res]} and {page.name}")


@pytest.mark.parametrize("name", [*WALKTHROUGHS, "README"])
def test_a_walkthrough_cleans_up_everything_it_made(name: str) -> None:
    page = FIRST_RUN if name == "README" else PAGES[name]
    cleaned = cleaned_resources(page)
    # A page may clean a family of files with one pattern: NAME stands for any name.
    patterns = [c.replace("NAME", "*") for c in cleaned]
    left = {r: line for r, line in used_resources(page).items()
            if not any(fnmatch.fnmatchcase(r.replace("NAME", "*"), p) for p in patterns)}
    assert not left, f"{name}: made but never cleaned up: {left}"
    if name != "README":
        assert re.search(r"^## Clean up$", page.text, re.M), f"{name}: no 'Clean up' section"
    for command in page.commands:
        if command.name == "cleanup":
            assert "--yes" in command.argv, f"{name}: `{command.line}` would stop to ask"


@pytest.mark.parametrize("name", [*WALKTHROUGHS, "README"])
def test_a_walkthrough_places_an_order_before_it_traces_it(name: str) -> None:
    page = FIRST_RUN if name == "README" else PAGES[name]
    placed: list[re.Pattern[str]] = []
    traced = 0
    # Commands and curl requests in page order: rebuild the order from the text itself.
    for block in bash_blocks(page.text):
        for line in shell_lines(block):
            for order_id in re.findall(r'"orderId":"([^"]+)"', line):
                placed.append(re.compile(re.escape(order_id)))
            for argv in split_commands(line, {}):
                if argv[:2] == ["deliverylab", "order"] and "--order-id" in argv:
                    order_id = argv[argv.index("--order-id") + 1]
                    # `--order-id w-00$i` in a loop places w-001, w-002, …
                    placed.append(re.compile(re.sub(r"\\\$\w+", r"\\d+", re.escape(order_id))))
                if argv[:2] == ["deliverylab", "trace"]:
                    args = PARSER.parse_args(argv[1:])
                    traced += 1
                    assert any(p.fullmatch(args.order) for p in placed), (
                        f"{name}: `{line.strip()}` traces an order the page has not placed yet")
    assert traced, f"{name}: never traces an order"


# --- what the guide makes is ignored by git -------------------------------------------------


def test_what_the_guide_makes_is_ignored_by_git() -> None:
    paths = set()
    for page in EVERY_PAGE.values():
        for res in used_resources(page):
            kind, value = res.split(" ", 1)
            if kind in ("file", "dir"):
                paths.add(value.replace("NAME", "example"))
    # What a database file brings with it, and a bare name in the repository root.
    paths |= {p + suffix for p in list(paths) if p.endswith(".db") for suffix in ("-wal", "-shm")}
    paths |= {"lab.db", "lab.db-wal", "lab.db-shm"}
    assert paths
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", *paths],
                             capture_output=True, text=True)
    assert ignored.returncode in (0, 1), ignored.stderr
    missing = paths - set(ignored.stdout.split())
    assert not missing, f"made by the guide's commands but not ignored by git: {sorted(missing)}"


# --- the part is in the book, and the README stays short --------------------------------------


def test_every_lab_page_is_in_the_toc() -> None:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    part = next(p for p in toc["parts"] if p["caption"] == "Running the lab")
    listed = [c["file"] for c in part["chapters"]]
    on_disk = sorted(f"lab/{p.stem}" for p in LAB.glob("*.md"))
    assert sorted(listed) == on_disk
    assert {f"lab/{w}" for w in WALKTHROUGHS} <= set(listed)


def test_the_readme_is_short_and_points_at_what_exists() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150, "the README is for a newcomer: 150 lines at most"
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = set(re.findall(r"`make ([a-z][\w-]*)", text))
    assert named and not named - targets, f"make targets the Makefile lacks: {named - targets}"
    files = set(re.findall(r"`((?:lab|chapters|reference|scripts|src)/[\w./-]+)`", text))
    missing = {f for f in files if not (ROOT / f).exists()}
    assert files and not missing, f"the README names files that do not exist: {missing}"
    for heading in ("## Set up", "## Three ways to use it", "## Requirements"):
        assert heading in text
