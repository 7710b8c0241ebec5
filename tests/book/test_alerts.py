"""Chapter 8, what to alert on: the rules as Prometheus reads them, and each one firing."""

from __future__ import annotations

import re

import pytest
import yaml

from deliverylab.app.metrics import FAMILIES, PREFIX
from deliverylab.book import alerts


def test_rules_file_is_valid_yaml_with_one_rule_per_alert():
    doc = yaml.safe_load(alerts.rules_yaml())
    rules = doc["groups"][0]["rules"]
    assert [r["alert"] for r in rules] == [r.alert for r in alerts.RULES]
    assert all(set(r) == {"alert", "expr", "for", "annotations"} for r in rules)


def test_every_metric_a_rule_names_is_exported():
    exported = set()
    for name, kind, _, _ in FAMILIES:
        exported.add(f"{PREFIX}_{name}" + ("_total" if kind == "counter" else ""))
        if kind == "counter":  # a rule names the sample, which carries the _total suffix
            exported.add(f"{PREFIX}_{name}_total")
    for rule in alerts.RULES:
        for metric in re.findall(rf"{PREFIX}_\w+", rule.expr()):
            assert metric in exported, (rule.alert, metric)


def test_every_rule_fires_on_its_fault_and_is_quiet_when_healthy():
    table = alerts.fire_table()
    assert not table["healthy fires"].any()
    assert table["faulty fires"].all()
    assert len(table) == len(alerts.RULES)


@pytest.mark.parametrize("rule, expected", [
    (alerts.Rule("A", "dead_letters", "value", 0), "deliverylab_dead_letters > 0"),
    (alerts.Rule("B", "acks_refused_total", "increase", 0, window="10m"),
     "increase(deliverylab_acks_refused_total[10m]) > 0"),
    (alerts.Rule("C", "redeliveries_total", "ratio", 0.2, per="deliveries_total"),
     "increase(deliverylab_redeliveries_total[5m]) / increase(deliverylab_deliveries_total[5m])"
     " > 0.2"),
])
def test_expr(rule, expected):
    assert rule.expr() == expected


def test_evaluate_refuses_an_unknown_form():
    from deliverylab.app.metrics import signals
    from deliverylab.book.lab import Lab

    reading = signals(Lab().store, now=0)
    with pytest.raises(Exception, match="form"):
        alerts.evaluate(alerts.Rule("X", "dead_letters", "avg", 0), reading, reading)
