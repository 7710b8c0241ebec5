"""Chapter 8's exercises: what breaks a correct consumer in operation.

* ``fenced-write``: the store's side of a fencing token. Writers holding leases of growing
  tokens write one document per key; paused writers (zombies) wake with a stale token, a
  rival writer runs between any two statements of the submission, and the store sometimes
  fails for a reason that is not a refusal.
* ``retry-budget``: the API's call to a bank that is down for 20 seconds, under a deadline
  and a retry budget of the submission's design, handed back with each answer.
* ``settle-batch``: a batch with a poison message and transient failures, settled message by
  message (the ``batchItemFailures`` design).
* ``compensate``: a saga's compensation that arrives twice and before the step it undoes.

Each grades outcomes, not a mechanism: the document a key ends with, the calls the bank saw,
the orders applied and dead-lettered, each item's reservation.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..book.retries import Bank, Unavailable
from ..book.sagas import SCHEMA as SAGA_SCHEMA
from ..book.sagas import decline
from ..book.tables import install_schema
from ..brokers.base import Delivery
from ..engine.clock import FakeClock
from ..engine.faults import Faults
from ..engine.orders import place_order
from ..engine.store import connect, transaction
from ..engine.worker import CONSUMER, PoisonMessage, apply_order_placed
from .grader import CourseLab, Exercise, Trial, register

# -- 8.1 the store's side of a fencing token -----------------------------------------------
DOCUMENTS = """
CREATE TABLE IF NOT EXISTS documents (
    key   TEXT PRIMARY KEY,
    body  TEXT NOT NULL,
    token INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
"""
KEYS = ("label-o-001", "label-o-002", "label-o-003")
WRITES = 60
RIVAL = 0.15          # a newer lease writes between two statements of the submission
STORE_FAILS = 0.08    # the store fails the submission's write (disk full)
_RIVAL_PUT = ("INSERT INTO documents (key, body, token) VALUES (?, ?, ?)"
              " ON CONFLICT (key) DO UPDATE SET body = excluded.body, token = excluded.token"
              " WHERE excluded.token >= documents.token")


def fenced_put_solution(conn: sqlite3.Connection, key: str, body: str, token: int) -> bool:
    with transaction(conn):  # BEGIN IMMEDIATE: no other writer between the read and the write
        row = conn.execute("SELECT token FROM documents WHERE key = ?", (key,)).fetchone()
        if row is not None and token < row[0]:
            return False  # a newer lease has written: this writer is a zombie
        conn.execute("INSERT INTO documents (key, body, token) VALUES (?, ?, ?)"
                     " ON CONFLICT (key) DO UPDATE SET body = excluded.body,"
                     " token = excluded.token", (key, body, token))
    return True


def last_write_wins(conn: sqlite3.Connection, key: str, body: str, token: int) -> bool:
    conn.execute("INSERT INTO documents (key, body, token) VALUES (?, ?, ?)"
                 " ON CONFLICT (key) DO UPDATE SET body = excluded.body,"
                 " token = excluded.token", (key, body, token))
    return True


def check_then_write(conn: sqlite3.Connection, key: str, body: str, token: int) -> bool:
    row = conn.execute("SELECT token FROM documents WHERE key = ?", (key,)).fetchone()
    if row is not None and token < row[0]:
        return False
    conn.execute("INSERT INTO documents (key, body, token) VALUES (?, ?, ?)"
                 " ON CONFLICT (key) DO UPDATE SET body = excluded.body,"
                 " token = excluded.token", (key, body, token))
    return True


def strictly_newer(conn: sqlite3.Connection, key: str, body: str, token: int) -> bool:
    cur = conn.execute("INSERT INTO documents (key, body, token) VALUES (?, ?, ?)"
                       " ON CONFLICT (key) DO UPDATE SET body = excluded.body,"
                       " token = excluded.token WHERE excluded.token > documents.token",
                       (key, body, token))
    return cur.rowcount == 1


class _Rival:
    """The harness's connection wrapper: every statement goes to the real connection; after
    one that leaves no transaction open, a newer lease may write (on another connection)."""

    def __init__(self, conn: sqlite3.Connection, act: Callable[[], None]) -> None:
        self._conn, self._act = conn, act

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        cur = self._conn.execute(sql, params)
        if not self._conn.in_transaction:
            self._act()
        return cur

    def __enter__(self) -> Any:
        return self._conn.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        out = self._conn.__exit__(*exc)
        if not self._conn.in_transaction:
            self._act()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _trace_rows(rows: list[str]) -> str:
    return "\n".join(["Trace of the key's writes (token, writer, what the store said):",
                      *(f"  {r}" for r in rows[-8:])])


def run_fenced_put(put: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed)
    where = (f"{WRITES} writes over {len(KEYS)} keys, tokens past 10; zombies with"
             f" stale tokens; a newer lease writes between your statements ({RIVAL:g});"
             f" the store fails a write ({STORE_FAILS:g})")
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "documents.db"
        conn = connect(db, must_exist=False)
        other = connect(db)
        install_schema(conn, DOCUMENTS)
        leases = dict.fromkeys(KEYS, 1)          # the newest token per key
        stored: dict[str, tuple[int, str]] = {}  # what the store must hold per key
        history: dict[str, list[str]] = {k: [] for k in KEYS}
        pending: list[tuple[str, int]] = []

        def rival() -> None:
            if not pending:
                return
            key, token = pending.pop()
            body = f"{key} by lease {token} (rival)"
            other.execute(_RIVAL_PUT, (key, body, token))
            leases[key] = token
            stored[key] = (token, body)
            during.append((key, f"{token:>3}  rival lease   accepted (during your call)"))

        failures: list[str] = []
        during: list[tuple[str, str]] = []  # the rival's writes, listed after the call's own

        def flush() -> None:
            for k, line in during:
                history[k].append(line)
            during.clear()

        for n in range(WRITES):
            flush()
            if failures:
                break  # the trace ends at the first failure
            key = KEYS[int(faults.uniform("key", n) * len(KEYS))]
            u = faults.uniform("who", n)
            if u < 0.45:
                leases[key] += 1 + int(faults.uniform("jump", n) * 3)  # a new lease
                token, who = leases[key], "new lease"
            elif u < 0.7:
                token, who = leases[key], "same lease again"
            else:
                token = max(1, leases[key] - 1 - int(faults.uniform("age", n) * 4))
                who = "zombie"
            body = f"{key} by lease {token} ({n})"
            before = stored.get(key, (0, ""))[0]
            if faults.uniform("rival", n) < RIVAL:
                pending.append((key, max(leases[key], token) + 1))
            broken = faults.uniform("fail", n) < STORE_FAILS
            if broken:
                conn.execute("CREATE TEMP TRIGGER full BEFORE INSERT ON documents BEGIN"
                             " SELECT RAISE(ABORT, 'database or disk is full'); END")
                conn.execute("CREATE TEMP TRIGGER full2 BEFORE UPDATE ON documents BEGIN"
                             " SELECT RAISE(ABORT, 'database or disk is full'); END")
            should = token >= before
            prev = stored.get(key)
            if should:  # the write serializes before any rival that runs during the call
                stored[key] = (token, body)
            wrapped = _Rival(conn, rival)
            try:
                answer: Any = put(wrapped, key, body, token)
                raised = None
            except Exception as exc:  # noqa: BLE001 - the store's failure, or the reader's
                answer, raised = None, exc
            finally:
                if conn.in_transaction:
                    conn.rollback()
                if broken:
                    conn.execute("DROP TRIGGER IF EXISTS temp.full")
                    conn.execute("DROP TRIGGER IF EXISTS temp.full2")
            rival()
            if (broken or raised is not None) and stored.get(key) == (token, body):
                if prev is None:
                    del stored[key]
                else:
                    stored[key] = prev
            if broken and not should and answer is False:
                broken = False  # refused before writing: the failure never struck
            if broken:
                history[key].append(f"{token:>3}  {who:<13} store failed, your put"
                                    f" {'raised' if raised else f'returned {answer!r}'}")
                if raised is None and not failures:
                    failures.append(f"the store failed (disk full) on write {n} and your put"
                                    f" returned {answer!r}: a failure is not a refusal; the"
                                    " caller must see an error and try again")
                    focus = key
                continue
            if raised is not None:
                if not failures:
                    failures.append(f"your code raised {type(raised).__name__}: {raised}"
                                    f" (write {n}, key {key}, token {token})")
                    focus = key
                continue
            history[key].append(f"{token:>3}  {who:<13} returned {answer!r}")
            row = conn.execute("SELECT body, token FROM documents WHERE key = ?",
                               (key,)).fetchone()
            have = (row[1], row[0]) if row is not None else None
            if answer is not should and not failures:
                failures.append(f"a write with token {token} to {key}, whose newest token was"
                                f" {before}, returned {answer!r}; the store should have"
                                f" {'taken' if should else 'refused'} it")
                focus = key
            want = stored.get(key)
            if have is not None and want is not None and have[0] < want[0] and not failures:
                failures.append(f"{key} holds the write of token {have[0]} after token"
                                f" {want[0]} was accepted: a stale write landed last")
                focus = key
            elif have != want and not failures:
                failures.append(f"{key} holds {have!r}, not the newest accepted write"
                                f" {want!r}")
                focus = key
        flush()
        conn.close()
        other.close()
    passed = not failures
    return Trial(seed=seed, faults=where, passed=passed, reason="; ".join(failures),
                 trace="" if passed else _trace_rows(history[focus]))


register(Exercise(
    id="fenced-write", chapter=8, title="A store that refuses a zombie's stale token",
    run=run_fenced_put, solution=fenced_put_solution, starter=last_write_wins,
    params=("conn", "key", "body", "token"),
    wrong=(("should have refused", last_write_wins),
           ("stale write landed last", check_then_write),
           ("should have taken", strictly_newer))))


# -- 8.2 a retry budget and a deadline -----------------------------------------------------
TRIES = 3
RATIO = 0.1       # retries at most this share of first attempts...
BURST = 10        # ...plus this many
ORDERS = 160
EVERY = 0.5
OUTAGE = (20.0, 40.0)
TRANSIENT = 0.05  # outside the outage, a call fails now and then
LEASE = 1.2


def call_bank_solution(bank: Any, order_id: str, deadline: float,
                       budget: dict) -> tuple[bool, dict]:
    # A token bucket carried in `budget` from call to call: every first attempt adds RATIO
    # of a token (up to BURST), every retry takes a whole one. It starts full.
    budget.setdefault("tokens", float(BURST))
    budget["tokens"] = min(float(BURST), budget["tokens"] + RATIO)
    for attempt in range(TRIES):
        if deadline - bank.clock.now() < bank.timeout_s:
            return False, budget  # this attempt could not finish before the caller gives up
        if attempt > 0:
            if budget["tokens"] < 1.0:
                return False, budget  # the budget is spent: the bank is down, do not pile on
            budget["tokens"] -= 1.0
        try:
            bank.charge(order_id)
            return True, budget
        except Unavailable:
            continue
    return False, budget


def call_bank_starter(bank: Any, order_id: str, deadline: float,
                      budget: dict) -> tuple[bool, dict]:
    """Charge ``order_id`` at the bank (``bank.charge(order_id)``, which raises
    ``Unavailable`` when the call fails). At most three attempts; retries capped by a budget
    of your design, so that they stay near a tenth of the calls while the bank is down; and
    no attempt started that could not finish before ``deadline`` (``bank.clock.now()``; a
    failing call takes ``bank.timeout_s``). ``budget`` is the dict you returned from the
    previous call (``{}`` on the first). Return ``(charged, budget)``: whether the bank
    charged the order, and the budget for the next call."""


def three_tries(bank: Any, order_id: str, deadline: float,
                budget: dict) -> tuple[bool, dict]:
    for _ in range(TRIES):
        try:
            bank.charge(order_id)
            return True, budget
        except Unavailable:
            continue
    return False, budget


def budget_without_deadline(bank: Any, order_id: str, deadline: float,
                            budget: dict) -> tuple[bool, dict]:
    budget.setdefault("tokens", float(BURST))
    budget["tokens"] = min(float(BURST), budget["tokens"] + RATIO)
    for attempt in range(TRIES):
        if attempt > 0:
            if budget["tokens"] < 1.0:
                return False, budget
            budget["tokens"] -= 1.0
        try:
            bank.charge(order_id)
            return True, budget
        except Unavailable:
            continue
    return False, budget


class _Bank(Bank):
    """The bank of ``retries`` with transient failures outside the outage, decided per
    call from the seed; it remembers each call's order, start time and result."""

    def __init__(self, clock: FakeClock, faults: Faults) -> None:
        super().__init__(clock=clock, outage=OUTAGE, call_s=0.05, timeout_s=0.5)
        self.faults = faults
        self.log: list[tuple[str, float, bool]] = []

    def charge(self, order_id: str) -> None:
        n = len(self.log)
        start = self.clock.now()
        if not self.down() and self.faults.uniform("transient", order_id, n) < TRANSIENT:
            self.calls.append(start)
            self.log.append((order_id, start, False))
            self.clock.advance(self.timeout_s)
            raise Unavailable("the bank did not answer")
        try:
            super().charge(order_id)
        except Unavailable:
            self.log.append((order_id, start, False))
            raise
        self.log.append((order_id, start, True))


def run_call_bank(call: Callable[..., Any], seed: int) -> Trial:
    clock = FakeClock()
    bank = _Bank(clock, Faults(seed=seed))
    budget: dict = {}
    where = (f"{ORDERS} orders, one every {EVERY:g}s; the bank down from {OUTAGE[0]:g}s to"
             f" {OUTAGE[1]:g}s, {TRANSIENT:g} of calls failing outside it; each call 0.5s"
             f" when it fails; deadline {LEASE:g}s after each order")
    failures: list[str] = []
    answers: dict[str, Any] = {}
    deadlines: dict[str, float] = {}
    for i in range(ORDERS):
        order = f"o-{i + 1:03d}"
        clock.sleep_until(max(clock.now(), i * EVERY))
        deadlines[order] = clock.now() + LEASE
        try:
            got = call(bank, order, deadlines[order], budget)
        except Exception as exc:  # noqa: BLE001 - the reader's code
            failures.append(f"your code raised {type(exc).__name__}: {exc} (order {order})")
            break
        # The budget comes back with the answer: the caller carries it to the next call.
        if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict)):
            failures.append(f"order {order}: your call returned {got!r}, not (charged,"
                            " budget) with the budget a dict")
            break
        answers[order], budget = got
    calls: dict[str, list[tuple[float, bool]]] = {}
    for order, start, ok in bank.log:
        calls.setdefault(order, []).append((start, ok))
    outage = [o for o in deadlines if OUTAGE[0] <= deadlines[o] - LEASE < OUTAGE[1]]
    in_outage = sum(len(calls.get(o, [])) for o in outage)
    focus = ""
    for order in deadlines:
        made = calls.get(order, [])
        if failures or order not in answers:
            break
        if len(made) > TRIES:
            failures.append(f"order {order} called the bank {len(made)} times (at most"
                            f" {TRIES})")
            focus = order
        late = [s for s, _ in made if deadlines[order] - s < bank.timeout_s - 1e-9]
        if late and not failures:
            failures.append(f"order {order} started a call at t={late[0]:g}s with"
                            f" {deadlines[order] - late[0]:.2f}s left before its deadline"
                            f" ({bank.timeout_s:g}s needed): it cannot finish in time")
            focus = order
        charged = any(ok for _, ok in made)
        if answers[order] is not charged and not failures:
            failures.append(f"order {order}: your call returned {answers[order]!r}, but the"
                            f" bank {'charged' if charged else 'did not charge'} it")
            focus = order
    limit = len(outage) * (1 + RATIO) + BURST
    if not failures and in_outage > limit:
        failures.append(f"{in_outage} bank calls for the {len(outage)} orders of the outage"
                        f" (a budget allows {limit:g}): retries multiplied the load while"
                        " the bank was down")
        focus = outage[-1]
    # Before the outage, and once it has been over for 30 s (the budget has refilled).
    before = [o for o in deadlines if deadlines[o] - LEASE < OUTAGE[0] - 5
              or deadlines[o] - LEASE >= OUTAGE[1] + 30]
    # Never called, or called once and failed with time enough left for a second call.
    missed = [o for o in before if not calls.get(o) or (
        len(calls[o]) == 1 and not calls[o][0][1]
        and deadlines[o] - calls[o][0][0] >= 2 * bank.timeout_s)]
    if not failures and missed:
        failures.append(f"{len(missed)} orders outside the outage were never charged (order"
                        f" {missed[0]}): never called, or a call that failed once, with the"
                        " budget full, was not retried")
        focus = missed[0]
    trace = ""
    if failures and focus:
        trace = "\n".join([f"Trace of order {focus} (its calls to the bank):",
                           *(f"  t={s:8.3f}  {'charged' if ok else 'failed'}"
                             for s, ok in calls.get(focus, [])),
                           f"  deadline t={deadlines[focus]:.3f}"])
    return Trial(seed=seed, faults=where, passed=not failures, reason="; ".join(failures),
                 trace=trace)


