"""The lost ACK's two halves, everywhere the chapters teach them, asserted on the engine.

Chapters 1 and 2 claim: a lost ACK has two halves, the request (``ack_fail``: the queue never
hears it, the message comes back) and the answer (``ack_answer_lost``: the queue deleted the
message, the worker hears nothing). The worker cannot tell them apart. The at-most-once worker,
which applies only once the ACK was confirmed (``if ops.ack(d): ops.apply(d)``), loses orders
to a lost answer with no crash at all; apply-then-ack and the inbox lose nothing to it and
duplicate nothing. Chapter 1's matrix and chapter 7's run the same three faults.

Chapter 4 claims the same two halves for a client posting orders to the real API with retries
(a lost request writes nothing; a lost answer hides a written order, and a retry without an id
writes a second one), chapter 6 for the payment service (a lost request charges nothing; a
lost answer charges twice without a key). The panel has a slider for each half, and
``deliverylab worker --help`` explains both flags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deliverylab.app.cli import RATE_ENVS, RATE_FLAGS, RATE_HELP
from deliverylab.book import beyond, labviews
from deliverylab.book.effects import PaymentService, charge_handler, charge_run
from deliverylab.book.lab import Lab, guarantee_matrix, run_scenario, why_lost
from deliverylab.book.panel import LabPanel
from deliverylab.book.producer import (
    LossyLink,
    NoAnswer,
    order_request,
    post_with_retries,
    producer_run,
)
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import FAULT_POINTS, Faults

ROOT = Path(__file__).resolve().parents[2]
MODES = ("at-most-once", "at-least-once", "idempotent", "transactional")
SEEDS = (1, 29, 54, 2024)
ANSWER_DETAIL = "the queue deleted the message, but its answer never came back"


def cells(name: str) -> dict[str, dict]:
    nb = json.loads((ROOT / "chapters" / name).read_text(encoding="utf-8"))
    return {c["id"]: c for c in nb["cells"]}


def source(name: str, cell_id: str) -> str:
    return "".join(cells(name)[cell_id]["source"])


def text_output(name: str, cell_id: str) -> str:
    out = []
    for o in cells(name)[cell_id].get("outputs", []):
        data = o.get("data", {}).get("text/plain") or o.get("text") or ""
        out.append("".join(data))
    return "\n".join(out)


# -- chapter 1 and 2: the engine ------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_a_lost_answer_alone_loses_at_most_once_orders_and_harms_no_other_mode(seed):
    table = guarantee_matrix(orders=80, faults=Faults(seed=seed, ack_answer_lost=0.25),
                             seed=seed, modes=MODES).set_index("mode")
    assert table.loc["at-most-once", "lost"] > 0
    assert table.loc["at-most-once", "duplicated"] == 0
    for mode in ("at-least-once", "idempotent", "transactional"):
        assert table.loc[mode, "correct"] == 80, mode
    # A lost answer never brings the message back: nobody receives more than one delivery.
    assert (table["deliveries"] == 80).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_the_at_most_once_losses_to_a_lost_answer_happen_with_no_crash(seed):
    lab = run_scenario(mode="at-most-once", orders=60,
                       faults=Faults(seed=seed, ack_answer_lost=0.3), seed=seed)
    log = lab.log()
    assert "crashed" not in set(log.outcome)
    lost = lab.check().lost
    causes = why_lost(lab)
    assert lost > 0 and causes["lost orders"].sum() == lost
    assert set(causes.outcome) == {"ack_failed"}
    assert all(ANSWER_DETAIL in d for d in causes.detail)
    # Both sides are in the trace: the queue's deletion and the worker hearing nothing.
    for event in lab.events().query("state == 'lost'").event_id:
        outcomes = log[log.event_id == event].outcome.tolist()
        assert outcomes == ["received", "acked", "ack_failed"], outcomes


def test_the_worker_cannot_tell_the_halves_apart_only_the_trace_can():
    # The worker's own line is the same after either half; the trace names the half.
    lines = {}
    for point in ("ack_fail", "ack_answer_lost"):
        said: list[str] = []
        lab = Lab(seed=54, mode="at-most-once", faults=Faults(seed=54, **{point: 1.0}),
                  echo=said.append)
        lab.place_order("coffee-beans", 1, order_id="o-001")
        lab.step()
        lines[point] = [s.split(" ", 3)[-1] for s in said]
        detail = lab.log("o-001").query("outcome == 'ack_failed'").detail.iloc[0]
        assert ("answer never came back" in detail) is (point == "ack_answer_lost")
    assert lines["ack_fail"] == lines["ack_answer_lost"]


def test_why_lost_counts_crashes_and_lost_answers_apart_and_refuses_a_non_lab():
    faults = Faults(seed=29, ack_fail=0.2, ack_answer_lost=0.1, crash_after_receive=0.1)
    lab = run_scenario(mode="at-most-once", orders=200, faults=faults, seed=29)
    causes = why_lost(lab).set_index("outcome")["lost orders"]
    assert causes.sum() == lab.check().lost
    assert set(causes.index) == {"ack_failed", "crashed"}
    with pytest.raises(InvalidInput, match="^lab must be a deliverylab.book.lab.Lab"):
        why_lost("not a lab")  # type: ignore[arg-type]


def test_chapter_1_says_what_its_matrix_and_trace_show():
    faults = Faults(seed=29, ack_fail=0.2, ack_answer_lost=0.1, crash_after_receive=0.1)
    assert "Faults(seed=29, ack_fail=0.2, ack_answer_lost=0.1, crash_after_receive=0.1)" in \
        source("01_guarantees.ipynb", "a795ddca")
    lab = run_scenario(mode="at-most-once", orders=200, faults=faults, seed=29)
    causes = why_lost(lab).set_index("outcome")["lost orders"]
    # "more than half of the losses happened with no crash at all"
    assert "more than half of the losses happened with no crash at all" in \
        source("01_guarantees.ipynb", "5e406876")
    assert causes["ack_failed"] > causes["crashed"]
    saved = text_output("01_guarantees.ipynb", "why-lost-amo")
    assert str(causes["ack_failed"]) in saved and str(causes["crashed"]) in saved
    # Chapter 7 runs chapter 1's scenario on every engine: the same faults.
    assert beyond.CHAPTER_FAULTS == {"ack_fail": 0.2, "ack_answer_lost": 0.1,
                                     "crash_after_receive": 0.1}
    matrix = guarantee_matrix(orders=200, faults=faults, seed=29, modes=MODES)
    lost = int(matrix.set_index("mode").loc["at-most-once", "lost"])
    assert f"{lost} lost, 28 duplicated" in source("07_beyond_one_machine.ipynb", "7b43f80a")


def test_chapter_2_story_every_answer_lost():
    verdicts = {}
    for mode in ("at-least-once", "idempotent", "at-most-once"):
        lab = Lab(seed=54, mode=mode, faults=Faults(seed=54, ack_answer_lost=1.0))
        lab.place_order("coffee-beans", 1, order_id="o-001")
        verdicts[mode] = lab.run_until_idle()
        assert "crashed" not in set(lab.log().outcome)
    assert verdicts["at-most-once"].lost == 1
    assert verdicts["at-least-once"].ok and verdicts["idempotent"].ok
    saved = text_output("02_ack_loss.ipynb", "answer-lost-verdict")
    assert saved == repr(verdicts["at-most-once"].verdict)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql",
                                    pytest.param("rabbitmq", marks=pytest.mark.slow),
                                    pytest.param("jetstream", marks=pytest.mark.slow)])
def test_a_lost_answer_loses_the_same_orders_on_every_engine(engine):
    faults = Faults(seed=29, ack_answer_lost=0.3)
    got = beyond.guarantee_matrix([engine], orders=30, faults=faults,
                                  modes=["at-most-once", "at-least-once"]).set_index("mode")
    want = guarantee_matrix(orders=30, faults=faults, seed=beyond.CHAPTER_SEED,
                            modes=["at-most-once", "at-least-once"]).set_index("mode")
    assert int(got.loc["at-most-once", "lost"]) == int(want.loc["at-most-once", "lost"]) > 0
    assert int(got.loc["at-least-once", "correct"]) == 30


# -- the panel --------------------------------------------------------------------------------

def test_the_panel_has_a_slider_for_each_half_and_passes_both_to_the_workers():
    panel = LabPanel(seed=7, orders=30, mode="at-most-once", ack_answer_lost=0.3)
    assert "dl-ack-answer-slider" in panel.ack_answer_lost._dom_classes
    assert panel.faults().ack_answer_lost == 0.3 and panel.settings()["ack_answer_lost"] == 0.3
    assert "ack_answer_lost=0.30" in repr(panel)
    panel.place_button.click()
    panel.run_button.click()
    counts = panel.counts
    assert counts["lost"] == panel.lab.check().lost > 0
    assert "crashed" not in set(panel.lab.log().outcome)
    # The slider applies from the next delivery, like every knob.
    panel.ack_answer_lost.value = 0.0
    assert panel.lab.workers[0].faults.ack_answer_lost == 0.0
    assert "ACK answer lost rate is now 0.00" in panel.status.value
    assert "ACK answer lost rate 0.00" in panel.snapshot()._repr_html_()
    panel.close()


def test_the_panel_refuses_a_bad_answer_lost_rate():
    with pytest.raises(InvalidInput, match=r"^ack_answer_lost must be a number in \[0, 1\], got 2"):
        LabPanel(ack_answer_lost=2)


# -- chapter 6: the payment service's two halves -----------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_a_lost_request_never_charges_twice_and_a_lost_answer_does_without_a_key(seed):
    for mode in ("at-least-once", "idempotent"):
        request = charge_run(mode, keyed=False, orders=20, seed=seed, lost_request=0.4)
        assert request.charges == request.calls == request.orders, mode
        assert request.attempts > request.calls  # retried, and never heard
        answer = charge_run(mode, keyed=False, orders=20, seed=seed, lost_answer=0.4)
        assert answer.charges == answer.calls > answer.orders, mode
        keyed = charge_run(mode, keyed=True, orders=20, seed=seed, lost_answer=0.4)
        assert keyed.charges == keyed.orders and keyed.calls > keyed.orders, mode


def test_the_handler_says_the_same_after_either_half():
    from deliverylab.brokers.base import Delivery

    said = {}
    for half in ("lost_request", "lost_answer"):
        service = PaymentService(clock=FakeClock(), seed=1)
        handler = charge_handler(service, keyed=True, **{half: 1.0})
        delivery = Delivery(seq=1, message_id="m-1", event_id="evt-1", type="OrderPlaced",
                            payload={"orderId": "o-1", "qty": 1}, correlation_id="o-1",
                            receipt="r-1", delivery_count=1, lease_until=2.0)
        with pytest.raises(TimeoutError) as caught:
            handler(None, delivery)  # type: ignore[arg-type]
        said[half] = (type(caught.value), str(caught.value), service.charge_count())
        service.conn.close()
    assert said["lost_request"][:2] == said["lost_answer"][:2]
    assert (said["lost_request"][2], said["lost_answer"][2]) == (0, 1)


def test_charge_handler_names_a_bad_lost_request_rate():
    service = PaymentService(clock=FakeClock(), seed=1)
    with pytest.raises(InvalidInput, match=r"^lost_request must be a number in \[0, 1\]"):
        charge_handler(service, keyed=True, lost_request=-0.1)
    with pytest.raises(InvalidInput, match="^attempts must be a list, or None"):
        charge_handler(service, keyed=True, attempts="no")  # type: ignore[arg-type]
    service.conn.close()


# -- chapter 4: the client that retries over a lossy link --------------------------------------

def test_a_lost_request_writes_nothing_and_a_lost_answer_hides_a_written_order():
    for identity in ("none", "orderId", "Idempotency-Key"):
        requests = producer_run(identity=identity, seeds=[3, 4], requests=15, lost_request=0.4)
        assert requests.orders_written == requests.requests == requests.reached_server
        assert requests.attempts > requests.requests
        answers = producer_run(identity=identity, seeds=[3, 4], requests=15, lost_answer=0.4)
        assert answers.reached_server == answers.attempts > answers.requests
        if identity == "none":  # every attempt that reached the API wrote an order
            assert answers.orders_written == answers.attempts and answers.extra_orders > 0
        else:
            assert answers.extra_orders == 0


def test_the_client_sees_the_same_timeout_for_either_half():
    class Recorder:
        def __init__(self) -> None:
            self.bodies: list[dict] = []

        def post(self, path, json, headers):
            self.bodies.append(json)

            class Answer:
                status_code = 201
            return Answer()

    seen = {}
    for half in ("lost_request", "lost_answer"):
        api = Recorder()
        link = LossyLink(api, seed=1, **{half: 1.0})
        with pytest.raises(NoAnswer) as caught:
            link.post("/orders", {"itemId": "x", "qty": 1}, request_id="r-1", attempt=1)
        seen[half] = (str(caught.value), len(api.bodies), link.log[0].outcome)
    assert seen["lost_request"][0] == seen["lost_answer"][0]
    assert seen["lost_request"][1:] == (0, "request lost")
    assert seen["lost_answer"][1:] == (1, "answer lost")


def test_the_client_names_bad_input():
    with pytest.raises(InvalidInput, match="^client must be an HTTP client"):
        LossyLink(object())
    link = LossyLink(type("C", (), {"post": lambda *a, **k: None})())
    with pytest.raises(InvalidInput, match=r"^lost_answer must be a number in \[0, 1\]"):
        LossyLink(link.client, lost_answer=1.5)
    with pytest.raises(InvalidInput, match="^attempt must be an integer"):
        link.post("/orders", {}, request_id="r", attempt=0)
    with pytest.raises(InvalidInput, match="^identity must be 'none' or 'orderId' or"):
        order_request("r", "x", 1, "cookie")
    with pytest.raises(InvalidInput, match="^link must be a LossyLink"):
        post_with_retries("link", "r", "x", 1, identity="none")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="^seeds must be at least one seed"):
        producer_run(identity="none", seeds=[])


def test_a_client_that_never_hears_back_gives_up_after_its_attempts():
    link = LossyLink(type("C", (), {"post": lambda *a, **k: None})(), lost_request=1.0)
    with pytest.raises(NoAnswer, match="after 3 attempts"):
        post_with_retries(link, "r-1", "x", 1, identity="none", max_attempts=3)
    assert [a.attempt for a in link.log] == [1, 2, 3]


# -- the CLI ------------------------------------------------------------------------------------

def test_every_fault_flag_says_what_it_does_and_both_halves_are_in_the_help():
    assert set(RATE_HELP) == set(FAULT_POINTS)
    out = subprocess.run([sys.executable, "-m", "deliverylab", "worker", "--help"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert RATE_FLAGS["ack_answer_lost"] in text and RATE_ENVS["ack_answer_lost"] in text
    assert "--ack-fail-rate loses the request, --ack-answer-lost-rate the answer" in text
    assert " ".join(RATE_HELP["ack_answer_lost"].split()) in text


def test_the_answer_lost_rate_from_the_environment_is_checked_like_the_others(tmp_path):
    db = tmp_path / "app.db"
    init = subprocess.run([sys.executable, "-m", "deliverylab", "init-db", "--db", str(db)],
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    out = subprocess.run([sys.executable, "-m", "deliverylab", "worker", "--db", str(db)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ACK_ANSWER_LOST_RATE": "1.5"})
    assert out.returncode == 2
    assert "ACK_ANSWER_LOST_RATE" in out.stderr and "1.5" in out.stderr


def test_chapter_4_teaches_the_new_flag_where_it_teaches_the_ack_failure_flag():
    text = source("04_lab.ipynb", "53de8c5e")
    assert "--ack-answer-lost-rate 0.3" in text and "ACK_ANSWER_LOST_RATE" in text
    assert "ACK_FAIL_RATE" in text


# -- the panel counters agree with the verdict (issue 19, item 15) ------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_the_counters_keep_what_a_repair_hid_as_the_verdict_does(seed):
    lab = Lab(seed=seed, mode="at-least-once",
              faults=Faults(seed=seed, ack_fail=0.5, lose_message=0.1))
    lab.place_orders(30)
    lab.run_until_idle()
    before = labviews.counters(lab.store)
    lab.reconcile()
    after, result = labviews.counters(lab.store), lab.check()
    assert result.ok and result.repaired
    assert after["duplicated"] == before["duplicated"] == \
        result.extra_applications + result.repaired_extra_applications > 0
    assert f"(+{after['duplicated']} extra)" in result.verdict
    assert after["repaired"] == result.repaired_never_applied == before["lost"] > 0
    assert after["lost"] == 0
    # More duplicates after the repair add to the ones it hid, as the verdict's two parts do.
    lab.place_orders(10)
    lab.run_until_idle()
    later, result = labviews.counters(lab.store), lab.check()
    assert later["duplicated"] == result.extra_applications + result.repaired_extra_applications


def test_chapter_4s_snapshot_shows_the_counters_the_verdict_states():
    saved = text_output("04_lab.ipynb", "f61b6c4e")
    verdict = saved.splitlines()[0]
    counters = saved.splitlines()[1]
    assert verdict.startswith("checker: OK (repaired)")
    extra = verdict.split("(+", 1)[1].split(" extra", 1)[0]
    assert f"effects duplicated {extra}," in counters and extra != "0"
