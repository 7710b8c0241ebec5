"""Chapter 8, "A protocol that says exactly once": MQTT's QoS 0, 1 and 2 on Mosquitto, with a
subscriber process SIGKILLed between the protocol's steps.

MQTT 3.1.1 delivers a message from the broker to a subscriber in one of three exchanges:
QoS 0 is PUBLISH alone (at most once); QoS 1 is PUBLISH, then PUBACK (at least once: the
broker resends until acknowledged); QoS 2 is PUBLISH, PUBREC, PUBREL, PUBCOMP ("exactly
once": the receiver stores the packet id at PUBREC and hands the message on once). paho-mqtt
hands a QoS 2 message to the application when PUBREL arrives, then sends PUBCOMP.

The exchange is between two protocol endpoints, per hop. The *effect* here is a row in the
subscriber's SQLite database. The subscriber process (``python -m deliverylab.book.mqtt``)
kills itself with SIGKILL at one of three points, and a second process with the same client
id takes over:

* ``on PUBLISH``: the message arrived, nothing was acknowledged;
* ``on PUBREL`` (QoS 2): PUBREC went out, the broker answered PUBREL, the message was not yet
  handed on;
* ``after the effect``: the effect committed, PUBACK or PUBCOMP not sent.

A session survives the process only with ``clean_session=False``; paho keeps the QoS 2
packet ids it has received in memory only, so its *stored in-flight state* here is a table
the subscriber writes at PUBLISH and clears after PUBCOMP, as a persistent client would. The
inbox is an ``event_id`` row written in the effect's transaction.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

HOST = os.environ.get("DELIVERYLAB_MQTT_HOST", "127.0.0.1")
PORT = int(os.environ.get("DELIVERYLAB_MQTT_PORT", "1883"))
KILL_POINTS = ("none", "on PUBLISH", "on PUBREL", "after the effect")
SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inbox (event_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS inflight (mid INTEGER PRIMARY KEY, topic TEXT, payload BLOB);
"""


def _subscriber(db: str, client_id: str, topic: str, qos: int, clean: bool, kill: str,
                stored: bool, inbox: bool, wait: float) -> None:
    """One subscriber process: subscribe, apply every message, die at ``kill``; print
    ``ready`` once subscribed, leave after ``wait`` quiet seconds."""
    import paho.mqtt.client as mqtt

    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.executescript(SCHEMA)

    def die(point: str) -> None:
        if kill == point:
            os.kill(os.getpid(), signal.SIGKILL)

    class Client(mqtt.Client):  # paho's private steps, wrapped to die between them
        def _handle_publish(self) -> Any:
            die("on PUBLISH")
            rc = super()._handle_publish()
            if stored:  # the QoS 2 packet ids received, kept where a restart finds them
                for mid, m in self._in_messages.items():
                    conn.execute("INSERT OR REPLACE INTO inflight VALUES (?, ?, ?)",
                                 (mid, m.topic, m.payload))
            return rc

        def _handle_pubrel(self) -> Any:
            die("on PUBREL")
            if stored:  # a message PUBREC'd by the process before: hand it on from the table
                mid = int.from_bytes(self._in_packet["packet"][:2], "big")
                row = conn.execute("SELECT topic, payload FROM inflight WHERE mid = ?",
                                   (mid,)).fetchone()
                if row is not None and mid not in self._in_messages:
                    m = mqtt.MQTTMessage(mid, row[0].encode())
                    m.payload, m.qos = row[1], 2
                    self._in_messages[mid] = m
            return super()._handle_pubrel()

        def _send_pubcomp(self, mid: int) -> Any:
            rc = super()._send_pubcomp(mid)
            if stored:
                conn.execute("DELETE FROM inflight WHERE mid = ?", (mid,))
            return rc

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        event = json.loads(msg.payload)["event_id"]
        conn.execute("BEGIN IMMEDIATE")
        fresh = True
        if inbox:
            fresh = conn.execute("INSERT OR IGNORE INTO inbox VALUES (?)", (event,)).rowcount > 0
        if fresh:
            conn.execute("INSERT INTO effects (event_id) VALUES (?)", (event,))
        conn.execute("COMMIT")
        die("after the effect")

    def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        client.subscribe(topic, qos=qos)

    def on_subscribe(*args: Any) -> None:
        print("ready", flush=True)

    client = Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    clean_session=clean, protocol=mqtt.MQTTv311)
    client.on_message, client.on_connect, client.on_subscribe = on_message, on_connect, \
        on_subscribe
    client.connect(HOST, PORT, keepalive=10)
    client.loop_start()
    time.sleep(wait)
    client.disconnect()
    client.loop_stop()


