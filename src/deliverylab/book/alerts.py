"""Chapter 8, "What to alert on": one Prometheus alerting rule per signal, and a run that
makes each one fire.

Every rule is data (:class:`Rule`): from it come both the text a reader pastes into a
Prometheus rules file (:func:`rules_yaml`) and the evaluation this module makes of it over
two readings of :mod:`deliverylab.app.metrics` (:func:`evaluate`), so the rule shown is the
rule tested. The evaluation covers the forms used here and no more: a gauge's value, a
counter's ``increase`` over the window, and the ratio of two increases. ``for`` (how long a
condition must hold before the alert fires) is Prometheus's to apply; a run here checks the
condition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..app.metrics import PREFIX, Signals, signals
from ..engine.errors import InvalidInput
from ..engine.faults import Faults
from ..engine.orders import place_order
from .lab import Lab

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Rule:
    """``alert`` fires when ``form`` of ``metric`` (over ``window``) exceeds ``threshold``.
    ``form``: ``value`` (a gauge), ``increase`` (a counter over the window) or ``ratio``
    (the increase of ``metric`` over the increase of ``per``)."""

    alert: str
    metric: str
    form: str
    threshold: float
    window: str = "5m"
    for_: str = "5m"
    per: str | None = None
    summary: str = ""

    def expr(self) -> str:
        m = f"{PREFIX}_{self.metric}"
        if self.form == "value":
            left = m
        elif self.form == "increase":
            left = f"increase({m}[{self.window}])"
        else:
            left = (f"increase({m}[{self.window}])"
                    f" / increase({PREFIX}_{self.per}[{self.window}])")
        return f"{left} > {self.threshold:g}"


RULES = (
    Rule("MessagesWaitingTooLong", "oldest_message_age_seconds", "value", 60, for_="2m",
         summary="the oldest message has waited over a minute: workers stopped, stuck or too"
                 " few"),
    Rule("DeadLettersWaiting", "dead_letters", "value", 0, for_="15m",
         summary="messages sit in the dead letters: read their last error, fix, redrive"),
    Rule("DeadLettersGrowing", "dead_lettered_total", "increase", 0, window="10m", for_="0m",
         summary="a message was dead-lettered just now: a new poison message or a failing"
                 " dependency"),
    Rule("RedeliveriesHigh", "redeliveries_total", "ratio", 0.2, per="deliveries_total",
         summary="over a fifth of deliveries are redeliveries: lost ACKs, crashes, or a lease"
                 " shorter than the work"),
    Rule("AcksRefused", "acks_refused_total", "increase", 0, for_="0m",
         summary="a worker settled a message after its lease ran out: a zombie"),
    Rule("EffectsFenced", "effects_fenced_total", "increase", 0, for_="0m",
         summary="a fence refused an effect: a zombie's write, or an event a repair counted"),
    Rule("ProjectionDrift", "reconcile_drift_qty", "value", 0, for_="10m",
         summary="the projection differs from the truth: run reconcile and find out why"),
    Rule("RelayBehind", "relay_oldest_unsent_age_seconds", "value", 60, for_="2m",
         summary="the outbox holds an event unpublished for over a minute: the relay is down"
                 " or the broker refuses it"),
)


def rules_yaml(rules: tuple[Rule, ...] = RULES) -> str:
    """The rules as a Prometheus rules file (one group), ready to paste."""
    lines = ["groups:", "  - name: deliverylab", "    rules:"]
    for r in rules:
        lines += [f"      - alert: {r.alert}", f"        expr: {r.expr()}",
                  f"        for: {r.for_}", "        annotations:",
                  f"          summary: \"{r.summary}\""]
    return "\n".join(lines) + "\n"


def evaluate(rule: Rule, before: Signals, after: Signals) -> float:
    """The rule's left-hand side over two readings taken a window apart."""
    def increase(name: str) -> float:
        return getattr(after, name) - getattr(before, name)

    if rule.form == "value":
        return float(getattr(after, rule.metric))
    if rule.form == "increase":
        return float(increase(rule.metric))
    if rule.form == "ratio":
        total = increase(rule.per or "")
        return round(increase(rule.metric) / total, 3) if total else 0.0
    raise InvalidInput("form", rule.form, "value, increase or ratio")


def _reading(lab: Lab) -> Signals:
    return signals(lab.store, now=lab.clock.now())


# -- runs that make each rule fire --------------------------------------------------------------
def _stalled(lab: Lab) -> None:  # orders come in, no worker takes them
    lab.place_orders(5)
    lab.advance(120)


def _poison(lab: Lab) -> None:  # a message no handler can apply
    lab.broker.send("evt-poison", "OrderPlaced", {"orderId": "o-x", "itemId": "tea",
                                                 "qty": "three"}, correlation_id="o-x")
    lab.run_until_idle()


def _lost_acks(lab: Lab) -> None:
    lab.workers[0].faults = Faults(seed=3, ack_fail=0.5)
    lab.place_orders(20)
    lab.run_until_idle()


def _zombie(lab: Lab, fence: bool) -> None:
    from .zombies import zombie_story

    lab.place_order("coffee-beans", 1, order_id="o-001")
    zombie_story(lab.store, lab.broker, lab.clock, fence=fence, pause=lab.clock.advance)


def _lost_messages(lab: Lab) -> None:
    lab.place_orders(10)
    lab.lose_messages(2)
    lab.run_until_idle()


def _relay_down(lab: Lab) -> None:  # orders written to the outbox, no relay running
    for i in range(3):
        place_order(None, item_id="tea", qty=1, order_id=f"o-out-{i}", store=lab.store,
                    clock=lab.clock, ids=lab.ids)
    lab.advance(120)


FAULTS = {
    "MessagesWaitingTooLong": ("workers stopped for 2 minutes", _stalled),
    "DeadLettersWaiting": ("a poison message", _poison),
    "DeadLettersGrowing": ("a poison message", _poison),
    "RedeliveriesHigh": ("half the ACKs lost", _lost_acks),
    "AcksRefused": ("a worker paused past its lease", lambda lab: _zombie(lab, False)),
    "EffectsFenced": ("the same, with a fencing token", lambda lab: _zombie(lab, True)),
    "ProjectionDrift": ("two messages lost", _lost_messages),
    "RelayBehind": ("the relay down for 2 minutes", _relay_down),
}


def _healthy(lab: Lab) -> None:
    lab.place_orders(20)
    lab.run_until_idle()


def fire_table(rules: tuple[Rule, ...] = RULES, *, seed: int = 5) -> pd.DataFrame:
    """Each rule on a healthy run (20 orders, no faults) and on the run made to fire it: the
    value of its condition and whether it holds."""
    import pandas as pd

    rows = []
    for rule in rules:
        what, fault = FAULTS[rule.alert]
        values = []
        for run in (_healthy, fault):
            lab = Lab(seed=seed)
            if run is fault:
                _healthy(lab)  # the same healthy traffic first
            before = _reading(lab)
            run(lab)
            values.append(evaluate(rule, before, _reading(lab)))
        rows.append({"alert": rule.alert, "fault": what, "healthy": values[0],
                     "healthy fires": values[0] > rule.threshold, "faulty": values[1],
                     "faulty fires": values[1] > rule.threshold})
    return pd.DataFrame(rows).set_index("alert")
