-- TradeWatch schema: the one definition of every table. Idempotent (applied when it changed, see
-- tradewatch/store/db.py).
--
-- Tables that grow with the feed are partitioned by event time (trades, trade_flags, late_trades,
-- alerts: ts; dead_letters: sent_at, the Kafka time of the message), so retention drops whole
-- partitions (tradewatch/maintain.py) instead of deleting rows. A partition is a day (UTC) — a
-- month for alerts, which are few and kept a year: every query plans over each partition, and 366
-- of them cost more to plan than to read (6 ms at 22 day partitions, 0.7 ms to run) — but a whole year for days more than 400 days before today and in the years after next (a replay of
-- 2013, or a sender spreading trades over decades, makes one partition a year, not one a day),
-- unless that year already has day partitions: at most ~1,100 day partitions, and one per other
-- year. PostgreSQL wants the partition key in every unique key: trades
-- are unique by (trade_id, ts) — a re-delivered trade has the same timestamp, so ON CONFLICT still
-- skips it; a trade re-sent with another timestamp is a second row (`maintain` reports such
-- trade_ids). Partitions are created by tw_ensure_partition(), called by the writers for a day no
-- partition holds and by `maintain` ahead of time.

DROP FUNCTION IF EXISTS tw_ensure_day(text, date);
DROP FUNCTION IF EXISTS tw_ensure_partition(text, date);
-- `unit`: 'day' (<tbl>_pYYYYMMDD) or 'month' (<tbl>_mYYYYMM: the candle tables, alerts); far from
-- today a year (<tbl>_yYYYY) instead. A month that already has day partitions (alerts were kept by
-- day before) goes on by day until it is over.
CREATE OR REPLACE FUNCTION tw_ensure_partition(tbl text, day date, unit text DEFAULT 'day') RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    fine_start date;
    fine text;
    by_day text := tbl || '_p' || to_char(day, 'YYYYMMDD');
    by_year text := tbl || '_y' || to_char(day, 'YYYY');
    year_start date := date_trunc('year', day)::date;
BEGIN
    IF unit = 'month' AND (to_regclass(by_day) IS NOT NULL OR EXISTS (
            SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = to_regclass(tbl) AND starts_with(c.relname, tbl || '_p' || to_char(day, 'YYYYMM')))) THEN
        unit := 'day';
    END IF;
    fine_start := date_trunc(unit, day)::date;
    fine := tbl || CASE unit WHEN 'month' THEN '_m' || to_char(day, 'YYYYMM') ELSE '_p' || to_char(day, 'YYYYMMDD') END;
    IF to_regclass(fine) IS NOT NULL OR to_regclass(by_year) IS NOT NULL THEN
        RETURN;
    END IF;
    -- two writers creating a partition of the same table take turns; the second finds it made
    PERFORM pg_advisory_xact_lock(hashtext('tw_partition:' || tbl));
    IF to_regclass(fine) IS NOT NULL OR to_regclass(by_year) IS NOT NULL THEN
        RETURN;
    END IF;
    -- a year for the days before the last 400 and for the years after next (a wrong clock)
    IF (day < current_date - 400 OR date_part('year', day) > date_part('year', current_date) + 1) AND NOT EXISTS (
            SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = to_regclass(tbl) AND (starts_with(c.relname, tbl || '_p' || to_char(day, 'YYYY'))
                                                      OR starts_with(c.relname, tbl || '_m' || to_char(day, 'YYYY')))) THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)', by_year, tbl,
                       year_start::timestamp AT TIME ZONE 'UTC',
                       (year_start + interval '1 year')::timestamp AT TIME ZONE 'UTC');
    ELSE
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)', fine, tbl,
                       fine_start::timestamp AT TIME ZONE 'UTC',
                       (fine_start + ('1 ' || unit)::interval)::timestamp AT TIME ZONE 'UTC');
    END IF;
EXCEPTION WHEN duplicate_table THEN
    NULL;   -- made meanwhile: a name the lookups above could not see yet (the function's snapshot)
END $$;

-- The candle tables (stock_metrics, indicators) are partitioned by window size first
-- (<tbl>_<size>, e.g. stock_metrics_1m: each size has its own retention), then by month of
-- window_start. Returns the size's table.
CREATE OR REPLACE FUNCTION tw_ensure_size(tbl text, size text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    child text := tbl || '_' || size;
BEGIN
    IF to_regclass(child) IS NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('tw_partition:' || tbl));
        IF to_regclass(child) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES IN (%L) PARTITION BY RANGE (window_start)',
                           child, tbl, size);
        END IF;
    END IF;
    RETURN child;
