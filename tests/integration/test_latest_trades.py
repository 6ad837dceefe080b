"""`/latest` reads `latest_trades`, one row per symbol kept by writer.write_batch in the inserting
transaction, so its cost does not grow with the day partitions (issue 23: it was 2.1x slower at 100
million trades than at 10 million). On the real PostgreSQL, whatever way trades arrive — the consumer's batches in
any order of days, re-deliveries (the merge path), a batch split around a row the database refuses,
a rolled-back batch, two writers at once — and after `maintain` drops days, it equals each symbol's
newest stored trade found by scanning `trades`."""
from __future__ import annotations

import random
import threading
from datetime import datetime, timezone

from tests.conftest import query
from tests.integration.test_maintain import maintain
from tradewatch.events import Trade
from tradewatch.store import db
from tradewatch.store.writer import copy_row, write_batch

NEWEST = ("SELECT DISTINCT ON (symbol) symbol, ts, trade_id, price, quantity, side, exchange FROM trades"
          " ORDER BY symbol, ts DESC, trade_id DESC")
DAY_MS = 86_400_000
TODAY_MS = int(datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)


def kept(settings) -> list[tuple]:
    return query(settings, "SELECT symbol, ts, trade_id, price, quantity, side, exchange FROM latest_trades"
                           " ORDER BY symbol")


def write(settings, trades: list[Trade], commit: bool = True):
    conn = db.connect(settings)
    try:
        with conn.cursor() as cur:
            result = write_batch(cur, [copy_row(t, 0, i) for i, t in enumerate(trades)], [])
        conn.commit() if commit else conn.rollback()
    finally:
        conn.close()
    return result


def market(seed: int, n: int, symbols: int = 6, days: int = 4) -> list[Trade]:
    """Trades over `days` recent days, with ties on the timestamp (then trade_id decides)."""
    rng = random.Random(seed)
    start = TODAY_MS - days * DAY_MS
    return [Trade(f"s{seed}-{i}", f"SYM{rng.randrange(symbols)}", start + rng.randrange(days * 1440) * 60_000,
                  round(rng.uniform(10, 20), 2), float(rng.randint(1, 500)), rng.choice(["buy", "sell"]), "X")
            for i in range(n)]


def test_each_symbols_newest_trade_whatever_the_order_of_batches(settings):
    trades = market(1, 3_000)
    random.Random(2).shuffle(trades)            # batches of any days, older ones after newer ones
    for n in range(0, len(trades), 400):
        write(settings, trades[n:n + 400])
        assert kept(settings) == query(settings, NEWEST), f"after the batch at {n}"
    write(settings, trades[100:900])            # re-delivered: the merge path, nothing changes
    assert kept(settings) == query(settings, NEWEST)

    before = kept(settings)
    newer = [Trade(f"late-{s}", s, TODAY_MS + 1, 99.0, 1.0, "buy", "X") for s, *_ in before]
    write(settings, newer, commit=False)        # a batch rolled back leaves no trace
    assert kept(settings) == before

    newer.append(Trade("new-symbol", "NEWSYM", TODAY_MS - 7 * DAY_MS, 5.0, 1.0, "sell", "Y"))
    write(settings, newer)
    assert kept(settings) == query(settings, NEWEST) and {r[2] for r in kept(settings)} == {t.trade_id for t in newer}


def test_a_refused_newest_trade_is_not_the_latest(settings):
    """The batch is split around the row PostgreSQL refuses: the newest row of its symbol is not
    stored, so the one before it is the symbol's latest."""
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE trades ADD CONSTRAINT sane_quantity CHECK (quantity < 1e9) NOT VALID")
    conn.close()
    try:
        trades = [Trade(f"ok-{i}", "AAPL", TODAY_MS - DAY_MS + i * 1000, 150.0, 10.0, "buy", "X") for i in range(50)]
        trades.append(Trade("huge", "AAPL", TODAY_MS, 151.0, 5e9, "buy", "X"))
        result = write(settings, trades)
    finally:
        with db.connect(settings) as conn, conn.cursor() as cur:
            cur.execute("ALTER TABLE trades DROP CONSTRAINT sane_quantity")
        conn.close()
    assert [r.index for r in result.refused] == [50]
    assert [r[2] for r in kept(settings)] == ["ok-49"] and kept(settings) == query(settings, NEWEST)


def test_two_writers_at_once_on_the_same_symbols(settings):
    """Two consumers of one group hold the same symbols for a moment in a rebalance: neither
    blocks the other for ever (rows are locked in symbol order) and the newest wins."""
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        try:
            trades = market(seed, 4_000, symbols=30)
            for n in range(0, len(trades), 200):
                write(settings, trades[n:n + 200])
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in (11, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert len(kept(settings)) == 30 and kept(settings) == query(settings, NEWEST)


def test_a_symbol_whose_trades_were_all_dropped_is_not_latest(settings, tmp_path):
    settings = settings.with_overrides(tradewatch_home=str(tmp_path / "home"))
    old = TODAY_MS - 12 * DAY_MS
    write(settings, [Trade("gone", "GONE", old, 1.0, 1.0, "buy", "X"),
                     Trade("spy-old", "SPY", old + 1, 170.0, 1.0, "buy", "X"),
                     Trade("spy-new", "SPY", TODAY_MS - 2 * DAY_MS, 171.0, 1.0, "sell", "X")])
    out = maintain(settings, days=3)
    assert out.returncode == 0, out.stderr
    assert query(settings, "SELECT count(*) FROM trades")[0][0] == 1, out.stdout
    assert [(r[0], r[2]) for r in kept(settings)] == [("SPY", "spy-new")] and kept(settings) == query(settings, NEWEST)


def test_a_database_from_before_the_table_gets_it_filled_once(settings):
    write(settings, market(3, 500))
    try:
        with db.connect(settings) as conn, conn.cursor() as cur:       # the schema as it was
            cur.execute("DROP TABLE latest_trades; DROP FUNCTION tw_refill_latest_trades();"
                        " DELETE FROM schema_applied")
        conn.close()
    finally:
        db.apply_schema(settings)
    assert len(kept(settings)) == 6 and kept(settings) == query(settings, NEWEST)