register(Exercise(
    id="retry-budget", chapter=8, title="Retries under a budget and a deadline",
    run=run_call_bank, solution=call_bank_solution, starter=call_bank_starter,
    params=("bank", "order_id", "deadline", "budget"),
    wrong=(("cannot finish in time", three_tries),
           ("cannot finish in time", budget_without_deadline))))


# -- 8.3 settling a batch message by message -----------------------------------------------
BATCH = 10
BATCH_ORDERS = 40
POISONS = 2
FLAKY = 0.1       # a handler call fails for a passing reason (a timeout), after its inbox row
STORE_FAILS_BATCH = 0.04  # the store fails a handler's write (disk full): not a duplicate
MAX_RECEIVES = 5
POISON_ITEM = "no-such-item"


def settle_solution(conn: sqlite3.Connection, batch: list[Delivery],
                    handle: Callable[..., None]) -> list[str]:
    failed = []
    with transaction(conn):
        for d in batch:
            conn.execute("SAVEPOINT one")  # each message's writes stand or fall alone
            try:
                handle(conn, d)
            except Exception:
                conn.execute("ROLLBACK TO one")
                failed.append(d.message_id)
            conn.execute("RELEASE one")
    return failed


def all_or_nothing(conn: sqlite3.Connection, batch: list[Delivery],
                   handle: Callable[..., None]) -> list[str]:
    try:
        with transaction(conn):
            for d in batch:
                handle(conn, d)
    except Exception:
        return [d.message_id for d in batch]
    return []


