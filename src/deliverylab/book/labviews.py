"""What the lab panel shows, as plain functions: DataFrames for the tables, a dict of counters,
a growing chart, and the HTML of each; and a run with reconciliation on a schedule.

The widget panel (:mod:`deliverylab.book.panel`) is a thin layer over these functions. The tests call
them directly, and the chapters print them as ordinary cell outputs, so a static page shows the
same tables a reader sees live.

>>> from deliverylab.engine.faults import Faults
>>> lab = Lab(seed=7, faults=Faults(seed=7, ack_fail=0.8))
>>> _ = lab.place_orders(3)
>>> _ = lab.run_until_idle()
>>> counters(lab.store)["applied"], counters(lab.store)["duplicated"]
(3, 0)
"""

from __future__ import annotations

import html
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ..engine.check import APPLICATIONS_CTE, drift_frame, projection_vs_truth
from ..engine.dialect import Cursor
from ..engine.errors import InvalidInput, check_int, check_number
from ..engine.faults import Faults
from ..engine.store import Store
from ..engine.worker import Mode, Worker
from .lab import Lab

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_LIMIT = 10

# (key, label) in display order. "duplicated" counts the extra applications of every effect
# that ran more than once, before a repair or after it: a repair fixes the projection, not the
# history (an email sent twice stays sent), so the count never goes down, and it agrees with the
# verdict, which names both ("+N extra", "... before the repair (+M extra)"). "lost" counts
# the orders whose effect never happened and never can; "repaired" the orders never applied
# by a worker that a repair counted instead (the verdict's "counted by the repair").
COUNTERS: tuple[tuple[str, str], ...] = (
    ("deliveries", "deliveries"),
    ("applied", "effects applied"),
    ("duplicates_skipped", "duplicates skipped"),
    ("duplicated", "effects duplicated"),
    ("lost", "effects lost"),
    ("repaired", "counted by a repair"),
    ("dead_lettered", "dead-lettered"),
)

# The series the chart draws, with their colours (matching the counters).
SERIES: tuple[tuple[str, str, str], ...] = (
    ("deliveries", "deliveries", "#7f7f7f"),
    ("applied", "effects applied", "#2ca02c"),
    ("duplicates_skipped", "duplicates skipped", "#1f77b4"),
    ("duplicated", "effects duplicated", "#d62728"),
    ("lost", "effects lost", "#ff7f0e"),
)

# Mirrors check.check: an order's applications are its 'applied' rows after its last
# 'reconciled' row, plus one for that row (n); the 'applied' rows before that row (before) are
# the history the repair hid: more than one is a duplicate it repaired, none an order it
# counted that no worker had applied. Computed in SQL so it stays cheap for the chart.
_COUNTERS_SQL = APPLICATIONS_CTE + """,
    per_order AS (
        SELECT o.event_id, coalesce(a.n, 0) + CASE WHEN r.rs IS NULL THEN 0 ELSE 1 END AS n,
               r.rs IS NOT NULL AS repaired, coalesce(a.before, 0) AS before
          FROM orders AS o
          LEFT JOIN applied AS a USING (event_id)
          LEFT JOIN last_rec AS r USING (event_id))
    SELECT
        (SELECT count(*) FROM orders),
        (SELECT CAST(coalesce(sum(CASE WHEN n > 1 THEN n - 1 ELSE 0 END)
                              + sum(CASE WHEN repaired AND before > 1 THEN before - 1 ELSE 0 END),
                              0) AS INTEGER) FROM per_order),
        (SELECT count(*) FROM per_order WHERE repaired AND before = 0),
        (SELECT count(*) FROM per_order AS p
          WHERE p.n = 0
            AND p.event_id NOT IN (SELECT event_id FROM queue_messages)
            AND p.event_id NOT IN (SELECT event_id FROM dead_letters)),
        (SELECT count(*) FROM queue_messages),
        (SELECT count(*) FROM dead_letters),
        (SELECT count(*) FROM inbox_processed)
"""


