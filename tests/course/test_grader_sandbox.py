"""The grader cannot be fooled, hung or crashed by a submission.

Every submission here is one a reader could write (or paste): loops that never end, exits,
a segfault, SQL errors, commits inside a handler, and attempts to grade itself. Each must end
in a FAIL verdict that says why, within the stated budget, and never in a hang or a
traceback; the correct designs must still pass.
"""

from __future__ import annotations

import ctypes
import gc
import os
import pickle
import sqlite3
import time
from pathlib import Path

import pytest

from deliverylab.course import EXERCISES, apply_order_placed, grade, grader, transaction
from deliverylab.course import sandbox as sb
from deliverylab.course.sql import PROTECTED

MARGIN_S = 4.0  # the parent's own time around a budget (dump the stack, kill, reap) on a busy machine


def graded(exercise_id: str, fn, seeds=(0,)):
    t0 = time.monotonic()
    verdict = grade(exercise_id, fn, seeds=seeds)
    return verdict, time.monotonic() - t0


def why(verdict) -> str:
    assert not verdict.passed, str(verdict)
    return verdict.failed[0].reason


def children(settle: float = 2.0) -> set[int]:
    """The child processes this one still has, after up to ``settle`` seconds for one that
    is exiting to be reaped (a thread of this process may end while it is read: skipped)."""
    deadline = time.monotonic() + settle
    while True:
        out: set[int] = set()
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            try:
                out.update(int(p) for p in (task / "children").read_text().split())
            except (FileNotFoundError, ProcessLookupError):
                continue
        if not out or time.monotonic() >= deadline:
            return out
        time.sleep(0.05)


# -- loops that never return ----------------------------------------------------------------
def retry_ack_forever(delivery, ops):
    while not ops.ack(delivery):  # "at most once: only apply once the ACK is confirmed"
        pass
    ops.apply(delivery)


def busy_loop(delivery, ops):
    n = 0
    while True:
        n += 1


def sleeps(delivery, ops):
    time.sleep(120)


def slow_but_talking(delivery, ops):
    while True:  # a request every 0.5 s: never silent, but never done
        time.sleep(0.5)
        ops.now()


def test_retrying_the_ack_forever_ends_on_the_request_budget():
    verdict, took = graded("at-most-once", retry_ack_forever, seeds=range(5))
    reason = why(verdict)
    assert f"more than {sb.REQUESTS:,} requests" in reason
    assert "while not ops.ack(delivery)" in reason           # the submission's line
    assert "while working on delivery 1 of order o-" in reason  # the delivery it was on
    assert "Not run: 4 more seeds" in str(verdict)          # one budget, not five
    assert took < sb.RUN_S


@pytest.mark.parametrize("fn, line", [(busy_loop, "n += 1"), (sleeps, "time.sleep(120)")])
def test_a_busy_loop_or_a_sleep_ends_on_the_silence_budget(fn, line):
    verdict, took = graded("ack-after", fn, seeds=range(3))
    reason = why(verdict)
    assert f"{sb.SILENCE_S:g} s without a single request to the grader" in reason
    assert line in reason
    assert "delivery 1 of order o-" in reason
    assert took < sb.SILENCE_S + MARGIN_S
    assert len(verdict.trials) == 1 and "Not run: 2 more seeds" in str(verdict)


def test_code_that_keeps_talking_ends_on_the_running_time_budget():
    verdict, took = graded("ack-after", slow_but_talking)
    reason = why(verdict)
    assert f"{sb.RUN_S:g} s of running time on this seed" in reason
    assert "time.sleep(0.5)" in reason or "ops.now()" in reason
    assert took < sb.RUN_S + MARGIN_S


# -- endings of the process -----------------------------------------------------------------
def exits(delivery, ops):
    raise SystemExit(3)


def interrupts(delivery, ops):
    raise KeyboardInterrupt


def hard_exit(delivery, ops):
    os._exit(7)


def segfault(delivery, ops):
    ctypes.string_at(0)