def skip_the_failures(conn: sqlite3.Connection, batch: list[Delivery],
                      handle: Callable[..., None]) -> list[str]:
    failed = []
    with transaction(conn):
        for d in batch:
            try:
                handle(conn, d)
            except Exception:
                failed.append(d.message_id)
    return failed


def _batch_handler(faults: Faults, errors: list[str]) -> Callable[..., None]:
    calls: dict[str, int] = {}

    def handle(conn: sqlite3.Connection, d: Delivery) -> None:
        n = calls[d.message_id] = calls.get(d.message_id, 0) + 1
        if not conn.in_transaction:
            raise RuntimeError("handle() needs an open transaction (the inbox row and the"
                               " effect commit together)")
        if faults.uniform("store", d.message_id, n) < STORE_FAILS_BATCH:
            raise sqlite3.OperationalError("database or disk is full")
        if not conn.execute("INSERT INTO inbox_processed (consumer, event_id, processed_at)"
                            " VALUES (?, ?, 0) ON CONFLICT (consumer, event_id) DO NOTHING",
                            (CONSUMER, d.event_id)).rowcount:
            return  # processed before: a duplicate
        if d.payload.get("itemId") == POISON_ITEM:
            raise PoisonMessage(f"unknown item {POISON_ITEM!r}")
        if faults.uniform("flaky", d.message_id, n) < FLAKY:
            raise TimeoutError("the stock service did not answer")
        apply_order_placed(conn, d)

    return handle


