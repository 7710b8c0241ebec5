"""The trace: every delivery leaves rows in ``delivery_log``.

Each row carries the correlation id (the order id), the event id, the message id, the
delivery count and the outcome, stamped with the injected clock. A row that records a state
change is written in the same transaction as the change, so the log never claims an effect
that did not commit.
"""

from __future__ import annotations

import sqlite3
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


class Outcome(StrEnum):
    RECEIVED = "received"
    APPLIED = "applied"
    DUPLICATE_SKIPPED = "duplicate_skipped"
    ACK_FAILED = "ack_failed"
    ACKED = "acked"
    ACK_REJECTED = "ack_rejected"
    CRASHED = "crashed"
    LOST = "lost"
    NACKED = "nacked"
    EXTENDED = "extended"
    DEAD_LETTERED = "dead_lettered"
    REDRIVEN = "redriven"
    RECONCILED = "reconciled"


def log(conn: sqlite3.Connection, *, at: float, worker: str, event_id: str,
        correlation_id: str | None, message_id: str | None, delivery_count: int,
        outcome: Outcome, detail: str = "") -> None:
    """Append one row. Call it inside the transaction whose change it records."""
    conn.execute(
        "INSERT INTO delivery_log (at, worker, correlation_id, event_id, message_id,"
        " delivery_count, outcome, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (at, worker, correlation_id, event_id, message_id, delivery_count, outcome.value, detail),
    )


def log_many(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Rows of (at, worker, correlation_id, event_id, message_id, delivery_count, outcome,
    detail), appended in one statement."""
    conn.executemany(
        "INSERT INTO delivery_log (at, worker, correlation_id, event_id, message_id,"
        " delivery_count, outcome, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(*r[:6], str(r[6]), *r[7:]) for r in rows],
    )


COLUMNS = ["seq", "at", "worker", "correlation_id", "event_id", "message_id",
           "delivery_count", "outcome", "detail"]


def log_frame(conn: sqlite3.Connection, *, correlation_id: str | None = None,
              event_id: str | None = None) -> pd.DataFrame:
    """The delivery log as a DataFrame, optionally for one order or one event, in order."""
    import pandas as pd

    sql = f"SELECT {', '.join(COLUMNS)} FROM delivery_log"
    args: list[Any] = []
    if correlation_id is not None:
        sql += " WHERE correlation_id = ?"
        args.append(correlation_id)
    elif event_id is not None:
        sql += " WHERE event_id = ?"
        args.append(event_id)
    rows = [tuple(r) for r in conn.execute(sql + " ORDER BY seq", args)]
    return pd.DataFrame(rows, columns=COLUMNS)


def timeline(conn: sqlite3.Connection, correlation_id: str) -> pd.DataFrame:
    """One order's story: each delivery of its event with what happened to it, in order."""
    frame = log_frame(conn, correlation_id=correlation_id)
    return frame[["at", "worker", "delivery_count", "outcome", "detail", "message_id"]] \
        .reset_index(drop=True)


def delivery_counts(conn: sqlite3.Connection) -> pd.DataFrame:
    """How many deliveries each event needed: one row per event that was received."""
    import pandas as pd

    rows = conn.execute(
        "SELECT event_id, max(delivery_count) FROM delivery_log WHERE outcome = 'received'"
        " GROUP BY event_id ORDER BY event_id").fetchall()
    return pd.DataFrame([tuple(r) for r in rows], columns=["event_id", "deliveries"])


# Which lane of a swimlane picture each outcome belongs to.
LANES = {
    "received": "queue", "acked": "queue", "ack_rejected": "queue", "nacked": "queue",
    "extended": "queue", "dead_lettered": "queue", "redriven": "queue", "lost": "queue",
    "applied": "database", "duplicate_skipped": "database", "reconciled": "database",
    "ack_failed": "worker", "crashed": "worker",
}


def plot_timeline(conn: sqlite3.Connection, correlation_id: str, ax: Any = None) -> Any:
    """A swimlane picture (worker, queue, database) of one order's deliveries, from the log."""
    import matplotlib.pyplot as plt

    frame = timeline(conn, correlation_id)
    lanes = ["worker", "queue", "database"]
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 2.8))
    for i in range(len(lanes)):
        ax.axhline(i, color="#dddddd", zorder=0)
    for k, row in enumerate(frame.itertuples()):
        lane = LANES.get(row.outcome, "worker")
        y = lanes.index(lane)
        color = {"applied": "tab:green", "duplicate_skipped": "tab:blue",
                 "ack_failed": "tab:red", "crashed": "tab:red", "lost": "tab:red",
                 "dead_lettered": "tab:purple"}.get(row.outcome, "tab:gray")
        ax.scatter([row.at], [y], color=color, zorder=3)
        ax.annotate(f"{row.outcome} #{row.delivery_count}", (row.at, y),
                    textcoords="offset points", xytext=(0, 8 + 10 * (k % 2)),
                    ha="center", fontsize=8)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_ylim(-0.6, len(lanes) - 0.2)
    ax.set_xlabel("time on the clock (s)")
    ax.set_title(f"deliveries of order {correlation_id}")
    return ax