@pytest.mark.parametrize("fn, said, line", [
    (exits, "your code raised SystemExit(3)", "raise SystemExit(3)"),
    (interrupts, "your code raised KeyboardInterrupt", "raise KeyboardInterrupt"),
    (hard_exit, "your code called os._exit(7)", "os._exit(7)"),
    (segfault, "your code's process died of SIGSEGV", "ctypes.string_at(0)"),
])
def test_an_exit_or_a_crash_of_the_process_is_a_verdict(fn, said, line):
    verdict, took = graded("ack-after", fn, seeds=range(2))
    reason = why(verdict)
    assert said in reason and line in reason
    assert "while working on delivery 1 of order o-" in reason
    assert len(verdict.failed) == 2 and took < sb.SILENCE_S  # no budget: each seed runs
    assert not children()  # no child process left behind


# -- exceptions, SQL errors included --------------------------------------------------------
def sql_typo(conn, delivery):
    conn.execute("INSER INTO inbox_processed (consumer, event_id, processed_at)"
                 " VALUES ('inventory', ?, 0)", (delivery.event_id,))


def commits(conn, delivery):
    apply_order_placed(conn, delivery)
    conn.commit()


def commits_in_sql(conn, delivery):
    apply_order_placed(conn, delivery)
    conn.execute("COMMIT")


def releases_the_workers_savepoint(conn, delivery):
    apply_order_placed(conn, delivery)
    conn.execute("RELEASE effect")


@pytest.mark.parametrize("exercise_id", ["idempotent-handler", "redrive-inbox",
                                         "fenced-worker"])
def test_a_sql_typo_in_a_handler_is_a_verdict_with_its_line(exercise_id):
    reason = why(graded(exercise_id, sql_typo)[0])
    assert 'your code raised OperationalError: near "INSER": syntax error' in reason
    assert 'your line' in reason and 'conn.execute("INSER INTO' in reason
    assert "(delivery 1 of order o-" in reason
    assert "and the same on" in reason  # one line for the error, not one per delivery


@pytest.mark.parametrize("fn, said", [
    (commits, "conn.commit() inside a handler"),
    (commits_in_sql, "COMMIT inside the worker's transaction"),
    (releases_the_workers_savepoint, "RELEASE effect: a savepoint your code did not open"),
])
def test_ending_the_workers_transaction_is_refused_with_a_reason(fn, said):
    reason = why(graded("idempotent-handler", fn)[0])
    assert said in reason
    assert "no such savepoint" not in reason


def savepoint_of_its_own(conn, delivery):
    conn.execute("SAVEPOINT mine")
    if conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                    " VALUES ('inventory', ?, 0) ON CONFLICT DO NOTHING",
                    (delivery.event_id,)).rowcount:
        apply_order_placed(conn, delivery)
    conn.execute("RELEASE mine")


def test_a_handler_may_use_a_savepoint_of_its_own():
    assert grade("idempotent-handler", savepoint_of_its_own, seeds=range(3)).passed


def repair_that_raises(conn, now):
    with transaction(conn):
        conn.execute("DELETE FROM inventory_projection")
        conn.execute("SELECT no_such_column FROM orders")


def test_an_exception_in_a_repair_is_a_verdict():
    reason = why(graded("in-flight-repair", repair_that_raises)[0])
    assert "OperationalError: no such column: no_such_column" in reason
    assert 'conn.execute("SELECT no_such_column FROM orders")' in reason


def returns_a_socket(orders, log, queued):
    import socket
    return socket.socket()


def test_a_value_the_grader_cannot_read_is_a_verdict():
    reason = why(graded("classify", returns_a_socket)[0])
    assert "the grader cannot read" in reason


# -- grading itself -------------------------------------------------------------------------
def patches_judge(delivery, ops):
    grader.judge = lambda *a, **k: grader.Trial(seed=0, faults="", passed=True, reason="")