def counters(conn: Store) -> dict[str, int]:
    """Counts for the whole run so far, read from the database.

    ``deliveries``, ``applied`` and ``duplicates_skipped`` count delivery-log rows;
    ``duplicated``, ``lost`` and ``repaired`` agree with :func:`deliverylab.engine.check.check`
    and so with its verdict: ``duplicated`` is its ``extra_applications`` plus its
    ``repaired_extra_applications`` (a repair does not undo what already ran twice), ``lost``
    its ``lost``, ``repaired`` its ``repaired_never_applied``; ``orders``, ``queued``,
    ``dead_lettered`` and ``inbox`` are table sizes.
    """
    by_outcome = dict(conn.execute(
        "SELECT outcome, count(*) FROM delivery_log GROUP BY outcome").fetchall())
    orders, duplicated, repaired, lost, queued, dead, inbox = conn.execute(
        _COUNTERS_SQL).fetchone()
    return {
        "orders": orders,
        "deliveries": by_outcome.get("received", 0),
        "applied": by_outcome.get("applied", 0),
        "duplicates_skipped": by_outcome.get("duplicate_skipped", 0),
        "duplicated": duplicated,
        "lost": lost,
        "repaired": repaired,
        "dead_lettered": dead,
        "queued": queued,
        "inbox": inbox,
    }


def _frame(cur: Cursor) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame([tuple(r) for r in cur], columns=[c[0] for c in cur.description])


def _limit(limit: int | None) -> int:
    return -1 if limit is None else check_int("limit", limit, minimum=0)


def queue_view(conn: Store, now: float, limit: int | None = DEFAULT_LIMIT
               ) -> pd.DataFrame:
    """The queue, oldest message first: delivery counts, and whether each message is visible,
    leased (held by a worker until ``lease_until``) or delayed (nacked, waiting out a backoff).
    """
    frame = _frame(conn.execute(
        "SELECT message_id, correlation_id AS order_id, delivery_count AS deliveries,"
        " visible_at, lease_until, coalesce(last_error, '') AS last_error"
        " FROM queue_messages ORDER BY seq LIMIT ?", (_limit(limit),)))
    states = []
    for visible_at, lease in zip(frame["visible_at"], frame["lease_until"], strict=True):
        if visible_at <= now:
            states.append("visible")
        elif lease is not None and lease == lease:  # not None and not NaN: a worker holds it
            states.append("leased")
        else:
            states.append("delayed")
    frame.insert(3, "state", states)
    return frame


def inbox_view(conn: Store, limit: int | None = DEFAULT_LIMIT) -> pd.DataFrame:
    """The inbox (processed event ids), newest first, with the order each event belongs to."""
    return _frame(conn.execute(
        "SELECT i.event_id, o.order_id, i.processed_at FROM inbox_processed AS i"
        " LEFT JOIN orders AS o USING (event_id)"
        " ORDER BY i.processed_at DESC, o.created_at DESC, i.event_id DESC LIMIT ?",
        (_limit(limit),)))


def projection_view(conn: Store) -> pd.DataFrame:
    """The projection beside the truth, one row per item: ``delta`` is projection − truth."""
    return drift_frame(conn)


def dead_letter_view(conn: Store, limit: int | None = DEFAULT_LIMIT
                     ) -> pd.DataFrame:
    """Messages parked after too many receives, newest first, with their last error."""
    return _frame(conn.execute(
        "SELECT message_id, correlation_id AS order_id, delivery_count AS deliveries,"
        " last_error, dead_at FROM dead_letters ORDER BY dead_at DESC, message_id LIMIT ?",
        (_limit(limit),)))


