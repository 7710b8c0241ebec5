"""The trace, read and drawn: the delivery log as DataFrames, one order's timeline, its
leases, and the swimlane picture. The rows are written by ``deliverylab.engine.trace``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..engine.store import Store

if TYPE_CHECKING:
    import pandas as pd


COLUMNS = ["seq", "at", "worker", "correlation_id", "event_id", "message_id",
           "delivery_count", "outcome", "detail"]


def log_frame(conn: Store, *, correlation_id: str | None = None,
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


def timeline(conn: Store, correlation_id: str) -> pd.DataFrame:
    """One order's story: each delivery of its event with what happened to it, in order."""
    frame = log_frame(conn, correlation_id=correlation_id)
    return frame[["at", "worker", "delivery_count", "outcome", "detail", "message_id"]] \
        .reset_index(drop=True)


def delivery_counts(conn: Store) -> pd.DataFrame:
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
    "fenced": "database",
    "ack_failed": "worker", "crashed": "worker",
}


# How plot_timeline draws each outcome: an arrow between two lanes, or a mark on one lane.
ARROWS = {
    "received": ("queue", "worker"), "applied": ("worker", "database"),
    "duplicate_skipped": ("worker", "database"), "fenced": ("worker", "database"),
    "acked": ("worker", "queue"),
    "ack_failed": ("worker", "queue"), "ack_rejected": ("worker", "queue"),
    "nacked": ("worker", "queue"), "extended": ("worker", "queue"),
}
_LABELS = {
    "received": "received", "applied": "applied", "duplicate_skipped": "duplicate skipped",
    "acked": "acked", "ack_failed": "ACK lost", "ack_rejected": "ACK rejected",
    "nacked": "nacked", "extended": "lease extended", "crashed": "crashed", "lost": "lost",
    "dead_lettered": "dead-lettered", "redriven": "redriven", "reconciled": "reconciled",
    "fenced": "fenced (counted by reconcile)",
}
_COLORS = {
    "received": "#555555", "applied": "tab:green", "duplicate_skipped": "tab:blue",
    "acked": "#222222", "ack_failed": "tab:red", "ack_rejected": "tab:orange",
    "nacked": "tab:orange", "extended": "#555555", "crashed": "tab:red", "lost": "tab:red",
    "dead_lettered": "tab:purple", "redriven": "tab:purple", "reconciled": "tab:green",
    "fenced": "tab:cyan",
}
# A delivery's lease ends early when one of these settles it (the message leaves the queue
# or becomes visible again on purpose).
_SETTLES = {"acked", "nacked", "dead_lettered", "lost"}
_LEASE = re.compile(r"lease until ([0-9.e+-]+)")


def leases(frame: pd.DataFrame) -> list[tuple[int, float, float, bool]]:
    """(delivery, start, end, expired) for each delivery in a :func:`timeline` frame.

    A lease starts when the delivery is received and ends at its ``lease until`` time (moved
    by ``extended`` rows), or earlier when the delivery is settled (acked, nacked,
    dead-lettered, dropped). ``expired`` is true when it ran out unsettled and a later
    delivery of the same message followed: the visibility timeout passed and the queue
    redelivered.
    """
    out = []
    rows: list[Any] = list(frame.itertuples())  # named tuples of the frame's columns
    for i, row in enumerate(rows):
        if row.outcome != "received":
            continue
        n, start = row.delivery_count, float(row.at)
        m = _LEASE.search(row.detail or "")
        end = float(m.group(1)) if m else start
        settled = None
        later = False
        for other in rows[i + 1:]:
            if other.delivery_count != n:
                later = later or other.outcome == "received"
                continue
            if other.outcome == "extended":
                m = _LEASE.search(other.detail or "")
                end = float(m.group(1)) if m else end
            elif other.outcome in _SETTLES and settled is None:
                settled = float(other.at)
        if settled is not None and settled <= end:
            out.append((n, start, settled, False))
        else:
            out.append((n, start, end, later))
    return out


def worker_mode(frame: pd.DataFrame) -> str | None:
    """The worker mode a :func:`timeline` frame was recorded under, when the log says it.

    A worker writes its mode on every ``applied`` row; a story in which nothing was applied
    (an auto-ack worker that crashed) does not say, and neither do rows from several modes.
    """
    from ..engine.worker import Mode

    modes = {d for d in frame.loc[frame["outcome"] == "applied", "detail"]
             if d in {m.value for m in Mode}}
    return modes.pop() if len(modes) == 1 else None


