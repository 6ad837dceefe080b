-- TradeWatch schema: the one definition of every table. Idempotent: applied at every start.

-- Every valid trade, exactly once (trade_id is the idempotency key).
CREATE TABLE IF NOT EXISTS trades (
    trade_id          text PRIMARY KEY,
    symbol            text NOT NULL,
    ts                timestamptz NOT NULL,          -- event time (the trade's own timestamp)
    price             double precision NOT NULL,
    quantity          double precision NOT NULL,
    side              text NOT NULL,                 -- buy | sell | unknown
    exchange          text NOT NULL,
    bid               double precision,
    ask               double precision,
    condition         text,                          -- sale-condition code of recorded data
    schema_version    smallint NOT NULL,
    injected_anomaly  text,                          -- simulator ground truth; detectors never read it
    kafka_partition   integer,
    kafka_offset      bigint,
    ingested_at       timestamptz NOT NULL DEFAULT now(),
    -- written by anomaly_detector.py
    is_anomaly        boolean NOT NULL DEFAULT false,
    anomaly_types     text[],
    anomaly_score     double precision,
    anomaly_severity  text,
    detector_version  text
);
CREATE INDEX IF NOT EXISTS trades_symbol_ts ON trades (symbol, ts);
CREATE INDEX IF NOT EXISTS trades_ts ON trades (ts);

-- Every message that is not a valid trade, with the raw bytes and the reason.
CREATE TABLE IF NOT EXISTS dead_letters (
    id               bigserial PRIMARY KEY,
    received_at      timestamptz NOT NULL DEFAULT now(),
    topic            text NOT NULL,
    kafka_partition  integer NOT NULL,
    kafka_offset     bigint NOT NULL,
    message_key      bytea,
    raw              bytea,
    reason           text NOT NULL,
    UNIQUE (topic, kafka_partition, kafka_offset)
);
