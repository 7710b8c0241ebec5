"""The claims the chapters make about other systems, held to what their sources say.

Each test names the claim, the source the chapter cites for it, and what the text must (and
must not) say, so a later edit cannot bring the overreaching version back:

1. the spot-the-bug summary gives bug 6's fix as the rebuild plus the repair fence
   (``reconciled_events``) in one transaction, not inbox rows;
2. two-phase commit is absent from the brokers the course names, not from brokers in general
   (IBM MQ and ActiveMQ Artemis take part in XA; Kafka's KIP-939 is in progress);
3. two-phase commit is not the only way to tie the ACK to the effect (the ACK in the effect's
   transaction; the offset stored with the output; Paxos Commit);
4. Kafka's idempotent producer is the default from 3.0.1, 3.1.1 and 3.2.0 when nothing
   conflicts, not "since 3.0" (KAFKA-13598), and Kafka Connect turns it off (KAFKA-13759);
5. KIP-890 shipped in Kafka 4.0 as transaction protocol version 2, with 4.0 clients;
6. per-key ordering holds only until a timeout hands the key to another consumer (SQS FIFO
   visibility timeout, Kafka zombies), and share groups drop one consumer per partition;
7. FLP is not the source of "a crashed process cannot be told from a slow one"; failure
   detectors (Chandra and Toueg), leases and fencing tokens are cited;
8. RabbitMQ's quorum queues count deliveries differently by version (3.10, 4.0, 4.3);
9. the repair fence holds for any interleaving because of SQLite's BEGIN IMMEDIATE and, on
   PostgreSQL, the repair's LOCK TABLE, and the race without the lock is shown on the server;
10. ``Idempotent-Replayed`` is Stripe's convention, not the IETF draft's;
11. SQS FIFO queues reset a message's enqueue timestamp on its move to the dead-letter queue;
12. Raft promises safety, not an election time;
13. the intro's chapter map lists every chapter, and the takeaways cover every chapter;
16. chapter 2's explanations sit beside the demonstrations they explain;
17. "fence" and "outbox" have one name per meaning in the glossary and in the chapters.

(14, the time estimates, is held in ``test_time_estimates.py``; 15, the panel's counters, in
``test_lost_ack_halves_claims.py``.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


def notebook(name: str) -> list[dict]:
    return json.loads((ROOT / "chapters" / name).read_text(encoding="utf-8"))["cells"]


def prose(name: str, *, exercises: bool = False) -> str:
    """A chapter's markdown; without the exercise cells unless asked (their owner words them)."""
    return "\n".join("".join(c["source"]) for c in notebook(name)
                     if c["cell_type"] == "markdown"
                     and (exercises or not c["id"].startswith("ex")))


def flat(text: str) -> str:
    return " ".join(text.split())


def page(path: str) -> str:
    return flat((ROOT / path).read_text(encoding="utf-8"))


# 1 ------------------------------------------------------------------------------------------

def test_bug_6s_fix_is_the_repair_fence_in_the_rebuilds_transaction():
    table = next("".join(c["source"]) for c in notebook("03a_spot_the_bug.ipynb")
                 if c["id"] == "bugs-at-a-glance")
    row = next(line for line in table.splitlines() if line.startswith("| rebuild while"))
    assert "reconciled_events" in row and "one transaction" in row
    assert "rebuild and inbox rows in one transaction" not in row


# 2, 3 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["01_guarantees.ipynb", "02_ack_loss.ipynb"])
def test_two_phase_commit_is_scoped_to_the_brokers_the_course_names(name):
    text = flat(prose(name))
    assert "which brokers do not offer" not in text and "brokers do not offer it" not in text
    for named in ("IBM MQ", "ActiveMQ Artemis", "KIP-939"):
        assert named in text, (name, named)
    assert "ibm.com/docs" in text and "activemq.apache.org" in text


def test_chapter_1_names_more_than_one_way_to_tie_the_ack_to_the_effect():
    text = flat(prose("01_guarantees.ipynb"))
    assert "the one protocol that ties the ACK to the effect" not in text
    assert "Paxos Commit" in text and "gray2006paxoscommit" in text
    assert "stores its position (its offset, Kafka's ACK) together with its output" in text
    assert "`transactional` mode" in text


# 4, 5 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["01_guarantees.ipynb", "02_ack_loss.ipynb",
                                  "07_beyond_one_machine.ipynb"])