# -- reconfiguring a running lab -------------------------------------------------------------
def reconfigure(lab: Lab, *, mode: Mode | str | None = None, faults: Faults | None = None,
                visibility_timeout: float | None = None, workers: int | None = None) -> Lab:
    """Change a lab's knobs between steps, keeping its database, clock and queue.

    The new settings apply from the next delivery: messages already processed stay as they
    are. Extra workers are clones of the first one; removed workers simply stop stepping.
    Returns the lab.
    """
    if not isinstance(lab, Lab):
        raise InvalidInput("lab", lab, "a deliverylab.book.lab.Lab")
    new_mode = Mode.parse(mode) if mode is not None else lab.mode
    if faults is not None and not isinstance(faults, Faults):
        raise InvalidInput("faults", faults, "a deliverylab.engine.faults.Faults")
    vt = (check_number("visibility_timeout", visibility_timeout, minimum=0, maximum=12 * 3600)
          if visibility_timeout is not None else None)
    n = check_int("workers", workers, minimum=1, maximum=16) if workers is not None else None
    lab.mode = new_mode
    if faults is not None:
        lab.faults = faults
    first = lab.workers[0]
    if n is not None and n > len(lab.workers):
        lab.workers.extend(
            Worker(store=lab.store, clock=lab.clock, mode=new_mode, faults=lab.faults,
                   visibility_timeout=first.visibility_timeout,
                   max_messages=first.max_messages, backoff_base=first.backoff_base,
                   backoff_cap=first.backoff_cap, name=f"worker-{i + 1}",
                   consumer=first.consumer, handler=first.handler, echo=first.echo,
                   work_time=first.work_time, broker=lab.broker)
            for i in range(len(lab.workers), n))
    elif n is not None:
        del lab.workers[n:]
    for w in lab.workers:
        w.mode = new_mode
        w.faults = lab.faults
        if vt is not None:
            w.visibility_timeout = vt
    return lab


# -- the chart -------------------------------------------------------------------------------
@dataclass
class History:
    """Counters recorded as a run proceeds, one row per recorded step, for the chart.

    It keeps at most ``max_points`` rows: when full, every other row is dropped (the last one
    is always kept), so a long run still draws quickly.
    """

    max_points: int = 400
    rows: list[dict[str, float]] = field(default_factory=list)

    def record(self, step: int, t: float, counts: Mapping[str, int]) -> None:
        row: dict[str, float] = {"step": step, "t": round(t, 6)}
        row.update({key: counts[key] for key, _, _ in SERIES})
        if self.rows and self.rows[-1]["step"] == step:
            self.rows[-1] = row
        else:
            self.rows.append(row)
        if len(self.rows) > self.max_points:
            self.rows = self.rows[:-1:2] + [self.rows[-1]]

    def frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["step", "t", *[k for k, _, _ in SERIES]])

    def __len__(self) -> int:
        return len(self.rows)


