-- TradeWatch 1-minute metrics computed by Flink from the Kafka topic `trades` into PostgreSQL.
-- The same windows as aggregator.py (see tradewatch/windows.py); `python flink_job.py` fills the
-- ${…} placeholders from .env / the environment and runs it (locally or on a cluster);
-- `python flink_job.py --print-sql` prints the filled-in SQL for Flink's SQL client.

SET 'table.local-time-zone' = 'UTC';
SET 'execution.checkpointing.interval' = '${FLINK_CHECKPOINT_SECONDS} s';
SET 'pipeline.name' = 'tradewatch-1m-metrics';

CREATE TABLE trades_source (
    trade_id      STRING,
    symbol        STRING,
    timestamp_ms  BIGINT,
    price         DOUBLE,
    quantity      DOUBLE,
    side          STRING,
    `condition`   STRING,
    kafka_offset  BIGINT METADATA FROM 'offset' VIRTUAL,
    record_time   TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL,
    -- The consumer's clock-skew rule (tradewatch/events.py): a trade stamped more than
    -- MAX_CLOCK_SKEW_SECONDS after Kafka received it comes from a wrong clock. It gets the epoch as
    -- event time, so it can never drag the watermark ahead (the watermark is a running maximum),
    -- and valid_trades drops it. (The aggregator also holds back a trade far ahead of its
    -- partition's recent trades until the next one confirms it; Flink SQL has no such rule.)
    skewed        AS TO_TIMESTAMP_LTZ(timestamp_ms, 3) > record_time + ${MAX_CLOCK_SKEW_INTERVAL},
    event_time    AS CASE WHEN TO_TIMESTAMP_LTZ(timestamp_ms, 3) > record_time + ${MAX_CLOCK_SKEW_INTERVAL}
                          THEN TO_TIMESTAMP_LTZ(0, 3) ELSE TO_TIMESTAMP_LTZ(timestamp_ms, 3) END,
    -- the aggregator's allowed lateness: windows close when the watermark passes their end
    WATERMARK FOR event_time AS event_time - INTERVAL '${ALLOWED_LATENESS_SECONDS}' SECOND
) WITH (
    'connector' = 'kafka',
    'topic' = '${TRADES_TOPIC}',
    'properties.bootstrap.servers' = '${KAFKA_BOOTSTRAP_SERVERS}',
    'properties.group.id' = '${FLINK_GROUP}',
    'scan.startup.mode' = 'earliest-offset',
    'format' = 'json',
    -- malformed messages are the consumer's business (dead_letters); here they are skipped
    'json.ignore-parse-errors' = 'true',
    -- a partition without new trades for this long stops holding the watermark back (per partition,
    -- in the source itself; tests/integration/test_flink.py: a quiet partition after old data)
    'scan.watermark.idle-timeout' = '${IDLE_TIMEOUT_SECONDS} s'
);

CREATE TABLE flink_metrics_sink (
    symbol        STRING,
    window_size   STRING,
    -- UTC text ('2026-01-01 10:00:00.000+00'), typed by PostgreSQL (stringtype=unspecified): the
    -- instant never depends on the time zone of the JVM that writes it (a remote TaskManager's)
    window_start  STRING,
    window_end    STRING,
    `open`        DOUBLE,
    high          DOUBLE,
    low           DOUBLE,
    `close`       DOUBLE,
    volume        DOUBLE,
    traded_value  DOUBLE,
    vwap          DOUBLE,
    trade_count   BIGINT,
    avg_price     DOUBLE,
    min_price     DOUBLE,
    max_price     DOUBLE,
    sum_price     DOUBLE,
    avg_quantity  DOUBLE,
    min_quantity  DOUBLE,
    max_quantity  DOUBLE,
    sum_quantity  DOUBLE,
    buy_volume    DOUBLE,
    sell_volume   DOUBLE,
    PRIMARY KEY (symbol, window_size, window_start) NOT ENFORCED   -- rows are upserted
) WITH (
    'connector' = 'jdbc',
    'url' = 'jdbc:postgresql://${POSTGRES_HOST}:${POSTGRES_PORT}/${POSTGRES_DB}?stringtype=unspecified',
    'table-name' = 'flink_metrics',
    'username' = '${POSTGRES_USER}',
    'password' = '${POSTGRES_PASSWORD}',
    'sink.buffer-flush.interval' = '1 s',
    'sink.buffer-flush.max-rows' = '1000'
);

-- The valid trades (the consumer's rules for the numeric fields).
CREATE TEMPORARY VIEW valid_trades AS
SELECT *,
       -- open/close = price of the first/last trade by (event time, offset), as in aggregator.py,
       -- whatever the arrival order: a sortable key with the price appended, min/max, then split
       LPAD(CAST(timestamp_ms AS STRING), 15, '0') || LPAD(CAST(kafka_offset AS STRING), 19, '0')
           || '|' || CAST(price AS STRING) AS order_key,
       (`condition` IS NULL OR `condition` NOT IN (${OHLC_EXCLUDE_SQL_LIST})) AS sets_price
FROM trades_source
WHERE trade_id IS NOT NULL AND symbol IS NOT NULL AND timestamp_ms IS NOT NULL
  AND price > 0 AND quantity > 0 AND NOT skewed;

INSERT INTO flink_metrics_sink
SELECT symbol, '1m', DATE_FORMAT(window_start, 'yyyy-MM-dd HH:mm:ss.SSS') || '+00',
       DATE_FORMAT(window_end, 'yyyy-MM-dd HH:mm:ss.SSS') || '+00',
       CAST(SPLIT_INDEX(MIN(order_key) FILTER (WHERE sets_price), '|', 1) AS DOUBLE),
       MAX(price) FILTER (WHERE sets_price),
       MIN(price) FILTER (WHERE sets_price),
       CAST(SPLIT_INDEX(MAX(order_key) FILTER (WHERE sets_price), '|', 1) AS DOUBLE),
       SUM(quantity), SUM(price * quantity), SUM(price * quantity) / SUM(quantity), COUNT(*),
       AVG(price), MIN(price), MAX(price), SUM(price),
       AVG(quantity), MIN(quantity), MAX(quantity), SUM(quantity),
       COALESCE(SUM(quantity) FILTER (WHERE side = 'buy'), 0.0),
       COALESCE(SUM(quantity) FILTER (WHERE side = 'sell'), 0.0)
FROM TABLE(TUMBLE(TABLE valid_trades, DESCRIPTOR(event_time), INTERVAL '1' MINUTE))
GROUP BY symbol, window_start, window_end;