def run_settle(settle: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed)
    lab = CourseLab(seed=seed, max_receives=MAX_RECEIVES)
    poisons = {int(faults.uniform("poison", k) * BATCH_ORDERS) for k in range(POISONS)}
    for i in range(BATCH_ORDERS):
        if i in poisons:
            lab.place_order(POISON_ITEM, 1, order_id=f"o-poison-{i:03d}")
        else:
            lab.place_order(("coffee-beans", "oat-milk", "mugs")[i % 3], 1 + i % 3,
                            order_id=f"o-{i:03d}")
    errors: list[str] = []
    handle = _batch_handler(faults, errors)
    failures: list[str] = []
    queue, conn = lab.broker, lab.store
    acked_poison: list[str] = []
    for _ in range(200):
        got = queue.receive(5.0, BATCH, worker="batch-worker")
        if not got:
            nxt = queue.next_visible_at()
            if nxt is None:
                break
            lab.clock.sleep_until(nxt)
            continue
        try:
            answer = settle(conn, list(got), handle)
        except Exception as exc:  # noqa: BLE001 - the reader's code
            if conn.in_transaction:
                conn.rollback()
            failures.append(f"your code raised {type(exc).__name__}: {exc}")
            break
        if conn.in_transaction:
            conn.rollback()
            failures.append("your settle left a transaction open (it was rolled back)")
            break
        ids = {d.message_id for d in got}
        if not isinstance(answer, list | tuple | set) or not set(answer) <= ids:
            failures.append(f"settle returned {answer!r}: not a list of the batch's message"
                            " ids (the batchItemFailures)")
            break
        for d in got:
            if d.message_id in answer:
                if d.delivery_count >= MAX_RECEIVES:
                    queue.dead_letter(d, "failed every receive", worker="batch-worker")
                else:
                    queue.nack(d, 0.5, error="in batchItemFailures", worker="batch-worker")
            else:
                queue.ack(d, worker="batch-worker")
                if d.payload.get("itemId") == POISON_ITEM:
                    acked_poison.append(d.correlation_id or d.message_id)
    dead = {r[0] for r in conn.execute("SELECT correlation_id FROM dead_letters")}
    applied = {r[0] for r in conn.execute(
        "SELECT o.order_id FROM orders AS o JOIN inbox_processed AS i USING (event_id)")}
    want = dict(conn.execute("SELECT item_id, sum(qty) FROM orders WHERE item_id != ?"
                             " GROUP BY item_id", (POISON_ITEM,)))
    have = dict(conn.execute("SELECT item_id, reserved_qty FROM inventory_projection"))
    good_dead = sorted(o for o in dead if not o.startswith("o-poison"))
    where = (f"{BATCH_ORDERS} orders in batches of {BATCH}, {len(poisons)} of them poison;"
             f" {FLAKY:g} of handler calls time out after writing their inbox row,"
             f" {STORE_FAILS_BATCH:g} fail on a full disk;"
             f" max_receives={MAX_RECEIVES}")
    focus = ""
    if not failures and acked_poison:
        failures.append(f"the poison message of order {acked_poison[0]} was acknowledged as if"
                        " processed: it never took effect and never reached the dead letters")
        focus = acked_poison[0]
    if not failures and good_dead:
        failures.append(f"{len(good_dead)} good orders were dead-lettered with the poison"
                        f" (order {good_dead[0]}): lost")
        focus = good_dead[0]
    if not failures and want != {k: v for k, v in have.items() if v}:
        lost = sorted(o for o, item in conn.execute("SELECT order_id, item_id FROM orders")
                      if item != POISON_ITEM and have.get(item, 0) < want.get(item, 0))
        failures.append("the projection differs from the orders: "
                        + "; ".join(f"{k} orders {v}, projection {have.get(k, 0)}"
                                    for k, v in sorted(want.items()) if have.get(k, 0) != v)
                        + " (an order lost: its inbox row committed without its effect)")
        focus = lost[0] if lost else ""
    if not failures and not {o for o in dead if o.startswith("o-poison")} \
            == {f"o-poison-{i:03d}" for i in poisons}:
        failures.append("a poison message did not reach the dead letters")
    del applied
    trace = ""
    if failures and focus:
        from .grader import order_trace

        trace = order_trace(conn, focus)
    return Trial(seed=seed, faults=where, passed=not failures, reason="; ".join(failures),
                 trace=trace)


