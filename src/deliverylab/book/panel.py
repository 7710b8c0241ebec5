"""The live lab: an ipywidgets control panel over a :class:`~deliverylab.book.lab.Lab`.

Sliders set the fault rates (both halves of a lost ACK, and a crash), the visibility timeout, the number of orders and workers; a
dropdown picks the worker mode; buttons place orders, step, run until idle, auto-run, lose a
message, reconcile and reset. The queue, the inbox, the projection beside the truth, the dead
letters, the counters, a chart and the checker's verdict redraw after every action.

Everything runs on the real engine: an in-memory SQLite database (or, chosen in the engine
dropdown, a fresh schema on a PostgreSQL server), a fake clock and one seed.
A step is one worker step on the fake clock, and auto-run is one step per timer tick, so the
same seed and the same clicks give the same tables, live or replayed. The panel only wires
widgets to :mod:`deliverylab.book.labviews`, whose plain functions the tests call directly.

>>> panel = LabPanel(seed=7, ack_fail=0.8, orders=5)
>>> panel.place_button.click(); panel.run_button.click()
>>> panel.verdict_text
'OK: all 5 orders applied exactly once; projection equals truth'
"""

from __future__ import annotations

import html
import time
from collections import deque
from typing import Any

import ipywidgets as widgets

from ..engine import store_postgres
from ..engine.errors import InvalidInput, check_int, check_number
from ..engine.faults import Faults
from ..engine.worker import Mode
from . import labviews, pgdemo
from .lab import Lab

MODES = tuple(m.value for m in Mode)
ENGINES = {"SQLite (in memory)": "sqlite", "PostgreSQL": "postgresql"}  # label -> engine
LOG_LINES = 8
MAX_RUN_STEPS = 1_000_000
CHART_POINTS_PER_RUN = 100

NOTE = ("Every button runs the real engine: a SQLite database, a fake clock and one seed, so"
        " the same settings and the same clicks give the same tables. On a static web page"
        " this panel shows the state it was saved in; moving a slider or pressing a button"
        " needs a running kernel: run <code>make lab</code> in the project and open"
        " <code>04_lab.ipynb</code> in JupyterLab.")


def _css(widget: widgets.Widget, *classes: str) -> widgets.Widget:
    for c in classes:
        widget.add_class(c)
    return widget


