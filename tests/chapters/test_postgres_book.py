"""The PostgreSQL page of the book: rendered from its saved outputs by the book build (which
must not need a server), executed and compared by nbval where PostgreSQL runs."""

from __future__ import annotations

from pathlib import PurePosixPath

import nbformat
import yaml
from jupyter_book.config import get_final_config

from deliverylab.book.pgdemo import PostgresUnavailable, new_schema

ROOT = PurePosixPath(__file__).parents[2]
PAGE = "chapters/03b_postgres.ipynb"


def test_the_book_build_does_not_execute_the_postgres_page_but_runs_the_others():
    user = yaml.safe_load(open(ROOT / "_config.yml", encoding="utf-8"))
    config = get_final_config(user_yaml=user, cli_config={"latex_individualpages": False},
                              sourcedir=str(ROOT))[0]
    patterns = config["nb_execution_excludepatterns"]
    assert config["nb_execution_mode"] == "force"
    # myst-nb matches each pattern against the notebook's path, from the right.
    assert any(PurePosixPath(ROOT / PAGE).match(p) for p in patterns)
    assert not any(PurePosixPath(ROOT / "chapters/03_toolkit.ipynb").match(p) for p in patterns)


def test_the_page_carries_every_output_the_book_shows():
    nb = nbformat.read(ROOT / PAGE, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs for c in code if "import" not in c.source)
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)


def test_without_a_server_the_demonstrations_say_how_to_start_one(monkeypatch):
    import deliverylab.book.pgdemo as pgdemo

    monkeypatch.setattr(pgdemo, "SERVER", "postgresql://127.0.0.1:1/test")
    try:
        new_schema()
    except PostgresUnavailable as exc:
        assert "make services" in str(exc) and "127.0.0.1:1" in str(exc)
    else:
        raise AssertionError("no error without a server")