def test_the_idempotent_producer_default_is_stated_with_its_versions(name):
    text = flat(prose(name))
    assert not re.search(r"on by default since (Kafka )?3\.0\b", text)
    for piece in ("3.0.1", "3.1.1", "3.2.0", "KAFKA-13598", "KAFKA-13759"):
        assert piece in text, (name, piece)


@pytest.mark.parametrize("name", ["01_guarantees.ipynb", "02_ack_loss.ipynb",
                                  "07_beyond_one_machine.ipynb"])
def test_kip_890_is_a_shipped_protocol_version_not_a_fix_under_way(name):
    text = flat(prose(name))
    assert "fix under way" not in text and "meant to close it" not in text
    assert "transaction.version=2" in text and "Kafka 4.0" in text
    assert "kafka.apache.org/40/operations/transaction-protocol" in text


# 6, 11 ---------------------------------------------------------------------------------------

def test_per_key_ordering_says_where_it_breaks():
    text = flat(prose("06_beyond_the_inbox.ipynb"))
    assert "the three stories above cannot happen" not in text
    assert "consumed by exactly one consumer at a time" not in text
    assert "unblocks when the in-flight message's visibility timeout expires" in text
    assert "zombie" in text and "KIP-447" in text and "KIP-932" in text


def test_sqs_retention_is_split_by_queue_type():
    text = flat(prose("06_beyond_the_inbox.ipynb"))
    assert "In SQS a message's retention runs from its original enqueue time" not in text
    assert "in a FIFO queue the enqueue timestamp is reset when the message moves to the" \
           " dead-letter queue" in text


# 7, 12 ---------------------------------------------------------------------------------------

def test_flp_is_cited_for_what_it_proves_and_failure_detectors_for_the_rest():
    text = flat(prose("02_ack_loss.ipynb"))
    assert "is not a theorem but the premise of the asynchronous model" in text
    for key in ("fischer1985flp", "chandra1996unreliable", "gray1989leases",
                "kleppmann2016locking"):
        assert key in text, key
    reading = page("reference/further_reading.md")
    assert "says why, without bounds on timing, a crashed process cannot be told" not in reading
    assert "chandra1996unreliable" in reading


def test_raft_promises_safety_not_an_election_time():
    text = flat(prose("07_beyond_one_machine.ipynb"))
    assert "is what Raft promises" not in text
    assert "ongaro2014raft" in text and "not a promise of Raft's" in text


# 8 -------------------------------------------------------------------------------------------

def test_rabbitmq_delivery_counting_is_given_by_version():
    text = flat(prose("03_toolkit.ipynb"))
    assert "count deliveries the same way" not in text
    for piece in ("3.10", "RabbitMQ 4.0 made a limit of 20 the default", "RabbitMQ 4.3",
                  "x-acquired-count", "basic.nack", "rabbitmq-server/releases/tag/v4.0.1",
                  "docs/3.13/quorum-queues"):
        assert piece in text, piece


# 9 -------------------------------------------------------------------------------------------

def test_the_any_interleaving_claim_names_the_locks_it_rests_on():
    text = flat(prose("05_reconciliation.ipynb"))
    i = text.index("holds for any interleaving")
    claim = text[i:i + 700]
    assert "BEGIN IMMEDIATE" in claim and "LOCK TABLE reconciled_events" in claim
    assert "pg-repair-lock" in claim
    pg = flat(prose("03b_postgres.ipynb"))
    assert "the repair run on PostgreSQL unchanged" not in pg
    assert "(pg-repair-lock)=" in prose("03b_postgres.ipynb")
    assert "LOCK TABLE reconciled_events IN ACCESS EXCLUSIVE MODE" in pg


def test_the_repair_race_without_the_lock_counts_an_order_twice_on_postgres():
    from deliverylab.book import pgdemo

    try:
        with_lock, without = pgdemo.repair_race(lock=True), pgdemo.repair_race(lock=False)
    except pgdemo.PostgresUnavailable as exc:  # the servers run wherever the tests do
        pytest.fail(str(exc))
    assert with_lock["the repair waited for the worker"] is True
    assert with_lock["projection"] == with_lock["truth"]
    assert with_lock["verdict"].startswith("OK (repaired)")
    assert without["the repair waited for the worker"] is False
    assert without["projection"] - without["truth"] == 2  # o-002's quantity, counted twice
    assert without["verdict"].startswith("BROKEN: 1 duplicated (+1 extra)")
    saved = next(c for c in notebook("03b_postgres.ipynb") if c["id"] == "pg-repair-race")
    shown = "".join(saved["outputs"][0]["data"]["text/plain"])
    assert with_lock["verdict"] in flat(shown) or with_lock["verdict"][:40] in shown
    assert without["verdict"][:40] in shown