def plot_timeline(conn: Store, correlation_id: str, ax: Any = None, *,
                  mode: str | None = None) -> Any:
    """A swimlane picture (queue, worker, database) of one order's deliveries, from the log.

    Arrows run between the lanes: the queue hands a delivery to the worker, the worker
    commits to the database and sends its ACK back to the queue (a lost ACK stops halfway,
    marked x). The shaded bar on the queue lane is each delivery's lease; a dotted line marks
    a lease that ran out, after which the queue redelivered. Labels carry the delivery number.

    The title names the worker's ``mode`` (the same story means opposite things under
    different modes); without it, the mode the log's ``applied`` rows recorded, if any.
    """
    import matplotlib.pyplot as plt
    from matplotlib.transforms import offset_copy

    from ..engine.worker import Mode

    if mode is not None:
        mode = Mode.parse(mode).value
    frame = timeline(conn, correlation_id)
    mode = mode or (worker_mode(frame) if not frame.empty else None)
    lane_y = {"queue": 2.0, "worker": 1.0, "database": 0.0}
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.8))
    for y in lane_y.values():
        ax.axhline(y, color="#cccccc", lw=1, zorder=0)
    ax.set_yticks(list(lane_y.values()), list(lane_y))
    ax.set_ylim(-0.6, 2.8)
    ax.set_xlabel("time on the clock (s)")
    ax.set_title(f"deliveries of order {correlation_id}"
                 + (f", {mode} worker" if mode else ""))
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    if frame.empty:
        ax.text(0.5, 0.5, f"no deliveries logged for order {correlation_id} yet",
                transform=ax.transAxes, ha="center", va="center", color="#777777")
        return ax

    spans = leases(frame)
    t0 = float(frame["at"].min())
    t1 = max([float(frame["at"].max()), *(end for _, _, end, _ in spans)])
    width = max(t1 - t0, 1.0)
    ax.set_xlim(t0 - 0.2 * width, t0 + 1.2 * width)
    fig = ax.figure
    workers = frame["worker"].nunique()

    # Labels never overlap: each takes the first row of its slot where it fits. A slot is a
    # place beside a lane or an arrow band; rows step away from it by one line of text.
    per_point = 1.4 * width / (ax.get_position().width * fig.get_figwidth() * 72)
    slots: dict[tuple[float, str], list[list[tuple[float, float]]]] = {}

    def row_for(slot: tuple[float, str], x: float, text: str, align: str) -> int:
        size = (len(text) * 4.7 + 16) * per_point
        span = {"left": (x, x + size), "right": (x - size, x),
                "center": (x - size / 2, x + size / 2)}[align]
        rows = slots.setdefault(slot, [])
        for k, taken in enumerate(rows):
            if all(span[1] <= a or span[0] >= b for a, b in taken):
                taken.append(span)
                return k
        rows.append([span])
        return len(rows) - 1

    def say(text: str, x: float, y: float, slot: tuple[float, str], dx: float, dy: float,
            step: float, align: str, color: str, rows: int = 2) -> None:
        k = row_for(slot, x, text, align) % rows
        ax.annotate(text, xy=(x, y), xytext=(dx, dy + step * k), textcoords="offset points",
                    ha=align, va="center", fontsize=8, color=color)

    for n, start, end, expired in spans:
        ax.fill_between([start, end], 1.88, 2.12, color="tab:orange", alpha=0.25, lw=0,
                        zorder=1)
        if end - start >= 0.25 * width:
            ax.text((start + end) / 2, 2.0, f"lease #{n} (invisible until t={end:g})",
                    ha="center", va="center", fontsize=7, color="#8a4b00", zorder=2)
        if expired:
            ax.plot([end, end], [1.8, 2.25], ls=":", color="tab:orange", lw=1.5, zorder=2)
            say("lease expired: visible again", end, 2.0, (2.0, "above"), 0, 20, 12,
                "center", "#8a4b00")

    row: Any  # a named tuple of the frame's columns
    for row in frame.itertuples():
        outcome, x = row.outcome, float(row.at)
        color = _COLORS.get(outcome, "#555555")
        label = _LABELS.get(outcome, outcome)
        if row.delivery_count:
            label += f" #{row.delivery_count}"
        if workers > 1 and row.worker:
            label += f" ({row.worker})"
        if outcome == "applied" and row.detail == "transactional":
            # The effect and the ACK commit in one database transaction: draw it as one.
            ax.axvspan(x - 0.012 * width, x + 0.012 * width, color="tab:green", alpha=0.12,
                       lw=0, zorder=0)
            ax.text(x, -0.5, "one transaction", ha="center", va="center", fontsize=7,
                    color="tab:green")
        if outcome not in ARROWS:
            lane = LANES.get(outcome, "worker")
            y = lane_y[lane]
            ax.plot([x], [y], marker="X" if outcome in ("crashed", "lost") else "o", ms=9,
                    color=color, zorder=5)
            if lane == "queue":
                say(label, x, y, (y, "above"), 0, 20, 12, "center", color)
            else:
                say(label, x, y, (y, "below"), 7, -12, -12, "left", color)
            continue
        src, dst = (lane_y[lane] for lane in ARROWS[outcome])
        down = dst < src
        # Arrows at the same instant in opposite directions sit side by side (down a little
        # to the left, up a little to the right); their labels go outward on each side.
        shifted = offset_copy(ax.transData, fig=fig, x=-3 if down else 3, units="points")
        lost = outcome == "ack_failed"
        tip = (src + dst) / 2 + 0.05 if lost else dst
        ax.annotate("", xy=(x, tip), xytext=(x, src), xycoords=shifted, textcoords=shifted,
                    zorder=4, arrowprops={"arrowstyle": "-" if lost else "-|>", "color": color,
                                          "lw": 1.6, "shrinkA": 5, "shrinkB": 0 if lost else 5})
        if lost:
            ax.plot([x], [tip], marker="X", ms=9, color=color, transform=shifted, zorder=5)
        band = (src + dst) / 2
        gap = 13 if lost else 7  # clear of the x mark
        if down:
            say(label, x, band, (band, "down"), -gap, -7, -12, "right", color)
        else:
            say(label, x, band, (band, "up"), gap, 7, 12, "left", color)
    return ax