EXCEPTION WHEN duplicate_table THEN
    RETURN child;
END $$;

-- Rows of `tbl`'s DEFAULT partition (<tbl>_default) move into partitions of their own (made by
-- tw_ensure_partition with `unit`): a partition cannot be created over rows the default holds.
-- Writers wait meanwhile (the whole table is locked for the move: the default is small, it only
-- holds what arrived before its partition existed). Returns the rows moved.
CREATE OR REPLACE FUNCTION tw_adopt_default(tbl text, unit text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    def text := tbl || '_default';
    held boolean;
    d date;
    moved bigint;
BEGIN
    IF to_regclass(def) IS NULL THEN
        RETURN 0;
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I)', def) INTO held;
    IF NOT held THEN
        RETURN 0;
    END IF;
    EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', tbl);
    EXECUTE format('CREATE TEMP TABLE tw_adopting ON COMMIT DROP AS SELECT * FROM %I', def);
    EXECUTE format('TRUNCATE %I', def);
    FOR d IN SELECT DISTINCT date_trunc(unit, window_start AT TIME ZONE 'UTC')::date FROM tw_adopting LOOP
        PERFORM tw_ensure_partition(tbl, d, unit);
    END LOOP;
    EXECUTE format('INSERT INTO %I SELECT * FROM tw_adopting', tbl);
    GET DIAGNOSTICS moved = ROW_COUNT;
    DROP TABLE tw_adopting;
    RETURN moved;
END $$;

-- A database made before partitioning: its plain tables step aside (renamed with their indexes)
-- and are copied into the partitioned ones at the end of this file.
DO $$
DECLARE
    t text;
    idx text;
BEGIN
    FOREACH t IN ARRAY ARRAY['trades', 'trade_flags', 'late_trades', 'alerts', 'dead_letters', 'stock_metrics',
                             'indicators', 'flink_metrics'] LOOP
        IF EXISTS (SELECT 1 FROM pg_class WHERE oid = to_regclass(t) AND relkind = 'r') THEN
            EXECUTE format('ALTER TABLE %I RENAME TO %I', t, t || '_unpartitioned');
            FOR idx IN SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                       WHERE i.indrelid = to_regclass(t || '_unpartitioned') LOOP
                EXECUTE format('ALTER INDEX %I RENAME TO %I', idx, left(idx, 50) || '_unpartitioned');
            END LOOP;
        END IF;
    END LOOP;
END $$;

-- Every valid trade, exactly once (trade_id is the idempotency key).
CREATE TABLE IF NOT EXISTS trades (
    trade_id          text NOT NULL,
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
    PRIMARY KEY (trade_id, ts)
) PARTITION BY RANGE (ts);
CREATE INDEX IF NOT EXISTS trades_symbol_ts ON trades (symbol, ts);
CREATE INDEX IF NOT EXISTS trades_ts ON trades (ts);
-- Rows arrive in ingested_at order, so a BRIN index (a few pages per partition) lets maintain look
-- only at the trades stored since its last pass (see maintain_checks).
CREATE INDEX IF NOT EXISTS trades_ingested ON trades USING brin (ingested_at);

-- The newest stored trade of each symbol (newest by ts, then trade_id), what /latest reads: one
-- row per symbol, so reading it costs the same however many day partitions `trades` has. Kept by
-- the one writer of trades (writer.write_batch, in the inserting transaction: a rolled-back batch
-- leaves no trace); maintain.py deletes the rows whose trade it dropped.
CREATE TABLE IF NOT EXISTS latest_trades (
    symbol    text PRIMARY KEY,
    ts        timestamptz NOT NULL,
    trade_id  text NOT NULL,
    price     double precision NOT NULL,
    quantity  double precision NOT NULL,
    side      text NOT NULL,
    exchange  text NOT NULL
);
-- a statement trigger kept it before: it cost the consumer 8-10 % of its speed
DROP TRIGGER IF EXISTS trades_keep_latest ON trades;
DROP FUNCTION IF EXISTS tw_keep_latest_trades();
-- found again from `trades` (each symbol's newest by a skip scan): for trades stored without
-- write_batch (before the table existed, or a bulk load)
CREATE OR REPLACE FUNCTION tw_refill_latest_trades() RETURNS void LANGUAGE sql AS $$
    DELETE FROM latest_trades;
    WITH RECURSIVE symbols AS (
        (SELECT symbol FROM trades ORDER BY symbol LIMIT 1)
        UNION ALL
        SELECT (SELECT t.symbol FROM trades t WHERE t.symbol > s.symbol ORDER BY t.symbol LIMIT 1)
        FROM symbols s WHERE s.symbol IS NOT NULL)
    INSERT INTO latest_trades (symbol, ts, trade_id, price, quantity, side, exchange)
    SELECT newest.* FROM symbols s CROSS JOIN LATERAL (
        SELECT symbol, ts, trade_id, price, quantity, side, exchange FROM trades t
        WHERE t.symbol = s.symbol ORDER BY ts DESC, trade_id DESC LIMIT 1) AS newest
    WHERE s.symbol IS NOT NULL;
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM latest_trades) AND EXISTS (SELECT 1 FROM trades) THEN
        PERFORM tw_refill_latest_trades();
    END IF;