def _fmt(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def svg_chart(rows: Iterable[Mapping[str, float]], *, width: int = 460,
              height: int = 220) -> str:
    """Cumulative counters against steps, as a small self-contained SVG line chart."""
    rows = list(rows)
    left, right, top, bottom = 44, 10, 10, 64
    pw, ph = width - left - right, height - top - bottom
    max_x = max([r["step"] for r in rows] + [1])
    max_y = max([r[k] for r in rows for k, _, _ in SERIES] + [1])

    def x(v: float) -> str:
        return _fmt(left + pw * v / max_x)

    def y(v: float) -> str:
        return _fmt(top + ph - ph * v / max_y)

    out = [f'<svg class="dl-chart-svg" xmlns="http://www.w3.org/2000/svg" width="{width}"'
           f' height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif"'
           f' font-size="11" role="img" aria-label="counters as the run proceeds">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa"'
           ' stroke="#cccccc"/>']
    for frac in (0.5, 1.0):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(max_y * frac)}"'
                   f' y2="{y(max_y * frac)}" stroke="#e5e5e5"/>')
    out.append(f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{max_y}</text>')
    out.append(f'<text x="{left - 4}" y="{top + ph}" text-anchor="end">0</text>')
    out.append(f'<text x="{left}" y="{top + ph + 14}">0</text>')
    out.append(f'<text x="{left + pw}" y="{top + ph + 14}" text-anchor="end">'
               f'step {int(max_x)}</text>')
    if not rows:
        out.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle"'
                   ' fill="#777777">no steps yet</text>')
    for key, label, colour in SERIES:
        if rows:
            points = " ".join(f"{x(r['step'])},{y(r[key])}" for r in rows)
            out.append(f'<polyline points="{points}" fill="none" stroke="{colour}"'
                       f' stroke-width="2"><title>{label}</title></polyline>')
    for i, (key, label, colour) in enumerate(SERIES):
        lx = left + (i % 3) * (pw // 3)
        ly = top + ph + 32 + (i // 3) * 15
        last = rows[-1][key] if rows else 0
        out.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{lx + 14}" y="{ly + 1}">{label} ({last})</text>')
    out.append("</svg>")
    return "".join(out)


# -- HTML ------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _caption(title: str, total: int, shown: int) -> str:
    more = "" if total == shown else f", showing {shown}"
    return (f'<div class="dl-caption"><b>{html.escape(title)}</b>:'
            f' <span class="dl-rows" data-rows="{total}">{total} row{"s" * (total != 1)}'
            f"</span>{more}</div>")


def table_html(frame: pd.DataFrame, *, title: str, total: int | None = None,
               highlight: Callable[[Mapping[str, Any]], bool] | None = None,
               highlight_style: str = "background-color: #fff3cd") -> str:
    """A captioned HTML table; rows where ``highlight(row)`` is true are shaded. ``total`` is
    the table's full size when ``frame`` holds only some of its rows.

    Written by hand rather than with pandas' Styler: the panel redraws several tables after
    every step, and this is some fifty times faster for a few rows.
    """
    total = len(frame) if total is None else total
    head = _caption(title, total, len(frame))
    if frame.empty:
        return head + '<div class="dl-empty">(empty)</div>'
    columns = list(frame.columns)
    out = [head, '<table class="dl-table"><thead><tr>']
    out.extend(f"<th>{html.escape(str(c))}</th>" for c in columns)
    out.append("</tr></thead><tbody>")
    for values in frame.itertuples(index=False, name=None):
        row = dict(zip(columns, values, strict=True))
        style = f' style="{highlight_style}"' if highlight is not None and highlight(row) else ""
        out.append(f"<tr{style}>" + "".join(f"<td>{_cell(v)}</td>" for v in values) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def projection_html(frame: pd.DataFrame, *, uuid: str = "dl-projection") -> str:
    """The projection beside the truth, rendered by pandas' Styler: an item whose projection
    differs from the truth is shaded red, its ``delta`` in bold."""
    rows = tuple(frame.itertuples(index=False, name=None))
    return _projection_html(rows, tuple(frame.columns), uuid)


@lru_cache(maxsize=64)
def _projection_html(rows: tuple[tuple[Any, ...], ...], columns: tuple[str, ...],
                     uuid: str) -> str:
    # Memoised on the table's content: the Styler is the slowest part of a redraw, and the
    # projection changes far less often than the queue.
    import pandas as pd

    frame = pd.DataFrame(list(rows), columns=list(columns))
    head = _caption("Projection beside the truth", len(frame), len(frame))
    if frame.empty:
        return head + '<div class="dl-empty">(empty)</div>'
    drift = "background-color: #fde2e1"

    def shade(row: pd.Series) -> list[str]:
        return [drift + ("; font-weight: bold" if col == "delta" else "")
                if row["delta"] != 0 else "" for col in row.index]

    styler = (frame.style.hide(axis="index").apply(shade, axis=1)
              .set_uuid(uuid).set_table_attributes('class="dl-table"'))
    return head + styler.to_html()


def counters_html(counts: Mapping[str, int]) -> dict[str, str]:
    """One small HTML box per counter, keyed like :data:`COUNTERS`."""
    colours = {k: c for k, _, c in SERIES} | {"repaired": "#17becf", "dead_lettered": "#9467bd"}
    return {key: (f'<div class="dl-counter-box" style="border-top: 4px solid {colours[key]}">'
                  f'<div class="dl-counter-value" data-value="{counts[key]}">{counts[key]}</div>'
                  f'<div class="dl-counter-label">{label}</div></div>')
            for key, label in COUNTERS}


def verdict_html(verdict: str) -> str:
    kind = verdict.split(":", 1)[0].split(" ", 1)[0].lower()  # "OK (repaired)" is an OK
    return (f'<div class="dl-verdict-line dl-verdict-{kind}"><b>checker</b>:'
            f' {html.escape(verdict)}</div>')


PANEL_CSS = """<style>
.dl-panel .dl-table { border-collapse: collapse; font-size: 12px; margin: 2px 0 8px 0; }
.dl-panel .dl-table th, .dl-panel .dl-table td { border: 1px solid #dddddd; padding: 2px 6px;
  text-align: left; }
.dl-panel .dl-caption { font-size: 13px; margin-top: 4px; }
.dl-panel .dl-empty { color: #777777; font-size: 12px; margin-bottom: 8px; }
.dl-panel .dl-counter-box { padding: 2px 10px; min-width: 96px; text-align: center; }
.dl-panel .dl-counter-value { font-size: 22px; font-weight: bold; }
.dl-panel .dl-counter-label { font-size: 11px; color: #555555; }
.dl-panel .dl-verdict-line { font-size: 14px; padding: 4px 8px; border-radius: 4px; }
.dl-panel .dl-verdict-ok { background: #e3f4e3; }
.dl-panel .dl-verdict-pending { background: #f3f3f3; }
.dl-panel .dl-verdict-broken { background: #fde2e1; }
.dl-panel .dl-log pre { font-size: 11px; margin: 0; white-space: pre-wrap; }
</style>"""


@dataclass(frozen=True)
class Views:
    """Everything the panel draws at one moment, as HTML strings (and the raw numbers)."""

    counts: dict[str, int]
    verdict: str
    counters: dict[str, str]
    chart: str
    queue: str
    inbox: str
    projection: str
    dead_letters: str

    def html(self, *, log: str = "", note: str = "") -> str:
        """All views on one page, for a static snapshot."""
        boxes = "".join(f'<div style="display:inline-block">{b}</div>'
                        for b in self.counters.values())
        return (f'<div class="dl-panel dl-snapshot">{PANEL_CSS}{note}'
                f"{verdict_html(self.verdict)}<div>{boxes}</div>"
                '<div style="display:flex; flex-wrap:wrap; gap:16px">'
                f"<div>{self.chart}</div><div>{self.projection}</div></div>"
                '<div style="display:flex; flex-wrap:wrap; gap:16px">'
                f"<div>{self.queue}</div><div>{self.inbox}</div>"
                f"<div>{self.dead_letters}</div></div>{log}</div>")


def render(lab: Lab, history: History | None = None, *, limit: int = DEFAULT_LIMIT,
           uuid: str = "dl") -> Views:
    """Compute every view of ``lab`` once: the checker's verdict, the counters, the chart of
    ``history`` and the four tables (each cut to ``limit`` rows)."""
    conn, now = lab.store, lab.clock.now()
    counts = counters(conn)
    verdict = lab.check().verdict
    chart = svg_chart(history.rows if history is not None else [])
    # A redelivered message (delivery count above one) is shaded in the queue.
    queue = table_html(queue_view(conn, now, limit), title="Queue", total=counts["queued"],
                       highlight=lambda r: r["deliveries"] > 1)
    inbox = table_html(inbox_view(conn, limit), title="Inbox (newest first)",
                       total=counts["inbox"])
    projection = projection_html(projection_view(conn), uuid=f"{uuid}-projection")
    dead = table_html(dead_letter_view(conn, limit), title="Dead letters",
                      total=counts["dead_lettered"])
    return Views(counts=counts, verdict=verdict, counters=counters_html(counts), chart=chart,
                 queue=queue, inbox=inbox, projection=projection, dead_letters=dead)


# -- reconciliation on a schedule ------------------------------------------------------------
SCHEDULE_COLUMNS = ["step", "t", "orders", "lost", "drift", "repairs"]


def run_with_schedule(lab: Lab, *, steps: int, every: int | None, order_every: int = 2,
                      record_every: int = 10) -> pd.DataFrame:
    """Run ``lab`` for ``steps`` worker steps while orders keep arriving (one every
    ``order_every`` steps), and every ``every`` steps ask the checker whether any order was
    lost, duplicated or dead-lettered, and if so repair the projection from the orders
    (:func:`deliverylab.engine.reconcile.repair`). ``every=None``: never.

    Orders whose events are merely still in the queue do not trigger a repair: they are on
    their way, not lost (a production job would look only at orders older than a grace period).

    Returns one row every ``record_every`` steps: the orders so far, the orders lost (the
    checker's count), the drift (the sum over items of ``|projection - truth|``) and the number
    of repairs so far.
    """
    if not isinstance(lab, Lab):
        raise InvalidInput("lab", lab, "a deliverylab.book.lab.Lab")
    check_int("steps", steps, minimum=1, maximum=1_000_000)
    if every is not None:
        check_int("every", every, minimum=1)
    check_int("order_every", order_every, minimum=1)
    check_int("record_every", record_every, minimum=1)
    rows, repairs = [], 0
    for step in range(1, steps + 1):
        if step % order_every == 1 or order_every == 1:
            lab.place_orders(1)
        lab.step()
        if every is not None and step % every == 0:
            result = lab.check()
            if result.lost or result.duplicated or result.dead_lettered:
                lab.reconcile()
                repairs += 1
        if step % record_every == 0 or step == steps:
            counts = counters(lab.store)
            drift = sum(abs(d) for *_, d in projection_vs_truth(lab.store))
            rows.append((step, round(lab.clock.now(), 6), counts["orders"], counts["lost"],
                         drift, repairs))
    import pandas as pd

    return pd.DataFrame(rows, columns=SCHEDULE_COLUMNS)


def plot_fault_sweep(sweeps: Mapping[str, pd.DataFrame], *, orders: int, seed: int,
                     titles: Mapping[str, str] | None = None) -> Any:
    """Lost and duplicated effects against one fault rate per panel, for every mode.

    ``sweeps`` maps a fault point to its :func:`~deliverylab.book.lab.fault_sweep` frame. Colour
    says the mode and the line style says what is counted (solid dots: lost; dashed squares:
    duplicated), so the legend has one entry per mode and one per count instead of one per
    curve. Most curves are flat on zero and would hide one another there: each panel names
    the curves that never leave zero, and draws them as one grey line.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not sweeps:
        raise InvalidInput("sweeps", "{}", "at least one fault point's sweep")
    titles = dict(titles or {})
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4.4), sharey=True,
                             squeeze=False)
    colors: dict[Hashable, Any] = {}  # by mode
    styles: dict[str, dict[str, str | None]]
    styles = {"lost": {"marker": "o", "ls": "-", "mfc": None},
              "duplicated": {"marker": "s", "ls": "--", "mfc": "none"}}
    for ax, (point, sweep) in zip(axes[0], sweeps.items(), strict=True):
        if point not in sweep.columns:
            raise InvalidInput("sweeps", point, "a fault point that is a column of its sweep")
        flat = []
        for k, (mode, rows) in enumerate(sweep.groupby("mode", sort=False)):
            zero = [count for count in styles if (rows[count] == 0).all()]
            if zero:
                flat.append(f"{mode}: {' and '.join(zero)}")
            for count in styles:
                if count in zero:
                    continue
                # tab10 is a ListedColormap; matplotlib annotates every colormap as a Colormap
                color = colors.setdefault(
                    mode, plt.cm.tab10.colors[k % 10])  # type: ignore[attr-defined]
                style = styles[count]
                ax.plot(rows[point], rows[count], color=color, marker=style["marker"],
                        ls=style["ls"], mfc=style["mfc"] or color, zorder=3)
        if flat:
            ax.axhline(0, color="#999999", lw=2, zorder=2)
            ax.text(0.03, 0.96, "0 at every rate (grey line):\n" + "\n".join(flat),
                    transform=ax.transAxes, va="top", ha="left", fontsize=8, color="#444444",
                    bbox={"facecolor": "white", "edgecolor": "#dddddd", "alpha": 0.9})
        ax.set_title(titles.get(point, point))
        ax.set_xlabel(f"fault rate ({point})")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"orders out of {orders}")
    order = dict.fromkeys(m for sweep in sweeps.values() for m in sweep["mode"])
    handles = [Line2D([], [], color=colors[m], lw=3, label=m) for m in order if m in colors]
    handles += [Line2D([], [], color="black", marker=st["marker"], ls=st["ls"],
                       mfc=st["mfc"] or "black", label=count) for count, st in styles.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9,
               frameon=False)
    fig.suptitle(f"Lost and duplicated effects against the fault rate ({orders} orders,"
                 f" seed {seed})")
    fig.subplots_adjust(bottom=0.22, top=0.86, wspace=0.08)
    return fig
