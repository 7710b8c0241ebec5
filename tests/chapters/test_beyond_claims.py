"""What chapter 7 ("Beyond one machine") says in prose, asserted on the engines themselves.

The chapter claims:

* the guarantee is the consumer's order of work, not the broker's: chapter 1's orders and
  fault schedule give chapter 1's counts, mode by mode, on every engine (SQLite, PostgreSQL,
  RabbitMQ, JetStream): at-most-once loses, at-least-once duplicates, idempotent does
  neither, although it receives as many messages as at-least-once;
* ``transactional`` runs exactly where the broker is the store's own database (SQLite and
  PostgreSQL) and is refused by the worker elsewhere, because the ACK is a write in another
  system;
* on every engine a lost ACK brings the message back with its delivery count one higher, a
  message that fails every delivery reaches the dead letters after ``max_receives``
  deliveries, and a redrive hands it out again as a first delivery;
* of the four, only JetStream drops a second send with the same producer dedup id (its
  ``Nats-Msg-Id`` window); the others store both, and the inbox is then the only defence;
* an outbox relay that dies between a publish and its mark publishes the row again: RabbitMQ
  stores every publish, JetStream drops the repeats within its duplicate window and stores
  them after it; an at-least-once worker then applies the repeats twice, an idempotent one
  never does;
* a three-node JetStream cluster whose stream leader is SIGKILLed twice gets a new leader each
  time and loses nothing; idempotent workers apply every order once, at-least-once workers
  apply some twice; the picture marks each kill and its publish pause;
* every run removes what it made on the servers, and the book shows the page's saved outputs
  without executing it.

The RabbitMQ and JetStream runs wait for real leases (one second), so those cases are slow.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import nbformat
import pandas as pd
import pytest
import yaml

from deliverylab.book import beyond
from deliverylab.book.lab import guarantee_matrix as chapter_1_matrix
from deliverylab.brokers import registry
from deliverylab.engine.clock import FakeClock
from deliverylab.engine.errors import InvalidInput
from deliverylab.engine.faults import Faults

THREE = ("at-most-once", "at-least-once", "idempotent")
COUNTS = ["orders", "correct", "lost", "duplicated", "extra_applications", "dead_lettered",
          "deliveries"]
FAST = ("sqlite", "postgresql")
REALTIME = beyond.REMOTE  # the registry's engines, each on a server of its own


def engine_params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in REALTIME else n for n in names]


def chapter_1(orders: int, seed: int, faults: Faults) -> pd.DataFrame:
    return chapter_1_matrix(orders=orders, faults=faults, seed=seed,
                            modes=beyond.MODES).set_index("mode")


@pytest.mark.parametrize("engine", engine_params(beyond.ENGINES))
def test_every_engine_gives_chapter_1s_counts_for_the_same_orders_and_faults(engine):
    seeds = (beyond.CHAPTER_SEED, 7) if engine in FAST else (beyond.CHAPTER_SEED,)
    orders = 80 if engine in FAST else 40
    for seed in seeds:
        faults = Faults(seed=seed, ack_fail=0.2, crash_after_receive=0.1,
                        crash_after_commit=0.05)
        got = beyond.guarantee_matrix([engine], orders=orders, faults=faults, seed=seed)
        got = got.set_index("mode")
        want = chapter_1(orders, seed, faults)
        for mode in THREE:
            assert [int(got.loc[mode, c]) for c in COUNTS] == \
                [int(want.loc[mode, c]) for c in COUNTS], (engine, seed, mode)
        # The pattern the chapter reads off the table, and that the faults did fire.
        assert got.loc["at-most-once", "lost"] > 0
        assert got.loc["at-most-once", "duplicated"] == 0
        assert got.loc["at-least-once", "duplicated"] > 0
        assert got.loc["at-least-once", "lost"] == 0
        assert got.loc["idempotent", "correct"] == orders
        assert got.loc["idempotent", "verdict"].startswith(f"OK: all {orders} orders")
        assert got.loc["idempotent", "deliveries"] == got.loc["at-least-once", "deliveries"]
        assert got.loc["idempotent", "deliveries"] > orders


@pytest.mark.parametrize("engine", engine_params(beyond.ENGINES))
def test_transactional_runs_only_where_the_broker_is_the_stores_database(engine):
    table = beyond.guarantee_matrix([engine], orders=20, modes=["transactional"])
    row = table.iloc[0]
    if engine in FAST:
        assert row["correct"] == 20 and row["verdict"].startswith("OK: all 20 orders")
    else:
        assert pd.isna(row["correct"]) and pd.isna(row["deliveries"])
        assert row["verdict"] == ("refused: the ACK is a write in another system, so it"
                                  " cannot commit in the effect's transaction")


@pytest.fixture(scope="module")
def probes() -> dict[str, pd.Series]:
    table = beyond.real_systems(FAST)
    return {name: table.loc[name] for name in FAST}


@pytest.fixture(scope="module")
def remote_probes() -> dict[str, pd.Series]:
    table = beyond.real_systems(REALTIME)
    return {name: table.loc[name] for name in REALTIME}


def check_probe(name: str, row: pd.Series) -> None:
    assert row["redelivered after a lost ACK"] is True or row["redelivered after a lost ACK"]
    assert row["delivery count: first, redelivery"] == "1, 2"
    assert bool(row["transactional mode"]) is (name in FAST)
    assert row["deliveries before dead letter"] == 3  # max_receives=3
    assert bool(row["dead-lettered"])
    assert row["redriven"] == 1 and row["delivery count after redrive"] == 1
    if name in REALTIME and registry.capabilities(name).dedup_window is not None:
        assert row["messages from two sends"] == 1
        assert row["dedup window (s)"] > 0
    else:
        assert row["messages from two sends"] == 2
        assert row["dedup window (s)"] is None


@pytest.mark.parametrize("name", FAST)
def test_the_measured_real_systems_table_on_the_databases(probes, name):
    check_probe(name, probes[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", REALTIME)
def test_the_measured_real_systems_table_on_the_servers(remote_probes, name):
    check_probe(name, remote_probes[name])


@pytest.mark.parametrize("engine", REALTIME)
def test_a_message_whose_lease_ran_out_is_seen_as_queued_until_it_is_received_again(engine):
    """What ``drain`` relies on to run to completion: the broker never says "nothing queued"
    (``next_visible_at`` None) while a message it gave back is on its way back to the queue."""
    with beyond.open_engine(engine) as e:
        for i in range(5):
            e.broker.send(f"evt-{i}", "OrderPlaced", {"orderId": "o", "itemId": "x", "qty": 1})
            first = e.broker.receive(beyond.LEASE_S, 1)[0]
            e.clock.sleep(first.lease_until - e.clock.now() + 0.05)
            assert e.broker.next_visible_at() is not None
            again = beyond.receive_one(e, timeout=5)
            assert again is not None
            assert (again.event_id, again.delivery_count) == (f"evt-{i}", 2)
            assert e.broker.ack(again)
        assert e.broker.next_visible_at() is None


def test_a_postgres_run_drops_its_schema():
    from deliverylab.engine import store_postgres

    with beyond.open_engine("postgresql") as e:
        url = e.store.url
        assert e.broker.joins(e.store)
    with pytest.raises(InvalidInput, match="init-db"):
        store_postgres.connect(url)


def test_bad_arguments_are_named():
    with pytest.raises(InvalidInput) as bad:
        with beyond.open_engine("kafka"):
            pass
    assert bad.value.field == "engine" and bad.value.value == "kafka"
    with pytest.raises(InvalidInput) as bad:
        beyond.guarantee_matrix(["sqlite", "sqs"], orders=1)
    assert bad.value.field == "engine" and bad.value.value == "sqs"
    with pytest.raises(InvalidInput) as bad:
        with beyond.open_engine("jetstream", clock=FakeClock()):
            pass
    assert bad.value.field == "clock"
    with pytest.raises(InvalidInput) as bad:
        beyond.guarantee_matrix(["sqlite"], orders=1, modes=["exactly-once"])
    assert bad.value.field == "mode"


def test_without_a_server_the_engine_says_how_to_start_it(monkeypatch):
    monkeypatch.setattr(beyond, "POSTGRES", "postgresql://127.0.0.1:1/test")
    with pytest.raises(beyond.EngineUnavailable, match="make services") as gone:
        with beyond.open_engine("postgresql"):
            pass
    assert "127.0.0.1:1" in str(gone.value)


@pytest.mark.slow
def test_the_relay_republishes_and_the_two_defences_hold():
    table = beyond.relay_table(orders=20).set_index(["engine", "mode"])
    for engine in REALTIME:
        for mode in ("at-least-once", "idempotent"):
            row = table.loc[(engine, mode)]
            assert row["publishes"] == 20 + row["relay crashes"] > 20  # every crash republished
    rabbit, nats = table.loc["rabbitmq"], table.loc["jetstream"]
    assert (rabbit["messages received"] == rabbit["publishes"]).all()  # no producer dedup
    assert (nats["messages received"] == 20).all()  # Nats-Msg-Id dropped every repeat
    assert rabbit.loc["at-least-once", "duplicated"] > 0
    assert rabbit.loc["idempotent", "duplicates skipped"] == rabbit.loc["idempotent",
                                                                          "relay crashes"]
    for verdict in (rabbit.loc["idempotent", "verdict"], *nats["verdict"]):
        assert verdict.startswith("OK: all 20 orders")
    # Past the window, JetStream stores the repeats as RabbitMQ does.
    late = beyond.relay_run("jetstream", mode="at-least-once", orders=20, dedup_window=1.0,
                            restart_after=1.5)
    assert late["messages received"] == late["publishes"] > 20
    assert late["duplicated"] == rabbit.loc["at-least-once", "duplicated"]


def test_a_relay_needs_a_broker_outside_the_store():
    with pytest.raises(InvalidInput) as bad:
        beyond.relay_run("sqlite", mode="idempotent")
    assert bad.value.field == "engine"
    with pytest.raises(InvalidInput) as bad:
        with beyond.open_engine("rabbitmq", dedup_window=5.0):
            pass
    assert bad.value.field == "dedup_window"


@pytest.mark.slow
def test_a_cluster_run_keeps_every_order_through_two_leader_kills_and_its_picture_shows_them():
    run = beyond.cluster_demo("idempotent", orders=1000)
    summary = beyond.cluster_summary(run)
    assert summary["leader kills"] == 2 and summary["a new leader each time"]
    assert summary["orders applied at least once"] == 1000
    assert not summary["some orders applied twice"]
    assert summary["verdict"] == "OK: all 1000 orders applied exactly once; projection equals truth"
    fig = beyond.plot_cluster_run(run)
    ax = fig.axes[0]
    vertical = [line for line in ax.lines if len(set(line.get_xdata())) == 1]
    assert sorted(line.get_xdata()[0] for line in vertical) == sorted(k.at for k in run.kills)
    assert len(ax.patches) == len(run.kills)  # one shaded publish pause per kill
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"received", "applied", "leader SIGKILLed", "publishing paused"} <= labels


ROOT = PurePosixPath(__file__).parents[2]
PAGE = "chapters/07_beyond_one_machine.ipynb"


def test_the_book_does_not_execute_the_page_and_the_page_carries_its_outputs():
    from jupyter_book.config import get_final_config

    user = yaml.safe_load(open(ROOT / "_config.yml", encoding="utf-8"))
    config = get_final_config(user_yaml=user, cli_config={"latex_individualpages": False},
                              sourcedir=str(ROOT))[0]
    assert any(PurePosixPath(ROOT / PAGE).match(p) for p in config["nb_execution_excludepatterns"])
    nb = nbformat.read(ROOT / PAGE, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs for c in code if "import" not in c.source)
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