register(Exercise(
    id="settle-batch", chapter=8, title="Settle a batch message by message",
    run=run_settle, solution=settle_solution, starter=all_or_nothing,
    params=("conn", "batch", "handle"),
    wrong=(("dead-lettered with the poison", all_or_nothing),
           ("acknowledged as if processed", skip_the_failures))))


# -- 8.4 a compensation safe to deliver twice and first ------------------------------------
SAGA_ORDERS = 24
DECLINE_EVERY = 3
REPUBLISH = 0.4       # the decline is published a second time, under a new event id
FIRST_FAILS = 0.5     # the reservation's first attempt times out (it is retried later)


def compensate_solution(conn: sqlite3.Connection, delivery: Delivery) -> None:
    order = delivery.payload["orderId"]
    row = conn.execute("SELECT state FROM saga_reservations WHERE order_id = ?",
                       (order,)).fetchone()
    state = None if row is None else row[0]
    if delivery.type == "OrderPlaced":
        if state is not None:
            return  # reserved before (a duplicate), or cancelled first: refuse it
        apply_order_placed(conn, delivery)
        conn.execute("INSERT INTO saga_reservations (order_id, state) VALUES (?, 'reserved')",
                     (order,))
    elif delivery.type == "PaymentDeclined":
        if state == "reserved":
            conn.execute("UPDATE inventory_projection SET reserved_qty = reserved_qty - ?"
                         " WHERE item_id = ?",
                         (delivery.payload["qty"], delivery.payload["itemId"]))
            conn.execute("UPDATE saga_reservations SET state = 'released' WHERE order_id = ?",
                         (order,))
        elif state is None:
            # The compensation came first: a tombstone the late reservation will respect.
            conn.execute("INSERT INTO saga_reservations (order_id, state)"
                         " VALUES (?, 'cancelled')", (order,))
    else:
        raise PoisonMessage(f"unknown event type {delivery.type!r}")


def compensate_starter(conn: sqlite3.Connection, delivery: Delivery) -> None:
    """Reserve the order's stock on ``OrderPlaced`` (``apply_order_placed``); release it
    on ``PaymentDeclined`` (payload: ``orderId``, ``itemId``, ``qty``).

    The table ``saga_reservations (order_id, state)`` is yours ('reserved', 'released' or
    'cancelled'). A decline can arrive twice (published again under a new event id) and
    before the reservation it undoes (whose first attempt failed)."""


def compensate_delta(conn: sqlite3.Connection, delivery: Delivery) -> None:
    if delivery.type == "OrderPlaced":
        apply_order_placed(conn, delivery)
    elif delivery.type == "PaymentDeclined":
        conn.execute("UPDATE inventory_projection SET reserved_qty = reserved_qty - ?"
                     " WHERE item_id = ?",
                     (delivery.payload["qty"], delivery.payload["itemId"]))


def compensate_guarded(conn: sqlite3.Connection, delivery: Delivery) -> None:
    order = delivery.payload["orderId"]
    row = conn.execute("SELECT state FROM saga_reservations WHERE order_id = ?",
                       (order,)).fetchone()
    if delivery.type == "OrderPlaced":
        apply_order_placed(conn, delivery)
        conn.execute("INSERT INTO saga_reservations (order_id, state) VALUES (?, 'reserved')"
                     " ON CONFLICT (order_id) DO UPDATE SET state = 'reserved'", (order,))
    elif delivery.type == "PaymentDeclined" and row is not None and row[0] == "reserved":
        conn.execute("UPDATE inventory_projection SET reserved_qty = reserved_qty - ?"
                     " WHERE item_id = ?", (delivery.payload["qty"], delivery.payload["itemId"]))
        conn.execute("UPDATE saga_reservations SET state = 'released' WHERE order_id = ?",
                     (order,))


