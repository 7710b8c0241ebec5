-- deliverylab schema. Every table is STRICT; every time is seconds from the injected clock.
-- Loaded by db.init_db(); safe to run again on an existing file.

-- The source of truth: one row per order, written in the same transaction as its event.
CREATE TABLE IF NOT EXISTS orders (
    order_id        TEXT PRIMARY KEY,
    item_id         TEXT NOT NULL,
    qty             INTEGER NOT NULL CHECK (qty >= 1),
    event_id        TEXT NOT NULL UNIQUE,
    idempotency_key TEXT UNIQUE,
    request_hash    TEXT NOT NULL,
    created_at      REAL NOT NULL
) STRICT;

-- The queue. A message is visible when visible_at <= now; receiving it moves visible_at to
-- the end of its lease, so one index serves the claim (see queue.Queue.receive).
CREATE TABLE IF NOT EXISTS queue_messages (
    seq            INTEGER PRIMARY KEY,
    message_id     TEXT NOT NULL UNIQUE,
    event_id       TEXT NOT NULL,
    type           TEXT NOT NULL,
    payload        TEXT NOT NULL,
    correlation_id TEXT,
    visible_at     REAL NOT NULL,
    lease_until    REAL,
    receipt        TEXT,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT,
    created_at     REAL NOT NULL
) STRICT;
-- The claim's ORDER BY visible_at, seq: seq is the rowid, which every index carries last.
CREATE INDEX IF NOT EXISTS queue_messages_visible ON queue_messages (visible_at);

-- The inbox: a tracking record per (consumer, event), written in the effect's transaction.
CREATE TABLE IF NOT EXISTS inbox_processed (
    consumer     TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    processed_at REAL NOT NULL,
    PRIMARY KEY (consumer, event_id)
) STRICT;

-- The read model the worker maintains.
CREATE TABLE IF NOT EXISTS inventory_projection (
    item_id      TEXT PRIMARY KEY,
    reserved_qty INTEGER NOT NULL
) STRICT;

-- Messages that used up their receives, with the last error; redrive moves them back.
CREATE TABLE IF NOT EXISTS dead_letters (
    message_id     TEXT PRIMARY KEY,
    event_id       TEXT NOT NULL,
    type           TEXT NOT NULL,
    payload        TEXT NOT NULL,
    correlation_id TEXT,
    delivery_count INTEGER NOT NULL,
    last_error     TEXT,
    created_at     REAL NOT NULL,
    dead_at        REAL NOT NULL
) STRICT;

-- The trace: one row per thing that happened to a delivery, appended in the same
-- transaction as the thing itself where there is one.
CREATE TABLE IF NOT EXISTS delivery_log (
    seq            INTEGER PRIMARY KEY,
    at             REAL NOT NULL,
    worker         TEXT NOT NULL,
    correlation_id TEXT,
    event_id       TEXT NOT NULL,
    message_id     TEXT,
    delivery_count INTEGER NOT NULL,
    outcome        TEXT NOT NULL,
    detail         TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX IF NOT EXISTS delivery_log_event ON delivery_log (event_id, seq);
CREATE INDEX IF NOT EXISTS delivery_log_correlation ON delivery_log (correlation_id, seq);
