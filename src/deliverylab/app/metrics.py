"""The signals an operator alerts on, read from the consumer's store, in Prometheus's format.

Each signal is the symptom of a failure the course taught:

====================================  ================================================
signal                                what it reveals
====================================  ================================================
oldest message age                    workers stopped, stuck, or too few for the load
dead letters (depth) and their total  poison messages; a growth is a new incident
deliveries and redeliveries (totals)  lost ACKs, crashes, leases shorter than the work
refused ACKs and fenced effects       zombies: a lease ran out under a worker still at work
reconcile drift                       events lost or applied twice: the projection is wrong
relay backlog (rows, oldest age)      the outbox relay is down or the broker refuses it
====================================  ================================================

:func:`signals` reads them all in one snapshot of the store as plain numbers;
:func:`exposition` renders them in the Prometheus text format with ``prometheus_client``
(what the API serves at ``/metrics``); :func:`render` prints them for ``deliverylab status``.
The totals are counted from ``delivery_log``, so they survive a restart of every process, as
Prometheus expects of a counter. The rules that alert on them are in
:mod:`deliverylab.book.alerts`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from ..engine.check import projection_vs_truth
from ..engine.errors import InvalidInput, check_number
from ..engine.store import OUTBOX_TABLE, Store, is_store, missing_tables
from .status import snapshot

if TYPE_CHECKING:
    from ..brokers.base import Broker

PREFIX = "deliverylab"
# The text format version 0.0.4, which every Prometheus server scrapes (generate_latest writes
# it; the library's CONTENT_TYPE_LATEST names a newer version).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# The delivery_log outcomes each total counts.
_TOTALS_SQL = """
    SELECT sum(CASE WHEN outcome = 'received' THEN 1 ELSE 0 END),
           sum(CASE WHEN outcome = 'received' AND delivery_count > 1 THEN 1 ELSE 0 END),
           sum(CASE WHEN outcome = 'dead_lettered' THEN 1 ELSE 0 END),
           sum(CASE WHEN outcome = 'ack_rejected' THEN 1 ELSE 0 END),
           sum(CASE WHEN outcome = 'fenced' THEN 1 ELSE 0 END)
      FROM delivery_log