def run_compensate(handler: Callable[..., Any], seed: int) -> Trial:
    chance = Faults(seed=seed)
    errors: list[str] = []

    def handle(conn: sqlite3.Connection, d: Delivery) -> None:
        order = d.payload.get("orderId")
        if d.type == "OrderPlaced" and d.delivery_count == 1 \
                and chance.uniform("first", order) < FIRST_FAILS:
            raise TimeoutError("the stock service did not answer in time")
        try:
            handler(conn, d)
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc} (delivery {d.delivery_count} of {d.type}" \
                   f" for order {order})"
            if text not in errors:
                errors.append(text)
            raise

    faults = Faults(seed=seed, ack_fail=0.3)
    lab = CourseLab(seed=seed, faults=faults, handler=handle, workers=2)
    install_schema(lab.store, SAGA_SCHEMA)
    should: dict[str, int] = {}
    for i in range(SAGA_ORDERS):
        order, item, qty = f"o-{i + 1:03d}", f"item-{i + 1:03d}", 1 + i % 3
        lab.place_order(item, qty, order_id=order)
        should[item] = qty
        if i % DECLINE_EVERY == 0:
            decline(lab, order, item, qty)
            should[item] = 0
            if chance.uniform("republish", order) < REPUBLISH:
                decline(lab, order, item, qty, attempt=2)
    try:
        lab.run_until_idle()
    except Exception as exc:  # noqa: BLE001 - a store error the engine does not retry
        text = f"{type(exc).__name__}: {exc}"
        if not any(text in e for e in errors):
            errors.insert(0, text)
        if lab.store.in_transaction:
            lab.store.rollback()
    have = dict(lab.store.execute("SELECT item_id, reserved_qty FROM inventory_projection"))
    where = (f"{SAGA_ORDERS} orders, every {DECLINE_EVERY}rd declined; the decline published"
             f" twice ({REPUBLISH:g}); the reservation's first attempt fails ({FIRST_FAILS:g});"
             " ack_fail=0.3; 2 workers")
    failures = [f"your code raised {e}" for e in errors[:1]]
    wrong = [(i, q, have.get(i, 0)) for i, q in should.items() if have.get(i, 0) != q]
    focus = ""
    if wrong:
        item, q, h = wrong[0]
        order = "o-" + item.split("-")[1]
        if h < 0 or (q and 0 < h < q):
            why = "released twice" if h < 0 else "released though its order stands"
        elif q == 0:
            why = "still reserved after its decline (a leak)"
        elif h == 0:
            why = "never reserved"
        else:
            why = "reserved twice"
        failures.append(f"{len(wrong)} of {SAGA_ORDERS} items wrong; {item} (order {order})"
                        f" should hold {q} and holds {h}: {why}")
        focus = order
    trace = ""
    if failures and focus:
        from .grader import order_trace

        trace = order_trace(lab.store, focus)
    return Trial(seed=seed, faults=where, passed=not failures, reason="; ".join(failures),
                 trace=trace)


register(Exercise(
    id="compensate", chapter=8, title="A compensation safe twice and first",
    run=run_compensate, solution=compensate_solution, starter=compensate_starter,
    params=("conn", "delivery"),
    wrong=(("should hold 0", compensate_delta), ("a leak", compensate_guarded))))


# -- 8.5 what to page on -------------------------------------------------------------------
FAILURES = ("stalled", "poison", "redeliveries", "zombie", "drift", "relay")


def _busy(lab: CourseLab) -> None:  # healthy and busy: orders just placed, some through the outbox
    lab.place_orders(4)
    for i in range(2):
        place_order(None, item_id="tea", qty=1, order_id=f"o-fresh-{i}", store=lab.store,
                    clock=lab.clock, ids=lab.ids)
    lab.advance(10)


def _noisy(lab: CourseLab) -> None:  # healthy with a few lost ACKs: some redeliveries are normal
    lab.workers[0].faults = Faults(seed=lab.seed, ack_fail=0.05)
    lab.place_orders(20)
    lab.run_until_idle()


def _one_lost(lab: CourseLab) -> None:  # one unit of drift: a single order of 1 lost
    lab.place_order("tea", 1, order_id="o-single")
    lab.lose_messages(1)
    lab.run_until_idle()


def _scenarios() -> tuple[tuple[str, Callable[[CourseLab], None], str | None, frozenset[str]], ...]:
    """(what happens, how, the failure it is, the other failures it also is)."""
    from ..book import alerts as al

    return (("healthy traffic", al._healthy, None, frozenset()),
            ("busy: orders just placed, events still queued or in the outbox", _busy, None,
             frozenset()),
            ("one ACK in twenty lost", _noisy, None, frozenset()),
            ("workers stopped for 2 minutes", al._stalled, "stalled", frozenset({"drift"})),
            ("a poison message", al._poison, "poison", frozenset({"redeliveries"})),
            ("half the ACKs lost", al._lost_acks, "redeliveries", frozenset({"poison"})),
            ("a worker paused past its lease", lambda lab: al._zombie(lab, False), "zombie",
             frozenset({"redeliveries"})),
            ("the same, with a fencing token", lambda lab: al._zombie(lab, True), "zombie",
             frozenset({"redeliveries"})),
            ("two messages lost", al._lost_messages, "drift", frozenset()),
            ("one message of one unit lost", _one_lost, "drift", frozenset()),
            ("the relay down for 2 minutes", al._relay_down, "relay", frozenset({"drift"})))