def _publish(topic: str, qos: int, event_id: str) -> None:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"dl-pub-{secrets.token_hex(4)}", protocol=mqtt.MQTTv311)
    client.connect(HOST, PORT)
    client.loop_start()
    client.publish(topic, json.dumps({"event_id": event_id}), qos=qos).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def _forget_session(client_id: str) -> None:
    """End the session the broker keeps for ``client_id`` (a clean connect drops it)."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=True, protocol=mqtt.MQTTv311)
    client.connect(HOST, PORT)
    client.disconnect()


@dataclass(frozen=True)
class Case:
    qos: int
    kill: str
    persistent: bool = True
    stored: bool = False
    inbox: bool = False


def _start(db: Path, cid: str, topic: str, case: Case, kill: str, wait: float
           ) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "deliverylab.book.mqtt", str(db), cid, topic, str(case.qos),
         str(int(not case.persistent)), kill, str(int(case.stored)), str(int(case.inbox)),
         str(wait)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"subscriber did not subscribe: {line!r}"
                           f" {proc.stderr.read() if proc.stderr else ''}")
    return proc


def run_case(case: Case, directory: Path, *, wait: float = 1.0) -> dict[str, Any]:
    """One message through Mosquitto to a subscriber that dies at ``case.kill``; a second
    process with the same client id takes over. How many times the effect happened."""
    if case.qos not in (0, 1, 2):
        from ..engine.errors import InvalidInput

        raise InvalidInput("qos", case.qos, "0, 1 or 2")
    if case.kill not in KILL_POINTS:
        from ..engine.errors import InvalidInput

        raise InvalidInput("kill", case.kill, "one of " + ", ".join(KILL_POINTS))
    token = secrets.token_hex(4)
    cid, topic = f"dl-sub-{token}", f"deliverylab/{token}/orders"
    db = Path(directory) / f"mqtt-{token}.db"
    try:
        first = _start(db, cid, topic, case, case.kill, wait=5.0)
        _publish(topic, case.qos, f"evt-{token}")
        first.wait(timeout=10)
        killed = first.returncode == -signal.SIGKILL
        second = _start(db, cid, topic, case, "none", wait=wait)
        second.wait(timeout=10 + wait)
    finally:
        _forget_session(cid)
    conn = sqlite3.connect(db)
    try:
        effects = conn.execute("SELECT count(*) FROM effects").fetchone()[0]
    finally:
        conn.close()
    return {"QoS": case.qos, "killed": case.kill if killed else "not reached",
            "session": "persistent" if case.persistent else "clean",
            "in-flight state stored": case.stored, "inbox": case.inbox, "effects": effects,
            "end to end": {0: "lost", 1: "once"}.get(effects, "duplicated")}


CASES = (
    Case(0, "on PUBLISH"),
    Case(1, "on PUBLISH"),
    Case(1, "on PUBLISH", persistent=False),
    Case(1, "after the effect"),
    Case(1, "after the effect", inbox=True),
    Case(2, "on PUBLISH"),
    Case(2, "on PUBREL"),
    Case(2, "on PUBREL", persistent=False),
    Case(2, "on PUBREL", stored=True),
    Case(2, "after the effect"),
    Case(2, "after the effect", stored=True),
    Case(2, "after the effect", stored=True, inbox=True),
)


def qos_table(directory: Path, cases: tuple[Case, ...] = CASES) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame([run_case(c, directory) for c in cases])


if __name__ == "__main__":  # one subscriber process of run_case
    a = sys.argv[1:]
    _subscriber(a[0], a[1], a[2], int(a[3]), a[4] == "1", a[5], a[6] == "1", a[7] == "1",
                float(a[8]))
