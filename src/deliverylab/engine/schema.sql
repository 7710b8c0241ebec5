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

-- Every Idempotency-Key a request carried: the fingerprint of that whole request (order id,
-- item, qty) and the order it was answered with, written in the request's transaction. A key
-- that replayed an existing order is recorded too (created = 0), so it can never be bound to
-- another request later. WITHOUT ROWID: looked up by key only.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key          TEXT PRIMARY KEY,
    request_hash TEXT NOT NULL,
    order_id     TEXT NOT NULL,
    created      INTEGER NOT NULL CHECK (created IN (0, 1)),
    created_at   REAL NOT NULL
) STRICT, WITHOUT ROWID;

-- The queue. A message is visible when visible_at <= now; receiving it moves visible_at to
-- the end of its lease, so one index serves the claim (see queue.Queue.receive). ack, extend
-- and nack find a message by seq, its rowid, and act only while its receipt matches. The
-- message id is for people and is not indexed: every index is one more page for each send
-- and each ack to write. AUTOINCREMENT: a deleted message's seq is never handed out again.
CREATE TABLE IF NOT EXISTS queue_messages (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id     TEXT NOT NULL,
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
-- WITHOUT ROWID: the row lives in its primary key's b-tree, so an insert writes one b-tree,
-- not a table and an index.
CREATE TABLE IF NOT EXISTS inbox_processed (
    consumer     TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    processed_at REAL NOT NULL,
    PRIMARY KEY (consumer, event_id)
) STRICT, WITHOUT ROWID;

-- The fence: the events a repair counted when it rebuilt a consumer's projection from the
-- orders, written in the repair's transaction. Every worker mode reads it inside its effect's
-- transaction and does not apply a fenced event again (see reconcile.py). WITHOUT ROWID, as
-- the inbox: the worker's lookup is one b-tree probe.
CREATE TABLE IF NOT EXISTS reconciled_events (
    consumer      TEXT NOT NULL,
    event_id      TEXT NOT NULL,
    reconciled_at REAL NOT NULL,
    PRIMARY KEY (consumer, event_id)
) STRICT, WITHOUT ROWID;

-- The read model the worker maintains.
CREATE TABLE IF NOT EXISTS inventory_projection (
    item_id      TEXT PRIMARY KEY,
    reserved_qty INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

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
-- transaction as the thing itself where there is one. Each of a worker's three commits per
-- message appends a row here, so the table has no secondary index: an index by event or by
-- order would add a page to every one of those commits. Following one order reads the whole
-- table instead (milliseconds at a lab's size, about 0.1 s at 300,000 rows).
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

-- The outbox, for a broker outside the store (another database, RabbitMQ, JetStream): an
-- order and its event cannot commit together there, so place_order writes the event here, in
-- the order's transaction, and sends nothing. The relay (relay.py) publishes each unsent row
-- in outbox_seq order, then marks it sent_at; attempts counts the times a relay took the row
-- to publish it, so above 1 the row may have been published more than once. With the broker in
-- the store's own database the queue table is the outbox and this table stays empty. A file
-- made before this table still serves a lab; the relay, and an API over an external broker,
-- ask for 'deliverylab init-db', which adds it.
CREATE TABLE IF NOT EXISTS outbox (
    outbox_seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT NOT NULL UNIQUE,
    type           TEXT NOT NULL,
    payload        TEXT NOT NULL,
    correlation_id TEXT,
    created_at     REAL NOT NULL,
    sent_at        REAL,
    attempts       INTEGER NOT NULL DEFAULT 0
) STRICT;
-- The relay reads the unsent rows, oldest first: a partial index holds only those, so its
-- cost does not grow with the rows already sent.
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (outbox_seq) WHERE sent_at IS NULL;