END $$;

-- A pump-and-dump as it unfolds (tradewatch/detect/pump.py): one row per event, upserted by the
-- detector in its checkpoint as the event goes pump -> peak -> dump -> over. A few rows a day at
-- most (an event re-arms after 10 minutes); maintain drops those older than ALERTS retention.
CREATE TABLE IF NOT EXISTS manipulation_events (
    event_id         text PRIMARY KEY,
    symbol           text NOT NULL,
    state            text NOT NULL,
    started_at       timestamptz NOT NULL,
    start_price      double precision NOT NULL,
    peak_at          timestamptz NOT NULL,
    peak_price       double precision NOT NULL,
    gain_pct         double precision NOT NULL,
    volume_multiple  double precision NOT NULL,
    burst_trades     integer NOT NULL,
    buy_share        double precision,
    dump_depth_pct   double precision,
    dump_seconds     double precision,
    ended_at         timestamptz,
    updated_at       timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS manipulation_events_started ON manipulation_events (started_at DESC);

-- The detector's verdict on a trade: one row per flagged trade, written only by
-- anomaly_detector.py (consumer.py is the only writer of `trades`, so a flag can never fake a
-- stored trade). Readers join it to `trades` on trade_id.
CREATE TABLE IF NOT EXISTS trade_flags (
    trade_id          text NOT NULL,
    symbol            text NOT NULL,
    ts                timestamptz NOT NULL,          -- event time of the trade
    anomaly_types     text[] NOT NULL,
    anomaly_score     double precision NOT NULL,
    anomaly_severity  text NOT NULL,
    detector_version  text NOT NULL,
    flagged_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (trade_id, ts)
) PARTITION BY RANGE (ts);
CREATE INDEX IF NOT EXISTS trade_flags_ts ON trade_flags (ts);
CREATE INDEX IF NOT EXISTS trade_flags_symbol_ts ON trade_flags (symbol, ts);

-- Databases made before trade_flags kept the flags on the trade rows: move them, once.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'trades' AND column_name = 'is_anomaly') THEN
        INSERT INTO trade_flags (trade_id, symbol, ts, anomaly_types, anomaly_score, anomaly_severity, detector_version)
        SELECT trade_id, symbol, ts, anomaly_types, coalesce(anomaly_score, 0), coalesce(anomaly_severity, 'MEDIUM'),
               coalesce(detector_version, 'unknown')
        FROM trades WHERE is_anomaly ON CONFLICT DO NOTHING;
        ALTER TABLE trades DROP COLUMN is_anomaly, DROP COLUMN anomaly_types, DROP COLUMN anomaly_score,
                           DROP COLUMN anomaly_severity, DROP COLUMN detector_version;
    END IF;
END $$;

-- Every message that is not a valid trade, with the raw bytes and the reason.
CREATE TABLE IF NOT EXISTS dead_letters (
    id               bigserial,
    received_at      timestamptz NOT NULL DEFAULT now(),
    -- when the message was sent (its Kafka timestamp; when Kafka gave none, when it was received):
    -- what `consumer.py --replay-dead-letters` measures the clock-skew rule against again
    sent_at          timestamptz NOT NULL,
    topic            text NOT NULL,
    kafka_partition  integer NOT NULL,
    kafka_offset     bigint NOT NULL,
    message_key      bytea,
    raw              bytea,
    reason           text NOT NULL,
    PRIMARY KEY (id, sent_at),
    UNIQUE (topic, kafka_partition, kafka_offset, sent_at)    -- a re-delivered message: same time
) PARTITION BY RANGE (sent_at);
-- `raw` keeps at most the first 64 KiB (writer.RAW_KEPT, four times the largest valid trade):
-- the message's whole size and SHA-256 say what it was
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS raw_bytes integer;
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS raw_sha256 bytea;