def test_the_demonstration_drops_the_lock_and_nothing_else():
    from deliverylab.book.pgdemo import _WithoutLock

    class Conn:
        dialect = "postgresql"

        def __init__(self) -> None:
            self.ran: list[str] = []

        def execute(self, sql, *args):
            self.ran.append(sql)

    conn = Conn()
    proxy = _WithoutLock(conn)  # type: ignore[arg-type]
    proxy.execute("LOCK TABLE reconciled_events IN ACCESS EXCLUSIVE MODE")
    proxy.execute("DELETE FROM inventory_projection")
    assert conn.ran == ["DELETE FROM inventory_projection"]
    assert proxy.dropped == ["LOCK TABLE reconciled_events IN ACCESS EXCLUSIVE MODE"]
    assert proxy.dialect == "postgresql"


# 10 ------------------------------------------------------------------------------------------

def test_the_replay_header_is_stripes_not_the_drafts():
    text = flat(prose("03_toolkit.ipynb"))
    assert "marked only by an `Idempotent-Replayed: true` header" not in text
    assert "The draft defines no way to mark a response as a replay" in text
    assert "convention of Stripe's API" in text


# 13 ------------------------------------------------------------------------------------------

def test_the_intro_maps_every_chapter_and_the_takeaways_cover_every_chapter():
    intro = (ROOT / "intro.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\(chapters/([0-9a-z_]+\.ipynb)\)", intro))
    assert linked == {p.name for p in CHAPTERS}
    takeaways = (ROOT / "reference" / "takeaways.md").read_text(encoding="utf-8")
    docs = set(re.findall(r"\{doc\}`\.\./chapters/([0-9a-z_]+)`", takeaways))
    main = {p.stem for p in CHAPTERS if re.fullmatch(r"0\d_[a-z_]+", p.stem)}
    assert main <= docs, main - docs


# 16 ------------------------------------------------------------------------------------------

def test_chapter_2_explains_each_demonstration_beside_it():
    ids = [c["id"] for c in notebook("02_ack_loss.ipynb")]
    # The email demo, then what it shows.
    assert ids.index("email-demo-why") == ids.index("e5320832") + 1
    why = "".join(next(c for c in notebook("02_ack_loss.ipynb")
                       if c["id"] == "email-demo-why")["source"])
    assert why.startswith("The database is exactly right")
    # The transactional swimlane, then what it shows, then the refusal demo.
    assert ids.index("b553d0ef") == ids.index("4eaab2ae") + 1
    assert ids.index("exactly-once-broker-apart") == ids.index("b553d0ef") + 1
    assert "exactly-once-broker-apart-back" not in ids


# 17 ------------------------------------------------------------------------------------------

def glossary_entries() -> set[str]:
    text = (ROOT / "reference" / "glossary.md").read_text(encoding="utf-8")
    block = text.split("```{glossary}", 1)[1].split("\n```", 1)[0]
    return {line.strip() for line in block.splitlines()
            if line.strip() and not line.startswith((" ", "\t"))}


def test_every_meaning_of_fence_and_outbox_has_its_own_name():
    entries = glossary_entries()
    assert {"receipt check", "repair fence", "fencing", "queue-table outbox", "relayed outbox",
            "outbound outbox", "transactional outbox"} <= entries
    glossary = page("reference/glossary.md")
    for names in ("*receipt check* (for the ACK), the *repair fence* (`reconciled_events`) and"
                  " *fencing* in general",
                  "the *queue-table outbox*, the *relayed outbox* and the *outbound outbox*"):
        assert names in glossary


@pytest.mark.parametrize("chapter", [p.name for p in CHAPTERS])
def test_the_chapters_use_one_name_per_meaning(chapter):
    text = prose(chapter)
    # The bare words link only to their disambiguation entries, once each, where a chapter
    # introduces a second meaning: "fence" in chapter 3, "outbox" in chapter 6.
    bare = re.findall(r"\{term\}`(fence|outbox)`", text)
    want = {"03_toolkit.ipynb": ["fence"], "06_beyond_the_inbox.ipynb": ["outbox"]}
    assert bare == want.get(chapter, []), bare
    # reconciled_events is "the repair fence", never "the fence" alone.
    assert not re.search(r"\b[Tt]he fence\b", text), chapter
    assert "outbox relay" not in text
