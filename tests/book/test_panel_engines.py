"""The live lab's engine choice: the same seed and the same clicks give the same tables on an
in-memory SQLite database and on a fresh PostgreSQL schema, and the panel cleans up after
itself. Driven exactly as a reader drives it: set a control's value, click a button."""

from __future__ import annotations

import pytest

from deliverylab.book import pgdemo
from deliverylab.book.lab import Lab
from deliverylab.book.panel import LabPanel
from deliverylab.engine import store_postgres
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import Faults


def schemas_left(prefix: str = "dl_panel") -> set[str]:
    import psycopg

    with psycopg.connect(pgdemo.SERVER) as raw:
        rows = raw.execute("SELECT schema_name FROM information_schema.schemata"
                           " WHERE schema_name LIKE %s", (prefix + "%",)).fetchall()
    return {r[0] for r in rows}


def play(engine: str, mode: str, **rates: float) -> tuple[str, dict[str, int], str, str]:
    """A reader's session: place, step, lose one, run, then the tables they see."""
    panel = LabPanel(seed=11, orders=12, mode=mode, workers=2, engine=engine, **rates)
    try:
        panel.place_button.click()
        for _ in range(4):
            panel.step_button.click()
        panel.lose_button.click()
        panel.run_button.click()
        return (panel.verdict_text, panel.counts, panel.queue_table.value,
                panel.projection_table.value)
    finally:
        panel.close()


@pytest.mark.parametrize(("mode", "rates"), [
    ("idempotent", {"ack_fail": 0.6}),
    ("at-least-once", {"ack_fail": 0.5}),
    ("at-most-once", {"crash_rate": 0.3}),
    ("transactional", {"ack_fail": 0.5, "crash_rate": 0.2}),
])
def test_the_same_clicks_give_the_same_tables_on_both_engines(mode, rates):
    before = schemas_left()
    on_sqlite = play("sqlite", mode, **rates)
    on_postgres = play("postgresql", mode, **rates)
    assert on_postgres == on_sqlite
    assert all(isinstance(v, int) for v in on_postgres[1].values())  # not Decimal
    assert schemas_left() == before  # the panel dropped the schema it made


def test_the_engine_dropdown_resets_onto_the_chosen_engine_and_back():
    panel = LabPanel(seed=7, orders=5, ack_fail=0.8)
    assert "dl-engine-dropdown" in panel.engine._dom_classes
    panel.place_button.click()
    panel.engine.value = "postgresql"
    try:
        assert panel.lab.engine == "postgresql" and panel.counts["orders"] == 0
        assert "Reset on PostgreSQL" in panel.status.value
        made = panel._schema_url
        assert store_postgres.schema_of(made) in schemas_left()
        panel.place_button.click()
        panel.run_button.click()
        assert panel.verdict_text == ("OK: all 5 orders applied exactly once; projection"
                                      " equals truth")
        panel.engine.value = "sqlite"
        assert panel.lab.engine == "sqlite" and panel._schema_url is None
        assert store_postgres.schema_of(made) not in schemas_left()
    finally:
        panel.close()


def test_without_a_server_the_panel_stays_on_sqlite_and_says_why(monkeypatch):
    monkeypatch.setattr(pgdemo, "SERVER", "postgresql://127.0.0.1:1/test")  # nothing listens
    panel = LabPanel(seed=7, orders=5)
    panel.place_button.click()
    panel.engine.value = "postgresql"
    assert panel.engine.value == "sqlite" and panel.lab.engine == "sqlite"
    assert "this needs PostgreSQL at postgresql://127.0.0.1:1/test" in panel.status.value
    assert "make services" in panel.status.value
    with pytest.raises(pgdemo.PostgresUnavailable, match="make services"):
        LabPanel(engine="postgresql")


def test_a_lab_on_a_postgres_url_runs_the_scenario_of_the_sqlite_lab():
    url = pgdemo.new_schema("dl_test_lab")
    try:
        results = []
        for path in (":memory:", url):
            lab = Lab(path, seed=5, mode="idempotent", faults=Faults(seed=5, ack_fail=0.7))
            lab.place_orders(20)
            results.append((lab.engine, lab.run_until_idle().verdict, lab.stats().as_dict(),
                            lab.events().to_dict("records")))
            lab.store.close()
        (e1, *sqlite_run), (e2, *pg_run) = results
        assert (e1, e2) == ("sqlite", "postgresql")
        assert pg_run == sqlite_run
    finally:
        store_postgres.drop_schema(url)


def test_a_bad_engine_is_refused_by_name():
    with pytest.raises(InvalidInput, match="^engine must be 'sqlite' or 'postgresql', got"
                                           " 'mysql'$"):
        LabPanel(engine="mysql")