class LabPanel:
    """The control panel. Display it as the last expression of a cell (or ``panel.widget``).

    Every control is an attribute (``ack_fail``, ``ack_answer_lost``, ``crash_rate``,
    ``visibility_timeout``,
    ``orders``, ``workers``, ``mode``, ``seed``; ``place_button``, ``step_button``,
    ``run_button``, ``autorun_button`` with its timer ``autorun``, ``lose_button``,
    ``reconcile_button``, ``reset_button``), so
    a cell can drive the panel exactly as a reader does: set ``.value``, call ``.click()``.
    Each element carries a stable CSS class (``dl-ack-slider``, ``dl-run-button``,
    ``dl-count-duplicates-skipped``, ``dl-inbox``, …) for browser tests; the panel itself is
    ``dl-live`` (a :class:`Snapshot` is ``dl-snapshot``).
    """

    def __init__(self, *, seed: int = 7, mode: Mode | str = Mode.IDEMPOTENT,
                 ack_fail: float = 0.0, ack_answer_lost: float = 0.0,
                 crash_rate: float = 0.0, visibility_timeout: float = 2.0, orders: int = 20, workers: int = 1,
                 limit: int = labviews.DEFAULT_LIMIT, autorun_interval_ms: int = 400,
                 engine: str = "sqlite") -> None:
        check_int("seed", seed, minimum=0)
        if engine not in ENGINES.values():
            raise InvalidInput("engine", engine, " or ".join(map(repr, ENGINES.values())))
        mode = Mode.parse(mode).value
        check_number("ack_fail", ack_fail, minimum=0, maximum=1)
        check_number("ack_answer_lost", ack_answer_lost, minimum=0, maximum=1)
        check_number("crash_rate", crash_rate, minimum=0, maximum=1)
        check_number("visibility_timeout", visibility_timeout, minimum=0.05, maximum=10)
        check_int("orders", orders, minimum=1, maximum=1000)
        check_int("workers", workers, minimum=1, maximum=8)
        self.limit = check_int("limit", limit, minimum=1, maximum=1000)
        check_int("autorun_interval_ms", autorun_interval_ms, minimum=20)

        wide = {"description_width": "initial"}
        box = widgets.Layout(width="300px")
        # -- controls ----------------------------------------------------------------------
        self.ack_fail = _css(widgets.FloatSlider(
            value=ack_fail, min=0.0, max=1.0, step=0.05, description="ACK failure rate",
            tooltip="chance that a worker's ACK never reaches the queue (the message comes back)",
            readout_format=".2f", continuous_update=False, style=wide, layout=box),
            "dl-ack-slider")
        # The other half of a lost ACK: the worker hears the same silence, but the queue has
        # already deleted the message, so nothing comes back.
        self.ack_answer_lost = _css(widgets.FloatSlider(
            value=ack_answer_lost, min=0.0, max=1.0, step=0.05,
            description="ACK answer lost rate",
            tooltip="chance that the queue deletes the message on a worker's ACK but its answer"
                    " never comes back (the worker sees the same failure; the message is gone)",
            readout_format=".2f", continuous_update=False, style=wide, layout=box),
            "dl-ack-answer-slider")
        self.crash_rate = _css(widgets.FloatSlider(
            value=crash_rate, min=0.0, max=1.0, step=0.05, description="crash rate",
            tooltip="chance that a worker dies right after receiving a message",
            readout_format=".2f", continuous_update=False, style=wide, layout=box),
            "dl-crash-slider")
        self.visibility_timeout = _css(widgets.FloatSlider(
            value=visibility_timeout, min=0.05, max=10.0, step=0.05,
            description="visibility timeout (s)",
            tooltip="how long a received message stays invisible before it is redelivered",
            readout_format=".2f", continuous_update=False, style=wide, layout=box),
            "dl-visibility-slider")
        self.orders = _css(widgets.IntSlider(
            value=orders, min=1, max=1000, step=1, description="orders per click",
            tooltip="how many orders 'place orders' writes", continuous_update=False,
            style=wide, layout=box), "dl-orders-slider")
        self.workers = _css(widgets.IntSlider(
            value=workers, min=1, max=8, step=1, description="workers",
            tooltip="workers take turns, one step each", continuous_update=False,
            style=wide, layout=box), "dl-workers-slider")
        self.mode = _css(widgets.Dropdown(
            options=MODES, value=mode, description="mode", style=wide,
            tooltip="the order of work: see the table in chapter 3", layout=box),
            "dl-mode-dropdown")
        self.engine = _css(widgets.Dropdown(
            options=list(ENGINES.items()), value=engine, description="engine", style=wide,
            tooltip="where the queue and the tables live: an in-memory SQLite database, or a"
                    " fresh schema on the PostgreSQL server (make services starts one)",
            layout=box), "dl-engine-dropdown")
        self.seed = _css(widgets.BoundedIntText(
            value=seed, min=0, max=2**31 - 1, description="seed (restarts)",
            tooltip="ids, orders and the fault schedule all come from the seed; changing it"
                    " starts a fresh lab", style=wide, layout=widgets.Layout(width="180px")),
            "dl-seed")
        # -- buttons -----------------------------------------------------------------------
        def button(description: str, css: str, tooltip: str, style: str = "") -> widgets.Button:
            return _css(widgets.Button(description=description, tooltip=tooltip,
                                       button_style=style,
                                       layout=widgets.Layout(width="auto")), css, "dl-button")

        self.place_button = button(f"place {orders} orders", "dl-place-button",
                                   "write orders and their events (one transaction each)",
                                   "primary")
        self.step_button = button("step", "dl-step-button", "one worker step on the fake clock")
        self.run_button = button("run until idle", "dl-run-button",
                                 "step until the queue is empty", "success")
        # Auto-run: a toggle button, and a Play widget as the timer that ticks in the browser,
        # one worker step per tick. The Play widget stays hidden: its icon buttons would need
        # an icon font that a static copy of the page may not have.
        self.autorun = _css(widgets.Play(
            value=0, min=0, max=10**9, step=1, interval=autorun_interval_ms,
            show_repeat=False, layout=widgets.Layout(display="none")), "dl-autorun")
        self.autorun_button = _css(widgets.ToggleButton(
            value=False, description="auto-run", tooltip="one step per timer tick until the"
            " queue is empty; press again to pause", layout=widgets.Layout(width="auto")),
            "dl-autorun-button", "dl-button")
        widgets.link((self.autorun_button, "value"), (self.autorun, "playing"))
        self.lose_button = button("lose a message", "dl-lose-button",
                                  "delete one queued message behind the workers' backs",
                                  "warning")
        self.reconcile_button = button("reconcile", "dl-reconcile-button",
                                       "rebuild the projection from the orders", "info")
        self.reset_button = button("reset", "dl-reset-button",
                                   "start a fresh lab with these settings", "danger")
        # -- views -------------------------------------------------------------------------
        self.header = _css(widgets.HTML(
            f"{labviews.PANEL_CSS}<div><b>deliverylab: the live lab</b></div>"
            f'<div class="dl-note" style="font-size:12px; color:#555555">{NOTE}</div>'),
            "dl-header")
        self.verdict = _css(widgets.HTML(), "dl-verdict")
        self.status = _css(widgets.HTML(), "dl-status")
        self.counter_widgets = {
            key: _css(widgets.HTML(), "dl-counter", "dl-count-" + key.replace("_", "-"))
            for key, _ in labviews.COUNTERS}
        self.chart = _css(widgets.HTML(), "dl-chart")
        self.projection_table = _css(widgets.HTML(), "dl-projection")
        self.queue_table = _css(widgets.HTML(), "dl-queue")
        self.inbox_table = _css(widgets.HTML(), "dl-inbox")
        self.dead_letters_table = _css(widgets.HTML(), "dl-dead-letters")
        self.log_view = _css(widgets.HTML(), "dl-log")

        row = widgets.Layout(flex_flow="row wrap", align_items="flex-start",
                             grid_gap="4px 16px")
        self.widget = _css(widgets.VBox([
            self.header,
            widgets.HBox([self.ack_fail, self.ack_answer_lost, self.crash_rate,
                          self.visibility_timeout], layout=row),
            widgets.HBox([self.orders, self.workers, self.mode, self.seed], layout=row),
            widgets.HBox([self.engine], layout=row),
            widgets.HBox([self.place_button, self.step_button, self.run_button,
                          self.autorun_button, self.autorun, self.lose_button,
                          self.reconcile_button, self.reset_button],
                         layout=row),
            self.verdict,
            self.status,
            widgets.HBox(list(self.counter_widgets.values()), layout=row),
            widgets.HBox([self.chart, self.projection_table], layout=row),
            widgets.HBox([self.queue_table, self.inbox_table, self.dead_letters_table],
                         layout=row),
            self.log_view,
        ], layout=widgets.Layout(border="1px solid #dddddd", padding="6px")),
            "dl-panel", "dl-live")

        # -- state -------------------------------------------------------------------------
        self._status = ""
        self._actions = 0
        self._log: deque[str] = deque(maxlen=LOG_LINES)
        self._step_lines: deque[str] = deque(maxlen=LOG_LINES)
        self.history = labviews.History()
        self.steps = 0
        self._schema_url: str | None = None  # the PostgreSQL schema this panel made, if any
        self.lab = self._new_lab()
        self.views: labviews.Views | None = None
        self._drawn_key: tuple[Any, ...] | None = None
        self.last_redraw_s = 0.0

        for control in (self.ack_fail, self.ack_answer_lost, self.crash_rate,
                        self.visibility_timeout,
                        self.workers, self.mode):
            control.observe(self._on_knob, names="value")
        self.orders.observe(self._on_orders, names="value")
        self.seed.observe(self._on_seed, names="value")
        self.engine.observe(self._on_engine, names="value")
        self.autorun.observe(self._on_tick, names="value")
        self.place_button.on_click(lambda _: self.place_orders())
        self.step_button.on_click(lambda _: self.step())
        self.run_button.on_click(lambda _: self.run_until_idle())
        self.lose_button.on_click(lambda _: self.lose_message())
        self.reconcile_button.on_click(lambda _: self.reconcile())
        self.reset_button.on_click(lambda _: self.reset())
        self._say("start", "A fresh lab: no orders yet. Press <b>place orders</b>, then"
                  " <b>step</b>, <b>run until idle</b> or <b>auto-run</b>.")
        self._record()
        self.refresh()

    # -- settings ----------------------------------------------------------------------------
    def faults(self) -> Faults:
        """The fault rates the sliders set, decided from the seed."""
        return Faults(seed=self.seed.value, ack_fail=self.ack_fail.value,
                      ack_answer_lost=self.ack_answer_lost.value,
                      crash_after_receive=self.crash_rate.value)

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed.value, "mode": self.mode.value,
                "ack_fail": self.ack_fail.value,
                "ack_answer_lost": self.ack_answer_lost.value,
                "crash_rate": self.crash_rate.value,
                "visibility_timeout": self.visibility_timeout.value,
                "orders": self.orders.value, "workers": self.workers.value}

    def _new_lab(self) -> Lab:
        """A fresh lab on the chosen engine: an in-memory SQLite database, or a new schema on
        the PostgreSQL server (:data:`deliverylab.book.pgdemo.SERVER`); raises
        :class:`~deliverylab.book.pgdemo.PostgresUnavailable` when no server answers."""
        path = ":memory:"
        if self.engine.value == "postgresql":
            path = self._schema_url = pgdemo.new_schema("dl_panel")
        return Lab(path, seed=self.seed.value, mode=self.mode.value, faults=self.faults(),
                   workers=self.workers.value,
                   visibility_timeout=self.visibility_timeout.value, echo=self._echo)

    def close(self) -> None:
        """Close the lab's database and drop the PostgreSQL schema this panel made, if any."""
        self.autorun.playing = False
        self.lab.close()
        if self._schema_url is not None:
            store_postgres.drop_schema(self._schema_url)
            self._schema_url = None

    def _echo(self, line: str) -> None:
        self._log.append(line)
        self._step_lines.append(line)

    # -- actions (what the buttons do) -------------------------------------------------------
    def place_orders(self) -> list[str]:
        """Place ``orders`` orders (items and quantities from the seed). Returns their ids."""
        placed = self.lab.place_orders(self.orders.value)
        ids = [p.order_id for p in placed]
        self._say("place", f"Placed {len(ids)} order{'s' * (len(ids) != 1)}"
                  f" ({ids[0]} … {ids[-1]}): each order row and its event committed in one"
                  " transaction.")
        self._record()
        self.refresh()
        return ids

    def step(self) -> int:
        """One worker step on the fake clock. Returns how many messages it received."""
        if self.lab.broker.next_visible_at() is None:
            self._say("step", "Nothing to step: the queue is empty. Place orders first.")
            self.refresh()
            return 0
        self._step_lines.clear()
        n = self.lab.step()
        self.steps += 1
        lines = list(self._step_lines)
        self._say("step", f"Step {self.steps} (t={self.lab.clock.now():.3f}s): "
                  + (html.escape(lines[-1]) if lines else
                     "nothing visible yet; the clock jumped to the next lease expiry."))
        self._record()
        self.refresh()
        return n

    def run_until_idle(self) -> int:
        """Step until the queue is empty; the chart gets up to 100 points on the way.
        Returns the number of steps taken."""
        queued = self.lab.broker.depth()
        pending = queued["visible"] + queued["in_flight"]
        if pending == 0:
            self._say("run", "Nothing to run: the queue is empty. Place orders first.")
            self.refresh()
            return 0
        stride = max(1, (2 * pending) // CHART_POINTS_PER_RUN)
        taken = 0
        while taken < MAX_RUN_STEPS and self.lab.broker.next_visible_at() is not None:
            self.lab.step()
            self.steps += 1
            taken += 1
            if taken % stride == 0:
                self._record()
        self._record()
        result = self.lab.check()
        self._say("run", f"Ran {taken} steps until the queue was empty, in"
                  f" {self.lab.mode.value} mode (clock now t={self.lab.clock.now():.3f}s)."
                  f" {html.escape(result.verdict)}")
        self.refresh()
        return taken

    def lose_message(self) -> list[str]:
        """Delete one queued message behind the workers' backs (as an auto-ack broker or an
        operator's mistake would). Returns the ids of the messages lost."""
        lost = self.lab.lose_messages(1)
        if lost:
            self._say("lose", f"Lost message {lost[0]}: it is gone from the queue, so its"
                      " order will never reach the projection unless you reconcile.")
        else:
            self._say("lose", "Nothing to lose: the queue is empty.")
        self._record()
        self.refresh()
        return lost

    def reconcile(self) -> labviews.Views:
        """Repair the projection from the orders (see :func:`deliverylab.engine.reconcile.repair`)."""
        repair = self.lab.reconcile()
        self._say("reconcile", f"Reconciled from the {repair.orders} orders:"
                  f" {repair.items_changed} item(s) changed, {repair.orders_recounted}"
                  f" order(s) recounted, {repair.events_fenced} event(s) newly fenced: a late"
                  " delivery of a counted order is not applied again, in any mode.")
        self._record()
        return self.refresh()

    def reset(self) -> None:
        """A fresh, empty lab with the current settings (the seed decides everything)."""
        self.close()
        self._log.clear()
        self.history = labviews.History()
        self.steps = 0
        self.lab = self._new_lab()
        self._drawn_key = None
        self._say("reset", f"Reset: a fresh lab with seed {self.seed.value}, no orders yet.")
        self._record()
        self.refresh()

    # -- observers ---------------------------------------------------------------------------
    def _on_knob(self, change: dict[str, Any]) -> None:
        labviews.reconfigure(self.lab, mode=self.mode.value, faults=self.faults(),
                             visibility_timeout=self.visibility_timeout.value,
                             workers=self.workers.value)
        name = change["owner"].description
        value = change["new"]
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        self._say("set", f"{html.escape(name)} is now {html.escape(shown)}: it applies from"
                  " the next delivery; what already happened stays in the tables.")
        self.refresh()

    def _on_orders(self, change: dict[str, Any]) -> None:
        self.place_button.description = f"place {change['new']} orders"

    def _on_seed(self, change: dict[str, Any]) -> None:
        self.reset()

    def _on_engine(self, change: dict[str, Any]) -> None:
        try:
            self.reset()
        except pgdemo.PostgresUnavailable as exc:  # stay on SQLite, and say why
            self.engine.unobserve(self._on_engine, names="value")
            self.engine.value = change["old"]
            self.engine.observe(self._on_engine, names="value")
            self.reset()
            self._say("engine", html.escape(str(exc)))
            self.refresh(force=True)
            return
        self._say("engine", f"Reset on {html.escape(self.engine.label)}: a fresh lab with seed"
                  f" {self.seed.value}; the same seed and clicks give the same tables on every"
                  " engine.")
        self.refresh(force=True)

    def _on_tick(self, change: dict[str, Any]) -> None:
        if change["new"] <= change["old"]:
            return  # a rewound timer (a reset) is not a tick
        if self.lab.broker.next_visible_at() is None:
            self.autorun.playing = False
            self._say("autorun", "Auto-run stopped: the queue is empty.")
            self.refresh()
            return
        self.step()

    # -- drawing -----------------------------------------------------------------------------
    def _say(self, action: str, message_html: str) -> None:
        # Shown by the next refresh, after every other view: in the browser, a new status line
        # means the tables and counters above it are already up to date. ``data-seq`` counts
        # the actions, so a test can wait for the answer to its own click.
        self._actions += 1
        self._status = (f'<div class="dl-status-line" data-action="{action}"'
                        f' data-seq="{self._actions}">{message_html}</div>')

    def _record(self) -> None:
        self.history.record(self.steps, self.lab.clock.now(), labviews.counters(self.lab.store))

    def refresh(self, *, force: bool = False) -> labviews.Views:
        """Redraw every view from the database. Skipped when nothing changed since the last
        redraw (no row written, the clock and the chart unchanged), unless ``force``."""
        start = time.perf_counter()
        # SQLite counts the rows written; on PostgreSQL every action redraws.
        written = getattr(self.lab.store, "total_changes", self._actions)
        key = (id(self.lab), written, self.lab.clock.now(),
               len(self.history), self.history.rows[-1] if len(self.history) else None,
               tuple(self._log))
        if force or self.views is None or key != self._drawn_key:
            views = labviews.render(self.lab, self.history, limit=self.limit)
            self.views = views
            self.verdict.value = labviews.verdict_html(views.verdict)
            for name, box in views.counters.items():
                self.counter_widgets[name].value = box
            self.chart.value = views.chart
            self.projection_table.value = views.projection
            self.queue_table.value = views.queue
            self.inbox_table.value = views.inbox
            self.dead_letters_table.value = views.dead_letters
            self.log_view.value = self._log_html()
            self._drawn_key = key
        self.status.value = self._status
        self.last_redraw_s = time.perf_counter() - start
        return self.views

    def _log_html(self) -> str:
        body = html.escape("\n".join(self._log)) if self._log else "(no worker output yet)"
        return f'<div class="dl-caption"><b>Worker log</b> (last lines)</div><pre>{body}</pre>'

    # -- reading -----------------------------------------------------------------------------
    @property
    def verdict_text(self) -> str:
        return self.lab.check().verdict

    @property
    def counts(self) -> dict[str, int]:
        return labviews.counters(self.lab.store)

    def snapshot(self) -> Snapshot:
        """The panel's views as an ordinary output: HTML tables in a static page, text in a
        terminal and for nbval."""
        views = self.refresh()
        return Snapshot(self.settings(), views, self._log_html())

    def __repr__(self) -> str:
        s = self.settings()
        return (f"LabPanel(seed={s['seed']}, mode={s['mode']!r}, ack_fail={s['ack_fail']:.2f},"
                f" ack_answer_lost={s['ack_answer_lost']:.2f}, crash_rate={s['crash_rate']:.2f},"
                f" visibility_timeout={s['visibility_timeout']:.2f}, orders={s['orders']},"
                f" workers={s['workers']})")

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = repr(self)
        return bundle


class Snapshot:
    """What a :class:`LabPanel` shows at one moment, frozen: HTML for a page, text otherwise."""

    def __init__(self, settings: dict[str, Any], views: labviews.Views, log_html: str) -> None:
        self.settings = settings
        self.views = views
        self.log_html = log_html

    def _repr_html_(self) -> str:
        s = self.settings
        note = ('<div class="dl-note" style="font-size:12px; color:#555555">Snapshot of the'
                f' panel (seed {s["seed"]}, {s["mode"]} mode, ACK failure rate'
                f' {s["ack_fail"]:.2f}, ACK answer lost rate {s["ack_answer_lost"]:.2f},'
                f' crash rate {s["crash_rate"]:.2f}). Moving a slider'
                ' needs a running kernel: <code>make lab</code>.</div>')
        return self.views.html(log=self.log_html, note=note)

    def __repr__(self) -> str:
        counts = self.views.counts
        lines = [f"checker: {self.views.verdict}",
                 "counters: " + ", ".join(f"{label} {counts[key]}"
                                          for key, label in labviews.COUNTERS),
                 f"queue {counts['queued']} message(s), inbox {counts['inbox']} row(s),"
                 f" {counts['orders']} order(s)"]
        return "\n".join(lines)