-- The order book (the quotes stage, tradewatch/stages/quotes.py; kept RETENTION_DAYS_QUOTES).
-- Top of book over time: a row for each change of a symbol's best bid or ask (price or size), not
-- a sample — what the spread, the trade rules and the book rules read must be exact, and a change
-- at the touch is one message in ten on a busy book. Keyed by the book's own seq, so a message
-- read again after a crash writes nothing new.
CREATE TABLE IF NOT EXISTS quotes (
    symbol           text NOT NULL,
    ts               timestamptz NOT NULL,           -- event time of the message that changed it
    seq              bigint NOT NULL,                -- the book's sequence number after that message
    bid              double precision,               -- NULL: that side is empty
    bid_size         double precision,
    ask              double precision,
    ask_size         double precision,
    PRIMARY KEY (symbol, ts, seq)
) PARTITION BY RANGE (ts);
-- Depth: each symbol's best BOOK_DEPTH levels a side at the first message of every
-- BOOK_SNAPSHOT_SECONDS of event time (on the clock's grid, so a run read again writes the same).
CREATE TABLE IF NOT EXISTS book_snapshots (
    symbol           text NOT NULL,
    ts               timestamptz NOT NULL,
    seq              bigint NOT NULL,
    bids             jsonb NOT NULL,                 -- [[price, size], …] best first
    asks             jsonb NOT NULL,
    PRIMARY KEY (symbol, ts)
) PARTITION BY RANGE (ts);
-- The book of every symbol the quotes stage holds, as of its last checkpoint (in the transaction
-- that stores its position): what /orderbook and /quotes read, and what the stage loads again when
-- it is given the symbol's Kafka partition. A symbol idle for SYMBOL_IDLE_EVICT_SECONDS leaves it.
CREATE TABLE IF NOT EXISTS order_books (
    symbol           text PRIMARY KEY,
    exchange         text NOT NULL,
    kafka_partition  integer NOT NULL,
    ts               timestamptz NOT NULL,
    seq              bigint NOT NULL,
    stale            boolean NOT NULL,               -- a gap since its last snapshot: not to be trusted
    gaps             bigint NOT NULL,                -- sequence gaps seen in this symbol's messages
    bids             jsonb NOT NULL,                 -- every level held, best first
    asks             jsonb NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS order_books_partition ON order_books (kafka_partition);
-- the book watch of the symbol (tradewatch/detect/book_rules.py) and its alert cooldowns, as of
-- the same checkpoint: a restarted stage raises the alerts one that never stopped would
ALTER TABLE order_books ADD COLUMN IF NOT EXISTS watch jsonb;

-- Windowed metrics from aggregator.py: one row per symbol × window size × window start.
CREATE TABLE IF NOT EXISTS stock_metrics (
    symbol           text NOT NULL,
    window_size      text NOT NULL,                 -- '1m', '5m', '15m', '1h', …
    window_start     timestamptz NOT NULL,          -- windows are [window_start, window_end)
    window_end       timestamptz NOT NULL,
    open             double precision,              -- NULL when every trade had an excluded condition
    high             double precision,
    low              double precision,
    close            double precision,
    volume           double precision NOT NULL,     -- sum of quantity
    traded_value     double precision NOT NULL,     -- sum of price × quantity
    vwap             double precision,
    trade_count      bigint NOT NULL,
    avg_price        double precision NOT NULL,
    min_price        double precision NOT NULL,
    max_price        double precision NOT NULL,
    sum_price        double precision NOT NULL,
    avg_quantity     double precision NOT NULL,
    min_quantity     double precision NOT NULL,
    max_quantity     double precision NOT NULL,
    sum_quantity     double precision NOT NULL,
    buy_volume       double precision NOT NULL,
    sell_volume      double precision NOT NULL,
    is_final         boolean NOT NULL,              -- the watermark has passed window_end
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- aggregator state for a restart (where open/close came from, the source partition)
    open_ts_ms       bigint,
    open_seq         bigint,
    close_ts_ms      bigint,
    close_seq        bigint,
    kafka_partition  integer,
    PRIMARY KEY (symbol, window_size, window_start)
) PARTITION BY LIST (window_size);             -- then by month: tw_ensure_size, tw_ensure_partition
CREATE INDEX IF NOT EXISTS stock_metrics_size_start ON stock_metrics (window_size, window_start);
CREATE INDEX IF NOT EXISTS stock_metrics_open_windows ON stock_metrics (kafka_partition) WHERE NOT is_final;

-- Trades the windows left out, kept for audit: `late` = arrived after their window was final
-- (beyond the allowed lateness); `clock_skew` = far ahead of the partition's event time and not
-- confirmed by the next trade (one bad clock, tradewatch/windows.py). Both are in `trades`.
CREATE TABLE IF NOT EXISTS late_trades (
    trade_id      text NOT NULL,
    window_size   text NOT NULL,
    symbol        text NOT NULL,
    ts            timestamptz NOT NULL,
    window_start  timestamptz NOT NULL,
    watermark     timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    reason        text NOT NULL DEFAULT 'late',
    PRIMARY KEY (trade_id, window_size, ts)
) PARTITION BY RANGE (ts);

-- Where a stage that keeps its Kafka position in the database (the aggregator, the detector)
-- resumes each partition, with what it keeps beside the offset (the aggregator: max_event_ms and
-- watermark_ms). Written only by tradewatch/store/positions.py, for the stage runtime, in the same
-- fenced transaction as the stage's rows, so a restart goes on exactly after the last checkpoint.
CREATE TABLE IF NOT EXISTS stage_positions (
    consumer_group  text NOT NULL,                 -- the stage's group (AGGREGATOR_GROUP, DETECTOR_GROUP)
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    stage           text NOT NULL,                 -- aggregator | detector
    next_offset     bigint NOT NULL,
    kept            json NOT NULL DEFAULT '{}',
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, kafka_partition)
);

-- How far maintain.py has checked the trades for a trade_id stored twice with different timestamps:
-- each pass looks only at the trades stored since (ingested_at), not at every stored trade.
CREATE TABLE IF NOT EXISTS maintain_checks (
    name        text PRIMARY KEY,                  -- 'trades_resent'
    checked_to  timestamptz NOT NULL
);

-- Who owns which partition, per consumer group (the stage runtime's fencing, tradewatch/runtime.py):
-- every assignment increments `epoch`; a checkpoint writes only while its epoch is the current one.
CREATE TABLE IF NOT EXISTS partition_owners (
    consumer_group  text NOT NULL,
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    epoch           bigint NOT NULL,
    owner           text NOT NULL,                 -- host:pid of the owning process
    claimed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, kafka_partition)
);
-- The topic's identity (Kafka's topic id) when claimed: a topic deleted and created again under the
-- same name has a new one, and positions stored for the old topic no longer apply.
ALTER TABLE partition_owners ADD COLUMN IF NOT EXISTS topic_id text;