def patches_the_worker(delivery, ops):
    from deliverylab.engine import worker
    worker.apply_order_placed = lambda conn, d: None
    grader.CourseWorker.effect = lambda self, d: None
    ops.ack(delivery)


def forges_through_ops(delivery, ops):
    ops._w.conn.execute("INSERT INTO delivery_log (at, worker, correlation_id, event_id,"
                        " delivery_count, outcome) VALUES (0, 'w', ?, ?, 1, 'applied')",
                        (delivery.correlation_id, delivery.event_id))


FORGED: list[bool] = []


def forges_through_gc(delivery, ops):
    # Every connection this process can reach: write "applied" rows into each (once: the
    # search is slow in a big process).
    for obj in [] if FORGED else gc.get_objects():
        if isinstance(obj, sqlite3.Connection):
            try:
                obj.execute("INSERT INTO delivery_log (at, worker, correlation_id, event_id,"
                            " delivery_count, outcome) VALUES (0, 'w', ?, ?, 1, 'applied')",
                            (delivery.correlation_id, delivery.event_id))
                obj.execute("UPDATE inventory_projection SET reserved_qty ="
                            " (SELECT sum(qty) FROM orders AS o WHERE o.item_id ="
                            " inventory_projection.item_id)")
            except sqlite3.Error:
                pass
    FORGED.append(True)
    ops.ack(delivery)


def forges_through_conn(conn, delivery):
    conn.execute("INSERT INTO delivery_log (at, worker, correlation_id, event_id,"
                 " delivery_count, outcome) VALUES (0, 'w', ?, ?, 1, 'applied')",
                 (delivery.correlation_id, delivery.event_id))


def test_patching_the_grader_in_the_submission_changes_nothing():
    for fn in (patches_judge, patches_the_worker, forges_through_gc):
        reason = why(graded("ack-after", fn)[0])
        assert "30 of 30 orders lost: never applied" in reason, fn.__name__
    assert grader.judge.__module__ == "deliverylab.course.grader"


def test_ops_offers_only_its_verbs():
    reason = why(graded("ack-after", forges_through_ops)[0])
    assert "Ops offers only its public verbs, not '_w'" in reason


@pytest.mark.parametrize("table", sorted(set(PROTECTED) & {
    "delivery_log", "orders", "queue_messages", "outbox"}))
def test_a_handler_cannot_write_the_graders_tables(table):
    def forge(conn, delivery):
        conn.execute(f"DELETE FROM {table}")
    reason = why(graded("idempotent-handler", forge)[0])
    assert f"the grader refused DELETE from {table}" in reason


def test_the_graders_temporary_note_cannot_be_forged():
    """newer-wins keeps its note of which changes arrive late in a temporary table: a
    submission that empties it, to hide the changes it failed to record, is refused."""
    from deliverylab.course.ex06 import status_solution

    def hide_the_late_ones(conn, order_id, status, version, now):
        conn.execute("DELETE FROM temp.stale_expected")
        status_solution(conn, order_id, status, version, now)
    reason = why(graded("newer-wins", hide_the_late_ones)[0])
    assert "the grader refused DELETE from stale_expected" in reason


def test_the_graders_model_of_the_status_cannot_be_forged():
    """newer-wins keeps its own model of the change in place per order, from which it expects
    the stale changes: a submission that empties it, so that nothing looks late, is refused."""
    from deliverylab.course.ex06 import status_solution

    def forget_what_won(conn, order_id, status, version, now):
        conn.execute("DELETE FROM temp.status_held")
        status_solution(conn, order_id, status, version, now)
    reason = why(graded("newer-wins", forget_what_won)[0])
    assert "the grader refused DELETE from status_held" in reason


def test_forging_the_log_through_the_connection_is_refused_even_if_swallowed():
    def swallow(conn, delivery):
        try:
            forges_through_conn(conn, delivery)
        except sqlite3.Error:
            pass
        apply_order_placed(conn, delivery)
    reason = why(graded("idempotent-handler", swallow)[0])
    assert "the grader refused INSERT into delivery_log" in reason


