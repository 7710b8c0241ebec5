"""What the command prints is one line per line, whatever the database holds.

Ids written straight into the file with SQL (as an old version, another program or a careless
hand could) carry a newline that would forge a log line, ANSI and 8-bit CSI escapes a terminal
would obey, a Unicode line separator and DEL. Every command that prints them is run as a real
process, and its stdout is checked byte by byte: valid UTF-8, and no character a terminal
could act on except the newline that ends each line.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deliverylab.engine import store
from deliverylab.engine.display import safe_json, safe_text

SRC = Path(__file__).resolve().parents[2] / "src"
FORGED = "\n[worker-9] 00:00:00.000 event=evt-x order=o-x delivery=1 acked"
ORDER = "o-1" + FORGED + "\x1b[2J\x9b31m\u2028\x7f"
ITEM = "tea\x1b]0;pwned\x07\r"
EVENT = "evt-1\x1b[1A"
MESSAGE = "msg-1\n"
DEAD_ORDER = "o-2\x1b[31m"
DEAD_EVENT = "evt-2\n"
ERROR = "boom\n[worker-9] forged line\x1b[0m"


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_RATE") and k not in ("DELIVERYLAB_DB", "DELIVERYLAB_URL")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def deliverylab(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "deliverylab", *args], env=child_env(),
                          capture_output=True, timeout=60)


def assert_clean(out: bytes) -> list[str]:
    """stdout is UTF-8 with no character a terminal acts on but the newline; its lines."""
    text = out.decode("utf-8")  # strict: a lone surrogate or a stray byte fails here
    bad = sorted({ch for ch in text if ch != "\n" and not ch.isprintable()})
    assert not bad, f"raw control characters {bad!r} in:\n{text}"
    return text.splitlines()


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A lab database whose ids and errors hold control characters, written with plain SQL."""
    path = tmp_path / "app.db"
    conn = store.init_db(path)
    payload = json.dumps({"itemId": ITEM, "qty": 2})
    conn.executescript("BEGIN")
    conn.execute("INSERT INTO orders VALUES (?, ?, 2, ?, NULL, 'h', 1.0)", (ORDER, ITEM, EVENT))
    conn.execute("INSERT INTO queue_messages (message_id, event_id, type, payload,"
                 " correlation_id, visible_at, delivery_count, created_at)"
                 " VALUES (?, ?, 'OrderPlaced', ?, ?, 0, 0, 1.0)", (MESSAGE, EVENT, payload, ORDER))
    conn.execute("INSERT INTO orders VALUES (?, ?, 1, ?, NULL, 'h', 1.0)",
                 (DEAD_ORDER, ITEM, DEAD_EVENT))
    conn.execute("INSERT INTO dead_letters VALUES ('dead\x1b[5m', ?, 'OrderPlaced', ?, ?, 3, ?,"
                 " 1.0, 2.0)", (DEAD_EVENT, json.dumps({"itemId": ITEM, "qty": 1}), DEAD_ORDER,
                                ERROR))
    conn.execute("INSERT INTO delivery_log (at, worker, correlation_id, event_id, message_id,"
                 " delivery_count, outcome, detail) VALUES (1.5, ?, ?, ?, 'dead\x1b[5m', 3,"
                 " 'dead_lettered', ?)", ("w\n[x]", DEAD_ORDER, DEAD_EVENT, ERROR))
    conn.execute("INSERT INTO inventory_projection VALUES (?, 7)", (ITEM,))
    conn.execute("COMMIT")
    conn.close()
    return path


def test_safe_text_escapes_what_repr_escapes_and_nothing_else() -> None:
    assert safe_text("o-1\n\x1b[2J\x9b\u2028\x7f\udcff") == "o-1\\n\\x1b[2J\\x9b\\u2028\\x7f\\udcff"
    assert safe_text("café 東京 🚚 a\\b") == "café 東京 🚚 a\\b"
    for value in (ORDER, ITEM, ERROR, "\U000e0001", {"k": [ORDER, "\udcff"]}):
        assert json.loads(safe_json(value)) == value
        assert safe_json(value).isprintable() and safe_text(value).isprintable()


def test_status_prints_hostile_ids_escaped(hostile: Path) -> None:
    done = deliverylab("status", "--db", str(hostile))
    assert done.returncode == 0, done.stderr
    lines = assert_clean(done.stdout)
    text = "\n".join(lines)
    assert safe_text(ITEM) in text and safe_text(ERROR) in text
    assert not any(line.startswith("[worker-9]") for line in lines)
    as_json = deliverylab("status", "--json", "--db", str(hostile))
    assert as_json.returncode == 0, as_json.stderr
    (line,) = assert_clean(as_json.stdout)
    report = json.loads(line)  # escaped, yet the same values
    assert report["deadLetters"][0]["lastError"] == ERROR
    assert {i["itemId"] for i in report["items"]} == {ITEM}


@pytest.mark.parametrize("ref", [ORDER, EVENT, DEAD_ORDER], ids=["order", "event", "dead"])
def test_trace_prints_hostile_ids_escaped(hostile: Path, ref: str) -> None:
    done = deliverylab("trace", ref, "--db", str(hostile))
    assert done.returncode == 0, done.stderr
    lines = assert_clean(done.stdout)
    assert lines[0].startswith("order " + safe_text(ref if ref != EVENT else ORDER))
    as_json = deliverylab("trace", ref, "--json", "--db", str(hostile))
    (line,) = assert_clean(as_json.stdout)
    assert json.loads(line)["order"]["itemId"] == ITEM


def test_reconcile_redrive_and_drop_print_hostile_ids_escaped(hostile: Path) -> None:
    dry = deliverylab("reconcile", "--dry-run", "--db", str(hostile))
    assert dry.returncode == 0, dry.stderr
    assert safe_text(ORDER) in "\n".join(assert_clean(dry.stdout))
    dropped = deliverylab("drop", ORDER, "--db", str(hostile))
    assert dropped.returncode == 0, dropped.stderr
    assert safe_text(MESSAGE) in assert_clean(dropped.stdout)[0]
    redriven = deliverylab("redrive", "--db", str(hostile))
    assert redriven.returncode == 0, redriven.stderr
    assert_clean(redriven.stdout)
    repaired = deliverylab("reconcile", "--db", str(hostile))
    assert repaired.returncode == 0, repaired.stderr
    assert_clean(repaired.stdout)


def test_a_worker_prints_one_line_per_step_whatever_the_ids(hostile: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "deliverylab", "worker", "--db", str(hostile),
                             "--name", "w-1", "--poll-interval", "0.05"], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            conn = sqlite3.connect(hostile)
            left = conn.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
            conn.close()
            if left == 0:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, err
    lines = assert_clean(out)
    assert all(line.startswith("[w-1] ") for line in lines), lines
    steps = [line for line in lines if f"event={safe_text(EVENT)} order={safe_text(ORDER)}" in line]
    assert [s.rsplit(" ", 1)[-1] for s in steps][-1] == "acked"
    assert any("applied projection" in s for s in steps)