-- Technical indicators over final candles (see tradewatch/indicators.py).
CREATE TABLE IF NOT EXISTS indicators (
    symbol           text NOT NULL,
    window_size      text NOT NULL,
    window_start     timestamptz NOT NULL,
    close            double precision NOT NULL,
    sma_20           double precision,
    sma_50           double precision,
    ema_12           double precision,
    ema_26           double precision,
    rsi_14           double precision,
    macd             double precision,
    macd_signal      double precision,
    macd_histogram   double precision,
    bollinger_mid    double precision,
    bollinger_upper  double precision,
    bollinger_lower  double precision,
    PRIMARY KEY (symbol, window_size, window_start)
) PARTITION BY LIST (window_size);             -- then by month, as stock_metrics
-- The forecast of the next window made at this window's close (tradewatch/volatility.py, issue 28).
ALTER TABLE indicators ADD COLUMN IF NOT EXISTS next_sigma double precision;
ALTER TABLE indicators ADD COLUMN IF NOT EXISTS next_range double precision;
ALTER TABLE indicators ADD COLUMN IF NOT EXISTS next_band_low double precision;
ALTER TABLE indicators ADD COLUMN IF NOT EXISTS next_band_high double precision;
ALTER TABLE indicators ADD COLUMN IF NOT EXISTS forecaster text;