@pytest.mark.parametrize("sql, said", [
    ("ATTACH DATABASE ':memory:' AS other", "ATTACH"),
    ("PRAGMA foreign_keys = OFF", "PRAGMA foreign_keys = OFF"),
    ("CREATE TRIGGER t AFTER INSERT ON inventory_projection BEGIN SELECT 1; END",
     "CREATE TRIGGER"),
    ("DROP TABLE delivery_log", "DROP TABLE delivery_log"),
])
def test_schema_and_attach_are_refused(sql, said):
    def handler(conn, delivery):
        conn.execute(sql)
    reason = why(graded("idempotent-handler", handler)[0])
    assert f"the grader refused {said}" in reason


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/deliverylab-sandbox-pwned",))


def sends_a_malicious_pickle(orders, log, queued):
    link = sb._LINK
    data = pickle.dumps(("done", 1, _Evil()))
    with link.lock:
        os.write(link.up, sb._frame(data))
    return "lost"


def test_what_the_child_sends_cannot_run_code_in_the_grader():
    marker = Path("/tmp/deliverylab-sandbox-pwned")
    marker.unlink(missing_ok=True)
    reason = why(graded("classify", sends_a_malicious_pickle)[0])
    assert "does not read" in reason
    assert not marker.exists()


# -- what still works -----------------------------------------------------------------------
def prints(delivery, ops):
    print("working on", delivery.correlation_id)
    ops.apply(delivery)
    ops.ack(delivery)


def test_what_the_submission_prints_shows_in_the_parent(capsys):
    assert grade("ack-after", prints, seeds=[0]).passed
    assert "working on o-" in capsys.readouterr().out


def pipes() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            out.add(f"{fd} {target}")
    return out


def test_the_grader_process_keeps_no_child_and_no_open_pipe():
    before = pipes()
    grade("ack-after", EXERCISES["ack-after"].solution, seeds=[0, 1])
    grade("ack-after", segfault, seeds=[0, 1])
    grade("ack-after", busy_loop, seeds=[0])
    assert not children()
    assert pipes() <= before


def _batches(conn, now, settled):
    """Per item, in batches of at most 8 rows: fence 7 of its ``settled`` unfenced events at
    a time; in the batch that fences its last ones, set its count to the sum of its fenced
    orders. The report is the sum of the batches'."""
    moved: dict[str, int] = {}
    fenced: list[str] = []
    items = [i for (i,) in conn.execute("SELECT item_id FROM orders UNION"
                                        " SELECT item_id FROM inventory_projection")]
    for item in items:
        while True:
            with transaction(conn):
                batch = [e for (e,) in conn.execute(
                    "INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                    " SELECT 'inventory', event_id, ? FROM orders WHERE item_id = ?"
                    f" AND {settled} AND event_id NOT IN (SELECT event_id"
                    " FROM reconciled_events) LIMIT 7 RETURNING event_id", (now, item))]
                fenced += batch
                if len(batch) < 7:
                    (was,) = conn.execute("SELECT coalesce(sum(reserved_qty), 0) FROM"
                                          " inventory_projection WHERE item_id = ?",
                                          (item,)).fetchone()
                    (now_qty,) = conn.execute(
                        "SELECT coalesce(sum(qty), 0) FROM orders WHERE item_id = ? AND"
                        " event_id IN (SELECT event_id FROM reconciled_events)",
                        (item,)).fetchone()
                    conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                                 " VALUES (?, ?) ON CONFLICT (item_id) DO UPDATE"
                                 " SET reserved_qty = excluded.reserved_qty", (item, now_qty))
                    if now_qty != was:
                        moved[item] = moved.get(item, 0) + now_qty - was
            if len(batch) < 7:
                break
    return {"moved": moved, "fenced": fenced}


def repair_not_in_flight(conn, now):
    """Count only what no worker can still apply (its message is gone, or the idempotent
    consumer's inbox already holds it, so its redelivery is skipped), and fence that."""
    return _batches(conn, now, "(event_id NOT IN (SELECT event_id FROM queue_messages)"
                               " OR event_id IN (SELECT event_id FROM inbox_processed))")