"""


@dataclass(frozen=True)
class Signals:
    """One reading of every signal, at ``now`` (seconds on the store's clock)."""

    now: float
    queue_visible: int
    queue_in_flight: int
    oldest_message_age_seconds: float
    dead_letters: int
    dead_lettered_total: int
    deliveries_total: int
    redeliveries_total: int
    acks_refused_total: int
    effects_fenced_total: int
    reconcile_drift_qty: int
    reconcile_drift_items: int
    relay_backlog: int
    relay_oldest_unsent_age_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def signals(conn: Store, *, now: float, broker: Broker | None = None) -> Signals:
    """Every signal, read from the store ``conn`` at ``now``. ``broker``: where the messages
    wait when it is not the queue table of the store's own database (RabbitMQ, JetStream);
    its depth and dead letters are then asked of it, and the oldest message's age is that of
    the oldest order whose event it still holds."""
    if not is_store(conn):
        raise InvalidInput("conn", conn, "a store connection")
    now = check_number("now", now)
    with snapshot(conn):  # one state of the store for every signal
        if broker is None:
            visible, total, oldest = conn.execute(
                "SELECT coalesce(sum(CASE WHEN visible_at <= ? THEN 1 ELSE 0 END), 0), count(*),"
                " min(created_at)"
                " FROM queue_messages", (now,)).fetchone()
            dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        else:
            depth = broker.depth()
            visible, total = depth["visible"], depth["visible"] + depth["in_flight"]
            oldest = conn.execute(
                "SELECT min(created_at) FROM orders WHERE event_id IN"
                " (SELECT value FROM json_each(?))",
                (json.dumps(sorted(broker.queued_event_ids())),)).fetchone()[0]
            dead = len(broker.dead_lettered_event_ids())
        totals = [n or 0 for n in conn.execute(_TOTALS_SQL).fetchone()]
        deltas = [d for _, _, _, d in projection_vs_truth(conn) if d != 0]
        backlog, unsent_since = 0, None
        if not missing_tables(conn, (OUTBOX_TABLE,)):
            backlog, unsent_since = conn.execute(
                "SELECT count(*), min(created_at) FROM outbox WHERE sent_at IS NULL").fetchone()
    return Signals(
        now=now, queue_visible=int(visible), queue_in_flight=int(total - visible),
        oldest_message_age_seconds=_age(now, oldest), dead_letters=int(dead),
        dead_lettered_total=totals[2], deliveries_total=totals[0],
        redeliveries_total=totals[1], acks_refused_total=totals[3],
        effects_fenced_total=totals[4], reconcile_drift_qty=sum(abs(d) for d in deltas),
        reconcile_drift_items=len(deltas), relay_backlog=int(backlog),
        relay_oldest_unsent_age_seconds=_age(now, unsent_since))


def _age(now: float, since: float | None) -> float:
    return 0.0 if since is None else round(max(0.0, now - since), 6)


# (name, type, help, Signals field or fields by label) for every metric family.
FAMILIES: tuple[tuple[str, str, str, Any], ...] = (
    ("queue_messages", "gauge", "Messages in the queue, by state (visible, or in flight:"
     " leased or waiting to retry).", ("state", {"visible": "queue_visible",
                                                  "in_flight": "queue_in_flight"})),
    ("oldest_message_age_seconds", "gauge", "Age of the oldest message still in the queue"
     " (0 when empty).", "oldest_message_age_seconds"),
    ("dead_letters", "gauge", "Messages parked in the dead letters now.", "dead_letters"),
    ("dead_lettered", "counter", "Messages ever moved to the dead letters.",
     "dead_lettered_total"),
    ("deliveries", "counter", "Deliveries handed to a worker.", "deliveries_total"),
    ("redeliveries", "counter", "Deliveries whose delivery count was above 1.",
     "redeliveries_total"),
    ("acks_refused", "counter", "ACKs, nacks and dead-letters refused for a stale receipt:"
     " a lease had run out under a worker.", "acks_refused_total"),
    ("effects_fenced", "counter", "Effects refused by a fence (a repair had counted the"
     " event, or a newer lease had written).", "effects_fenced_total"),
    ("reconcile_drift_qty", "gauge", "Sum over items of |projection - truth|.",
     "reconcile_drift_qty"),
    ("reconcile_drift_items", "gauge", "Items whose projection differs from the truth.",
     "reconcile_drift_items"),
    ("relay_backlog", "gauge", "Outbox rows not yet published by the relay.",
     "relay_backlog"),
    ("relay_oldest_unsent_age_seconds", "gauge", "Age of the oldest outbox row not yet"
     " published (0 when none).", "relay_oldest_unsent_age_seconds"),
)


class _Collector:
    """A prometheus_client collector over one :class:`Signals` reading."""

    def __init__(self, reading: Signals) -> None:
        self.reading = reading

    def collect(self) -> Any:
        for name, kind, help_text, source in FAMILIES:
            full = f"{PREFIX}_{name}"
            if isinstance(source, tuple):
                label, fields = source
                family: GaugeMetricFamily | CounterMetricFamily = GaugeMetricFamily(
                    full, help_text, labels=[label])
                for value, field in fields.items():
                    family.add_metric([value], getattr(self.reading, field))
            elif kind == "counter":
                family = CounterMetricFamily(full, help_text,
                                             value=getattr(self.reading, source))
            else:
                family = GaugeMetricFamily(full, help_text, value=getattr(self.reading, source))
            yield family


def exposition(reading: Signals) -> bytes:
    """``reading`` in the Prometheus text exposition format (version 0.0.4), as the
    ``/metrics`` endpoint serves it."""
    if not isinstance(reading, Signals):
        raise InvalidInput("reading", reading, "a Signals from metrics.signals")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(reading))
    return generate_latest(registry)


def render(reading: Signals) -> str:
    """The same numbers as :func:`exposition`, as lines for a terminal."""
    r = reading
    return "\n".join([
        "signals (the numbers /metrics serves)",
        f"  oldest message age     {r.oldest_message_age_seconds:g} s",
        f"  dead letters           {r.dead_letters} now, {r.dead_lettered_total} ever",
        f"  redeliveries           {r.redeliveries_total} of {r.deliveries_total} deliveries",
        f"  refused ACKs           {r.acks_refused_total}",
        f"  fenced effects         {r.effects_fenced_total}",
        f"  reconcile drift        {r.reconcile_drift_qty} (qty) over"
        f" {r.reconcile_drift_items} item(s)",
        f"  relay backlog          {r.relay_backlog} row(s), oldest"
        f" {r.relay_oldest_unsent_age_seconds:g} s",
    ])