def page_solution(before: Any, after: Any) -> set[str]:
    def grew(name: str) -> float:
        return getattr(after, name) - getattr(before, name)

    pages = set()
    if after.oldest_message_age_seconds > 60:
        pages.add("stalled")  # nobody takes the messages
    if after.dead_letters > 0:
        pages.add("poison")
    deliveries = grew("deliveries_total")
    if deliveries and grew("redeliveries_total") / deliveries > 0.2:
        pages.add("redeliveries")  # a few are normal; a fifth is not
    if grew("acks_refused_total") > 0 or grew("effects_fenced_total") > 0:
        pages.add("zombie")
    if after.reconcile_drift_qty > 0 and after.queue_visible + after.queue_in_flight == 0:
        pages.add("drift")  # drift with nothing left to deliver: it will not heal itself
    if after.relay_oldest_unsent_age_seconds > 60:
        pages.add("relay")
    return pages


def page_starter(before: Any, after: Any) -> set[str]:
    """Two readings of ``deliverylab.app.metrics.signals`` a window apart (counters grow,
    gauges are the value now). Return the failures to page someone for, named from
    ``"stalled"``, ``"poison"``, ``"redeliveries"``, ``"zombie"``, ``"drift"``, ``"relay"``;
    an empty set when the system is healthy, busy included."""
    return set()


def page_any_drift(before: Any, after: Any) -> set[str]:
    pages = page_solution(before, after)
    if after.reconcile_drift_qty > 0:
        pages.add("drift")
    return pages


def page_any_redelivery(before: Any, after: Any) -> set[str]:
    pages = page_solution(before, after)
    if after.redeliveries_total > before.redeliveries_total:
        pages.add("redeliveries")
    return pages


def run_page(page: Callable[..., Any], seed: int) -> Trial:
    from ..app.metrics import signals

    failures: list[str] = []
    shown: list[str] = []
    for what, act, failure, also in _scenarios():
        lab = CourseLab(seed=seed)
        lab.place_orders(10 + seed % 7 * 3)  # the healthy traffic before the window
        lab.run_until_idle()
        before = signals(lab.store, now=lab.clock.now())
        act(lab)
        after = signals(lab.store, now=lab.clock.now())
        try:
            got = page(before, after)
        except Exception as exc:  # noqa: BLE001 - the reader's code
            failures.append(f"your code raised {type(exc).__name__}: {exc} ({what})")
            break
        if not isinstance(got, set | frozenset | list | tuple) or not set(got) <= set(FAILURES):
            failures.append(f"page returned {got!r} for {what}: expected a set of names from"
                            f" {', '.join(FAILURES)}")
            break
        got = set(got)
        if failure is None and got:
            failures.append(f"{what}: a healthy system, and you paged for"
                            f" {', '.join(sorted(got))} (a false alarm)")
        elif failure is not None and failure not in got:
            failures.append(f"{what}: you did not page for {failure} (a failure nobody hears"
                            " of)")
        elif failure is not None and got - {failure} - also:
            failures.append(f"{what}: you also paged for {', '.join(sorted(got - {failure} - also))},"
                            " which did not happen")
        if failures:
            changed = {k: v for k, v in after.as_dict().items()
                       if k != "now" and v != getattr(before, k)}
            shown = [f"Signals that changed over the window ({what}):",
                     *(f"  {k:<34} {getattr(before, k):>8g} -> {v:g}"
                       for k, v in changed.items())]
            break
    where = ("11 runs: healthy, busy, a few lost ACKs, and eight failures, each read before"
             " and after")
    return Trial(seed=seed, faults=where, passed=not failures, reason="; ".join(failures),
                 trace="\n".join(shown))


register(Exercise(
    id="page-on", chapter=8, title="What to page someone for",
    run=run_page, solution=page_solution, starter=page_starter,
    params=("before", "after"),
    wrong=(("a failure nobody hears of", page_starter), ("a false alarm", page_any_drift),
           ("a false alarm", page_any_redelivery))))


# -- 8.6 an MQTT QoS 1 subscriber that applies each message once ---------------------------
MQTT_SCHEMA = """
CREATE TABLE IF NOT EXISTS stock_reserved (
    order_id TEXT NOT NULL,
    item_id  TEXT NOT NULL,
    qty      INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS mqtt_inbox (
    key TEXT PRIMARY KEY
) STRICT, WITHOUT ROWID;
"""
MQTT_MESSAGES = 30
PACKET_IDS = 4         # the session's packet identifiers, reused once acknowledged
IN_TRANSIT = 0.15      # the PUBLISH never reaches the subscriber; resent with DUP after reconnect
KILLED = 0.2           # the subscriber dies after its commit, before its PUBACK
REPUBLISHED = 0.2      # the publisher's PUBACK was lost: it published the message again


class MqttMessage:
    """One PUBLISH as the subscriber sees it: ``packet_id`` (1 to 4, reused once
    acknowledged), ``dup`` (the broker sent it before), ``topic`` and ``payload``."""

    __slots__ = ("dup", "packet_id", "payload", "topic")

    def __init__(self, packet_id: int, dup: bool, topic: str, payload: dict[str, Any]) -> None:
        self.packet_id, self.dup, self.topic, self.payload = packet_id, dup, topic, payload

    def __repr__(self) -> str:
        return (f"MqttMessage(packet_id={self.packet_id}, dup={self.dup}, topic={self.topic!r},"
                f" payload={self.payload!r})")


def mqtt_once_solution(conn: sqlite3.Connection, message: MqttMessage) -> None:
    # The packet id is reused and the DUP flag proves nothing: key by the order itself.
    if conn.execute("INSERT INTO mqtt_inbox (key) VALUES (?) ON CONFLICT DO NOTHING",
                    (message.payload["orderId"],)).rowcount:
        conn.execute("INSERT INTO stock_reserved (order_id, item_id, qty) VALUES (?, ?, ?)",
                     (message.payload["orderId"], message.payload["itemId"],
                      message.payload["qty"]))