def repair_not_in_flight_forgets_the_inbox(conn, now):
    """Counts only what has no message left: an event an idempotent worker applied whose ACK
    was lost is still queued, so the rebuild wipes its effect and counts it nowhere, and its
    redelivery is skipped as a duplicate."""
    return _batches(conn, now, "event_id NOT IN (SELECT event_id FROM queue_messages)")


def test_a_repair_that_drops_an_applied_event_still_queued_fails():
    verdict = grade("in-flight-repair", repair_not_in_flight_forgets_the_inbox,
                    seeds=range(25))
    assert not verdict.passed
    assert all("counted by no one" in t.reason for t in verdict.failed), str(verdict)


def repair_compensating_delta(conn, now):
    """Add only the orders never applied (no message left, no applied row, not fenced yet),
    and fence each one added: one order a batch (two rows)."""
    added: dict[str, int] = {}
    fenced: list[str] = []
    while True:
        with transaction(conn):
            missing = conn.execute(
                "SELECT o.item_id, o.qty, o.event_id FROM orders AS o"
                " WHERE o.event_id NOT IN (SELECT event_id FROM queue_messages)"
                " AND o.event_id NOT IN (SELECT event_id FROM reconciled_events"
                "                        WHERE consumer = 'inventory')"
                " AND NOT EXISTS (SELECT 1 FROM delivery_log AS l"
                "                 WHERE l.event_id = o.event_id AND l.outcome = 'applied')"
                " LIMIT 1").fetchone()
            if missing is None:
                return {"moved": added, "fenced": fenced}
            item, qty, event_id = missing
            conn.execute("INSERT INTO inventory_projection (item_id, reserved_qty)"
                         " VALUES (?, ?) ON CONFLICT (item_id) DO UPDATE"
                         " SET reserved_qty = reserved_qty + excluded.reserved_qty",
                         (item, qty))
            conn.execute("INSERT INTO reconciled_events (consumer, event_id, reconciled_at)"
                         " VALUES ('inventory', ?, ?)", (event_id, now))
            added[item] = added.get(item, 0) + qty
            fenced.append(event_id)


@pytest.mark.parametrize("design", [repair_not_in_flight, repair_compensating_delta,
                                    EXERCISES["in-flight-repair"].solution])
def test_correct_repair_designs_pass(design):
    verdict = grade("in-flight-repair", design, seeds=range(25))
    assert verdict.passed, str(verdict)


def test_an_order_whose_effect_is_in_the_projection_is_never_called_lost():
    for _, wrong in EXERCISES["in-flight-repair"].wrong:
        verdict = grade("in-flight-repair", wrong, seeds=range(6))
        for trial in verdict.failed:
            assert "never applied" not in trial.reason


@pytest.mark.parametrize("exercise_id", ["ack-after", "heartbeat", "tx-ack", "charge-once",
                                         "producer-retries", "drain", "inbox-cleanup",
                                         "really-missing", "newer-wins"])
def test_model_solutions_pass_in_the_sandbox(exercise_id):
    verdict = grade(exercise_id, EXERCISES[exercise_id].solution, seeds=range(6))
    assert verdict.passed, str(verdict)


def test_the_budgets_are_stated_in_the_readme():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert sb.BUDGETS in readme.replace("\n", " ")

def keeps_a_table_of_its_own(conn, delivery):
    conn.execute("CREATE TABLE IF NOT EXISTS seen (event_id TEXT PRIMARY KEY)")
    if conn.execute("INSERT INTO seen VALUES (?) ON CONFLICT DO NOTHING",
                    (delivery.event_id,)).rowcount:
        apply_order_placed(conn, delivery)


def test_a_handler_may_create_and_write_a_table_of_its_own():
    assert grade("idempotent-handler", keeps_a_table_of_its_own, seeds=range(3)).passed