-- Alerts raised by anomaly_detector.py and by the quotes stage's book watch (also published on the
-- Kafka topic `alerts`).
CREATE TABLE IF NOT EXISTS alerts (
    alert_id         text NOT NULL,                 -- '<trade_id>:<type>' ('<symbol>@<book seq>:<type>' for
                                                    -- the book's), so a replay never doubles it
    ts               timestamptz NOT NULL,          -- event time of the trade (the book message)
    symbol           text NOT NULL,
    alert_type       text NOT NULL,
    severity         text NOT NULL,                 -- LOW | MEDIUM | HIGH | CRITICAL
    message          text NOT NULL,
    details          jsonb NOT NULL DEFAULT '{}',
    trade_id         text,
    acknowledged     boolean NOT NULL DEFAULT false,
    acknowledged_at  timestamptz,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- the outbox: written NULL in the detector's transaction, set once Kafka acknowledged the alert
    published_at     timestamptz,
    kafka_partition  integer,                       -- whose outbox: the trades partition it came from
    webhook_due      boolean NOT NULL DEFAULT false,  -- awaiting a successful POST to ALERT_WEBHOOK_URL
    PRIMARY KEY (alert_id, ts)
) PARTITION BY RANGE (ts);
CREATE INDEX IF NOT EXISTS alerts_ts ON alerts (ts DESC);
CREATE INDEX IF NOT EXISTS alerts_unpublished ON alerts (created_at) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS alerts_webhook_due ON alerts (created_at) WHERE webhook_due;
-- awaiting a successful e-mail to ALERT_EMAIL_TO (ALERT_ROUTES)
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS email_due boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS alerts_email_due ON alerts (created_at) WHERE email_due;
CREATE INDEX IF NOT EXISTS alerts_by_id ON alerts (alert_id);
-- why it fired (tradewatch/detect/evidence.py); NULL for an alert stored before evidence was kept
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS evidence jsonb;
-- an analyst's verdict: true_positive | false_positive | needs_review (NULL: not marked); its every
-- change is a row of alert_dispositions
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS disposition text;
-- the stage that raised it, whose outboxes deliver it: 'detector' (trades, kafka_partition of
-- `trades`) or 'quotes' (the book, kafka_partition of `quotes`)
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS source text NOT NULL DEFAULT 'detector';

-- Every change of an alert's disposition, never updated (store/detections.py); kept as long as the
-- alerts (maintain.py deletes those of alerts past ALERTS retention).
CREATE TABLE IF NOT EXISTS alert_dispositions (
    change_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id     text NOT NULL,
    alert_ts     timestamptz NOT NULL,          -- the alert's event time (its partition)
    previous     text,                          -- the disposition before (NULL: not marked)
    disposition  text NOT NULL CHECK (disposition IN ('true_positive', 'false_positive', 'needs_review')),
    note         text CHECK (length(note) <= 2000),
    by_whom      text NOT NULL,                 -- the name the analyst gave
    via          text NOT NULL,                 -- api | dashboard
    at           timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS alert_dispositions_by_alert ON alert_dispositions (alert_id, change_id);
CREATE INDEX IF NOT EXISTS alert_dispositions_alert_ts ON alert_dispositions (alert_ts);
-- resuming the live alert stream after an alert id (GET /alerts/stream with Last-Event-ID)
CREATE INDEX IF NOT EXISTS alerts_created ON alerts (created_at, alert_id);

-- The detector's rolling state per symbol (JSON of SymbolState, its breaker and alert cooldowns),
-- with the partition it comes from: a checkpoint writes only the symbols that changed and deletes
-- the ones evicted as idle (SYMBOL_IDLE_EVICT_SECONDS).
CREATE TABLE IF NOT EXISTS detector_symbols (
    consumer_group  text NOT NULL,
    topic           text NOT NULL,
    symbol          text NOT NULL,
    kafka_partition integer NOT NULL,
    state           json NOT NULL,                 -- json (not jsonb): floats kept digit for digit
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, symbol)
);
CREATE INDEX IF NOT EXISTS detector_symbols_partition ON detector_symbols (consumer_group, topic, kafka_partition);
-- A busy symbol's state is ~23 KB, written once a second: uncompressed (pglz took half the write's time)
ALTER TABLE detector_symbols ALTER COLUMN state SET STORAGE EXTERNAL;

-- A database from before stage_positions: the aggregator's and the detector's tables of positions
-- become its rows (and the symbols of detector_state's one value per partition, from before
-- detector_symbols, become rows there, where none is stored yet); then they go.
DO $$
BEGIN
    IF to_regclass('aggregator_offsets') IS NOT NULL THEN
        INSERT INTO stage_positions (consumer_group, topic, kafka_partition, stage, next_offset, kept)
        SELECT consumer_group, topic, kafka_partition, 'aggregator', next_offset,
               json_build_object('max_event_ms', max_event_ms, 'watermark_ms', watermark_ms)
        FROM aggregator_offsets ON CONFLICT DO NOTHING;
        DROP TABLE aggregator_offsets;
    END IF;
    IF to_regclass('detector_state') IS NOT NULL THEN
        INSERT INTO detector_symbols (consumer_group, topic, symbol, kafka_partition, state)
        SELECT d.consumer_group, d.topic, s.key, d.kafka_partition, s.value
        FROM detector_state d, json_each(d.symbols) s ON CONFLICT DO NOTHING;
        INSERT INTO stage_positions (consumer_group, topic, kafka_partition, stage, next_offset)
        SELECT consumer_group, topic, kafka_partition, 'detector', next_offset FROM detector_state
        ON CONFLICT DO NOTHING;
        DROP TABLE detector_state;
    END IF;