def mqtt_by_packet_id(conn: sqlite3.Connection, message: MqttMessage) -> None:
    if conn.execute("INSERT INTO mqtt_inbox (key) VALUES (?) ON CONFLICT DO NOTHING",
                    (str(message.packet_id),)).rowcount:
        conn.execute("INSERT INTO stock_reserved (order_id, item_id, qty) VALUES (?, ?, ?)",
                     (message.payload["orderId"], message.payload["itemId"],
                      message.payload["qty"]))


def mqtt_skip_dup(conn: sqlite3.Connection, message: MqttMessage) -> None:
    if message.dup:
        return  # "seen it already"
    conn.execute("INSERT INTO stock_reserved (order_id, item_id, qty) VALUES (?, ?, ?)",
                 (message.payload["orderId"], message.payload["itemId"],
                  message.payload["qty"]))


def run_mqtt_once(handler: Callable[..., Any], seed: int) -> Trial:
    faults = Faults(seed=seed)
    conn = connect(":memory:", must_exist=False)
    install_schema(conn, MQTT_SCHEMA)
    stream: list[dict[str, Any]] = []
    body: dict[str, Any]
    for i in range(MQTT_MESSAGES):
        body = {"orderId": f"o-{i + 1:03d}", "itemId": ("tea", "mugs", "oat-milk")[i % 3],
                "qty": 1 + i % 3}
        stream.append(body)
        if faults.uniform("republish", i) < REPUBLISHED:  # the copy arrives a little later
            stream.insert(len(stream) + 1, dict(body))
    # the copies come two messages later, not right away
    ordered: list[dict[str, Any]] = []
    later: list[tuple[int, dict[str, Any]]] = []
    seen_ids: set[str] = set()
    for n, body in enumerate(stream):
        if body["orderId"] in seen_ids:
            later.append((n + 2, body))
            continue
        seen_ids.add(body["orderId"])
        ordered.append(body)
        ordered.extend(b for due, b in later if due <= n)
        later = [(due, b) for due, b in later if due > n]
    ordered.extend(b for _, b in later)
    log: dict[str, list[str]] = {}
    errors: list[str] = []
    pid = 0
    for n, body in enumerate(ordered):
        pid = pid % PACKET_IDS + 1  # the next identifier, reused once acknowledged
        dup = False
        if body["orderId"] in log:
            log[body["orderId"]].append("  the publisher's second copy of the order:")
        for attempt in range(1, 20):
            msg = MqttMessage(pid, dup, "orders/placed", dict(body))
            lines = log.setdefault(body["orderId"], [])
            if faults.uniform("transit", n, attempt) < IN_TRANSIT:
                lines.append(f"  packet {pid}, dup={int(dup)}: lost in transit; resent after"
                             " reconnect")
                dup = True
                continue
            rows = conn.execute("SELECT count(*) FROM stock_reserved WHERE order_id = ?",
                                (body["orderId"],)).fetchone()[0]
            try:
                with transaction(conn):
                    handler(conn, msg)
            except Exception as exc:  # noqa: BLE001 - the reader's code
                text = f"{type(exc).__name__}: {exc} (packet {pid}, order {body['orderId']})"
                if text not in errors:
                    errors.append(text)
                lines.append(f"  packet {pid}, dup={int(dup)}: your code raised; no PUBACK")
                dup = True
                continue
            made = conn.execute("SELECT count(*) FROM stock_reserved WHERE order_id = ?",
                                (body["orderId"],)).fetchone()[0] - rows
            did = f"reserved {made} time{'s' if made != 1 else ''}" if made else "nothing reserved"
            if faults.uniform("killed", n, attempt) < KILLED:
                lines.append(f"  packet {pid}, dup={int(dup)}: {did}, committed; killed"
                             " before PUBACK")
                dup = True
                continue
            lines.append(f"  packet {pid}, dup={int(dup)}: {did}, committed, PUBACK")
            break
    counts = dict.fromkeys((b["orderId"] for b in stream), 0)
    for (order,) in conn.execute("SELECT order_id FROM stock_reserved"):
        counts[order] = counts.get(order, 0) + 1
    conn.close()
    lost = tuple(o for o, c in counts.items() if c == 0)
    dup_orders = tuple(o for o, c in counts.items() if c > 1)
    reasons = [f"your code raised {e}" for e in errors[:1]]
    if lost:
        reasons.append(f"{len(lost)} of {len(counts)} orders lost: never reserved")
    if dup_orders:
        reasons.append(f"{len(dup_orders)} of {len(counts)} orders duplicated: reserved more"
                       " than once")
    focus = (lost or dup_orders or ("",))[0]
    where = (f"{MQTT_MESSAGES} orders over QoS 1, packet ids 1-{PACKET_IDS} reused;"
             f" {IN_TRANSIT:g} of PUBLISHes lost in transit, {KILLED:g} of handlings killed"
             f" before PUBACK, {REPUBLISHED:g} of orders published twice")
    trace = ""
    if reasons and focus:
        trace = "\n".join([f"Trace of order {focus} (each PUBLISH the subscriber was sent):",
                           *log.get(focus, [])])
    return Trial(seed=seed, faults=where, passed=not reasons, reason="; ".join(reasons),
                 lost=lost, duplicated=dup_orders, trace=trace)


register(Exercise(
    id="mqtt-once", chapter=8, title="An MQTT QoS 1 subscriber that applies each order once",
    run=run_mqtt_once, solution=mqtt_once_solution, starter=mqtt_by_packet_id,
    params=("conn", "message"),
    wrong=(("lost", mqtt_by_packet_id), ("lost", mqtt_skip_dup))))