def skips_the_lossy_network(service, delivery):
    service.service.charge(order_id=delivery.payload["orderId"],
                           amount=delivery.payload["qty"] * 500)


def moves_the_clock(conn, clock, policy):
    clock.advance(30 * 86400)


@pytest.mark.parametrize("exercise_id, fn, said", [
    ("charge-once", skips_the_lossy_network, "FlakyPayments offers no 'service'"),
    ("inbox-cleanup", moves_the_clock, "FakeClock offers no 'advance'"),
])
def test_a_proxy_offers_only_what_the_exercise_hands_out(exercise_id, fn, said):
    assert said in why(graded(exercise_id, fn)[0])


def through_a_cursor(conn, delivery):
    cur = conn.cursor()
    cur.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                " VALUES ('inventory', ?, 0) ON CONFLICT DO NOTHING", (delivery.event_id,))
    if cur.rowcount:
        apply_order_placed(conn, delivery)
    assert cur.execute("SELECT count(*) FROM inbox_processed").fetchone()[0] >= 1


def reads_rows_by_name(conn, delivery):
    row = conn.execute("SELECT count(*) AS n FROM inbox_processed WHERE event_id = ?",
                       (delivery.event_id,)).fetchone()
    if row["n"] == 0:
        conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                     " VALUES ('inventory', ?, 0)", (delivery.event_id,))
        apply_order_placed(conn, delivery)


@pytest.mark.parametrize("fn", [through_a_cursor, reads_rows_by_name])
def test_a_handler_reads_the_connection_as_sqlite3_does(fn):
    assert grade("idempotent-handler", fn, seeds=range(3)).passed


def retries_after_its_crash(delivery, ops):
    while True:  # "retry apply until it works", catching everything, the crash included
        try:
            ops.apply(delivery)
            break
        except BaseException:  # noqa: BLE001 - the mistake under test
            continue
    ops.ack(delivery)


def test_going_on_after_the_workers_crash_is_a_verdict_not_a_hang():
    verdict, took = graded("ack-after", retries_after_its_crash, seeds=range(3))
    reason = why(verdict)
    assert "went on calling the grader after its worker's simulated crash" in reason
    assert "ops.apply(delivery)" in reason
    assert took < sb.SILENCE_S


def reuses_the_graders_own_statement(conn, delivery):
    # The very text the grader logs with: a statement SQLite has prepared (and cached) for
    # the grader, without any check, must not be the submission's way in.
    from deliverylab.engine import trace
    conn.execute(trace._INSERT, (0.0, "worker-1", delivery.correlation_id, delivery.event_id,
                                 delivery.message_id, 1, "applied", "effect made"))


def test_the_graders_prepared_statements_are_no_way_in():
    reason = why(graded("idempotent-handler", reuses_the_graders_own_statement)[0])
    assert "the grader refused INSERT into delivery_log" in reason
    # Refused on every delivery, not only before the grader's own log used the statement.
    assert "and the same on" in reason


def test_an_error_of_the_graders_objects_keeps_its_builtin_kind_in_the_child():
    """``InvalidInput`` does not pickle (its __init__ takes three arguments): it reaches the
    submission under its own name and as the ``ValueError`` it is, so ``except ValueError``
    catches it there as it would without the sandbox."""
    from deliverylab.engine.errors import InvalidInput

    sent = sb._portable(InvalidInput("correlation_id", "a\x1b", "an id"))
    assert isinstance(sent, tuple) and sent[0] == "InvalidInput" and sent[2] == "ValueError"
    exc = sb._child_error(pickle.loads(pickle.dumps(sent)))
    assert isinstance(exc, ValueError) and type(exc).__name__ == "InvalidInput"
    assert "correlation_id" in str(exc)
    assert type(sb._child_error(("Weird", "text"))).__mro__[1] is Exception
    assert type(sb._child_error(("x y", "text", "SystemExit"))).__name__ == "Exception"
    assert not issubclass(type(sb._child_error(("X", "t", "SystemExit"))), SystemExit)