END $$;

-- Current circuit-breaker state per symbol: CLOSED | OPEN | HALF_OPEN.
CREATE TABLE IF NOT EXISTS circuit_breakers (
    symbol      text PRIMARY KEY,
    state       text NOT NULL,
    since       timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Every breaker transition (event time), for reports: circuit_breakers above holds only the current
-- state. Written by the detector in the same transaction; a re-read writes the same rows again.
CREATE TABLE IF NOT EXISTS breaker_transitions (
    symbol  text NOT NULL,
    state   text NOT NULL,
    at      timestamptz NOT NULL,
    PRIMARY KEY (symbol, at, state)
);
CREATE INDEX IF NOT EXISTS breaker_transitions_at ON breaker_transitions (at);

-- 1-minute metrics from flink_job.sql (same columns as stock_metrics; Flink writes final windows).
-- By month of window_start, as the candles (kept RETENTION_DAYS_MINUTE_CANDLES). Flink cannot make
-- a partition before it writes, so a DEFAULT partition takes the windows of a month that has none
-- yet (a replay of 2013, or before `maintain` made this month's); tw_adopt_default moves them into
-- partitions of their own (maintain, and flink_job.py every minute).
CREATE TABLE IF NOT EXISTS flink_metrics (
    symbol        text NOT NULL,
    window_size   text NOT NULL,
    window_start  timestamptz NOT NULL,
    window_end    timestamptz NOT NULL,
    open          double precision,
    high          double precision,
    low           double precision,
    close         double precision,
    volume        double precision NOT NULL,
    traded_value  double precision NOT NULL,
    vwap          double precision,
    trade_count   bigint NOT NULL,
    avg_price     double precision NOT NULL,
    min_price     double precision NOT NULL,
    max_price     double precision NOT NULL,
    sum_price     double precision NOT NULL,
    avg_quantity  double precision NOT NULL,
    min_quantity  double precision NOT NULL,
    max_quantity  double precision NOT NULL,
    sum_quantity  double precision NOT NULL,
    buy_volume    double precision NOT NULL,
    sell_volume   double precision NOT NULL,
    is_final      boolean NOT NULL DEFAULT true,
    PRIMARY KEY (symbol, window_size, window_start)
) PARTITION BY RANGE (window_start);
CREATE TABLE IF NOT EXISTS flink_metrics_default PARTITION OF flink_metrics DEFAULT;
CREATE INDEX IF NOT EXISTS flink_metrics_size_start ON flink_metrics (window_size, window_start);

-- Liveness of every stage process (written only by tradewatch/runtime.py, at most once a second
-- per process): the dashboard's health strip reads it.
CREATE TABLE IF NOT EXISTS stage_health (
    stage        text NOT NULL,                     -- consumer | aggregator | detector | flink
    host         text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL,
    last_beat    timestamptz NOT NULL,
    processed    bigint NOT NULL DEFAULT 0,         -- records handled since the process started
    lag          bigint,                            -- records behind the end of the Kafka log
    partitions   integer[],                         -- Kafka partitions held
    state        text NOT NULL,                     -- running | stopped
    last_error   text,
    PRIMARY KEY (stage, host, pid)
);

-- The pipeline over time (the dashboard's pipeline panel, GET /pipeline): a sample of every stage
-- process every 10 s, written only by tradewatch/heartbeat.py, which deletes those older than a day.
CREATE TABLE IF NOT EXISTS stage_samples (
    stage           text NOT NULL,
    host            text NOT NULL,
    pid             integer NOT NULL,
    at              timestamptz NOT NULL,           -- on a whole 10 s of the clock, the same for every process
    processed       bigint NOT NULL,                -- records handled since the process started
    per_s           double precision,               -- records handled per second since the previous sample
    arriving_per_s  double precision,               -- records reaching its Kafka partitions per second (per_s
                                                    --   plus the lag's growth); both NULL in a process's first
    lag             bigint,                         -- records behind the end of the Kafka log
    latency_p50_ms  double precision,               -- of the latency measured since the previous sample
    latency_p99_ms  double precision,               --   (tradewatch_latency_seconds), NULL when none was
    latency_count   integer NOT NULL DEFAULT 0,     -- how many measurements those are
    PRIMARY KEY (stage, host, pid, at)
);
CREATE INDEX IF NOT EXISTS stage_samples_at ON stage_samples (at);

-- The final candles in the order the aggregator closed them: the outbox of the Kafka topic
-- `candles` (published_at NULL until Kafka acknowledged it; each aggregator publishes the rows of
-- the trades partitions it holds) and what a resumed candle stream (GET /candles/stream with
-- Last-Event-ID) reads after its id. Written only by store/candles.py, in the aggregator's
-- checkpoint transaction; the published rows older than a day are deleted by the outbox.
CREATE TABLE IF NOT EXISTS candle_outbox (
    seq              bigserial PRIMARY KEY,
    symbol           text NOT NULL,
    window_size      text NOT NULL,
    window_start     timestamptz NOT NULL,
    kafka_partition  integer NOT NULL,
    final_at         timestamptz NOT NULL DEFAULT now(),
    published_at     timestamptz,
    UNIQUE (symbol, window_size, window_start)
);
CREATE INDEX IF NOT EXISTS candle_outbox_unpublished ON candle_outbox (kafka_partition, seq) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS candle_outbox_final_at ON candle_outbox (final_at);

-- A database made before partitioning: copy each renamed plain table into its partitioned
-- successor (the days it holds get their partitions first), then drop it.
DO $$
DECLARE
    t text;
    key text;
    cols text;
    size text;
    d date;
BEGIN
    FOREACH t IN ARRAY ARRAY['trades', 'trade_flags', 'late_trades', 'alerts', 'dead_letters', 'stock_metrics',
                             'indicators', 'flink_metrics'] LOOP
        IF to_regclass(t || '_unpartitioned') IS NULL THEN
            CONTINUE;
        END IF;
        IF t = 'flink_metrics' THEN
            NULL;       -- its rows land in flink_metrics_default; tw_adopt_default moves them below
        ELSIF t IN ('stock_metrics', 'indicators') THEN
            FOR size, d IN EXECUTE format('SELECT DISTINCT window_size, (date_trunc(''month'', window_start'
                                          ' AT TIME ZONE ''UTC''))::date FROM %I', t || '_unpartitioned') LOOP
                PERFORM tw_ensure_partition(tw_ensure_size(t, size), d, 'month');
            END LOOP;
        ELSE
            key := CASE t WHEN 'dead_letters' THEN 'coalesce(sent_at, received_at)' ELSE 'ts' END;
            IF t = 'dead_letters' AND NOT EXISTS (SELECT 1 FROM information_schema.columns
                    WHERE table_name = 'dead_letters_unpartitioned' AND column_name = 'sent_at') THEN
                key := 'received_at';
            END IF;
            FOR d IN EXECUTE format('SELECT DISTINCT (%s AT TIME ZONE ''UTC'')::date FROM %I', key,
                                    t || '_unpartitioned') LOOP
                PERFORM tw_ensure_partition(t, d);
            END LOOP;
        END IF;
        SELECT string_agg(quote_ident(column_name), ', ') INTO cols FROM information_schema.columns
        WHERE table_name = t || '_unpartitioned' AND column_name IN (
            SELECT column_name FROM information_schema.columns WHERE table_name = t) AND column_name <> 'sent_at';
        IF t = 'dead_letters' THEN
            EXECUTE format('INSERT INTO dead_letters (%s, sent_at) SELECT %s, %s FROM dead_letters_unpartitioned',
                           cols, cols, key);
        ELSE
            EXECUTE format('INSERT INTO %I (%s) SELECT %s FROM %I ON CONFLICT DO NOTHING', t, cols, cols,
                           t || '_unpartitioned');
            IF t = 'trades' THEN
                PERFORM tw_refill_latest_trades();      -- the copied rows bypassed writer.write_batch
            END IF;
        END IF;
        EXECUTE format('DROP TABLE %I', t || '_unpartitioned');
    END LOOP;
    PERFORM setval(pg_get_serial_sequence('dead_letters', 'id'), coalesce((SELECT max(id) FROM dead_letters), 0) + 1,
                   false);
END $$;
SELECT tw_adopt_default('flink_metrics', 'month');
