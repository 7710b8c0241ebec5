"""The operator's signals: read from the store, served at /metrics, printed by status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from support.cli import run

from deliverylab.app import metrics
from deliverylab.app.api import create_app
from deliverylab.book.lab import Lab
from deliverylab.engine import store
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import Faults


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample, by (name, labels), as the library's own parser reads it."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_exposition_parses_and_carries_every_signal():
    lab = Lab(seed=4, faults=Faults(seed=4, ack_fail=0.5))
    lab.place_orders(12)
    lab.run_until_idle()
    lab.place_orders(3)
    lab.advance(30)
    reading = metrics.signals(lab.store, now=lab.clock.now())
    got = samples(metrics.exposition(reading).decode())
    assert got[("deliverylab_queue_messages", (("state", "visible"),))] == 3
    assert got[("deliverylab_oldest_message_age_seconds", ())] == 30
    assert got[("deliverylab_deliveries_total", ())] == reading.deliveries_total > 12
    assert got[("deliverylab_redeliveries_total", ())] == reading.redeliveries_total > 0
    families = {f.name: f.type for f in text_string_to_metric_families(
        metrics.exposition(reading).decode())}
    assert families["deliverylab_dead_lettered"] == "counter"
    assert families["deliverylab_dead_letters"] == "gauge"
    assert len(families) == len(metrics.FAMILIES)


def test_totals_match_the_trace_and_the_checker():
    lab = Lab(seed=2, faults=Faults(seed=2, ack_fail=0.4))
    lab.place_orders(20)
    lab.run_until_idle()
    r = metrics.signals(lab.store, now=lab.clock.now())
    stats = lab.stats()
    assert r.deliveries_total == stats.received
    assert r.redeliveries_total == stats.received - 20
    assert r.dead_letters == r.dead_lettered_total == stats.dead_lettered
    assert (r.reconcile_drift_qty, r.queue_visible) == (0, 0)


def test_drift_and_relay_backlog_are_seen():
    from deliverylab.engine.orders import place_order

    lab = Lab(seed=3)
    lab.place_orders(10)
    lab.lose_messages(2)
    lab.run_until_idle()
    place_order(None, item_id="tea", qty=1, order_id="o-out", store=lab.store, clock=lab.clock,
                ids=lab.ids)
    lab.advance(9)
    r = metrics.signals(lab.store, now=lab.clock.now())
    assert r.reconcile_drift_items >= 1 and r.reconcile_drift_qty >= 2
    assert (r.relay_backlog, r.relay_oldest_unsent_age_seconds) == (1, 9)


def test_signals_refuse_a_non_store():
    with pytest.raises(InvalidInput, match="conn"):
        metrics.signals("lab.db", now=0)
    with pytest.raises(InvalidInput, match="reading"):
        metrics.exposition({"now": 0})


def test_api_serves_metrics_in_the_text_format(tmp_path: Path):
    path = tmp_path / "api.db"
    store.init_db(path).close()
    with TestClient(create_app(path)) as client:
        assert client.post("/orders", json={"itemId": "tea", "qty": 2}).status_code == 201
        resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(resp.text)
    assert got[("deliverylab_queue_messages", (("state", "visible"),))] == 1
    assert got[("deliverylab_relay_backlog", ())] == 0


def test_status_prints_the_same_numbers(capsys, tmp_path: Path):
    lab = Lab(tmp_path / "s.db", seed=6, faults=Faults(seed=6, ack_fail=0.5))
    lab.place_orders(8)
    lab.run_until_idle()
    lab.store.close()
    code, out, _ = run(capsys, "status", "--db", str(tmp_path / "s.db"))
    assert code == 0
    conn = store.connect(tmp_path / "s.db")
    r = metrics.signals(conn, now=0)
    assert f"redeliveries           {r.redeliveries_total} of {r.deliveries_total}" in out
    code, out, _ = run(capsys, "status", "--db", str(tmp_path / "s.db"), "--json")
    assert json.loads(out)["signals"]["deliveries_total"] == r.deliveries_total
