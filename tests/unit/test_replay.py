import gzip

import pytest

from tests.conftest import SHARED_DATA
from tradewatch.market import replay

SPY = SHARED_DATA / "lean" / "spy_20131007_trades.csv.gz"


def test_spy_file_replays_every_trade_in_event_order():
    loaded = replay.load(SPY)
    with gzip.open(SPY, "rt") as handle:
        rows = sum(1 for _ in handle) - 1
    assert len(loaded.trades) == rows == 250_601
    assert loaded.skipped_rows == []
    times = [t.timestamp_ms for t in loaded.trades]
    assert times == sorted(times)
    first = loaded.trades[0]
    assert (first.trade_id, first.symbol, first.timestamp_ms, first.price, first.quantity, first.exchange,
            first.condition) == ("SPY-20131007-0000001", "SPY", 1381132800464, 167.41, 100.0, "P", "20002000")
    assert {t.side for t in loaded.trades[1:]} <= {"buy", "sell", "unknown"}
    assert sum(t.side == "buy" for t in loaded.trades) > 50_000


def test_tick_rule_infers_sides(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("timestamp,price,quantity\n2020-01-01T00:00:00Z,10,1\n2020-01-01T00:00:01Z,11,1\n"
                    "2020-01-01T00:00:02Z,11,1\n2020-01-01T00:00:03Z,10.5,1\n")
    trades = replay.load(path, symbol="abc").trades
    assert [t.side for t in trades] == ["unknown", "buy", "buy", "sell"]
    assert {t.symbol for t in trades} == {"ABC"}


def test_column_mapping_epoch_times_sorting_and_bad_rows(tmp_path):
    path = tmp_path / "custom.csv"
    path.write_text("when,px,size,ticker,dir\n1577836802000,10,5,XYZ,S\n1577836801000,9,5,XYZ,B\n"
                    "1577836803000,oops,5,XYZ,B\n1577836804000,-1,5,XYZ,B\n")
    columns = replay.ColumnMap(timestamp="when", price="px", quantity="size", symbol="ticker", side="dir")
    loaded = replay.load(path, columns)
    assert [(t.timestamp_ms, t.price, t.side) for t in loaded.trades] == [
        (1577836801000, 9.0, "buy"), (1577836802000, 10.0, "sell")]
    assert len(loaded.skipped_rows) == 2
    assert loaded.skipped_rows[0].startswith("line 4:") and "oops" in loaded.skipped_rows[0]
    assert loaded.skipped_rows[1].startswith("line 5:") and "must be > 0" in loaded.skipped_rows[1]


def test_bars_file_becomes_four_trades_per_bar():
    loaded = replay.load(SHARED_DATA / "lean" / "ibm_20131007_bars_1m.csv")
    assert len(loaded.trades) == 453 * 4
    first_bar = loaded.trades[:4]
    assert [t.price for t in first_bar][0] == 181.52
    assert sum(t.quantity for t in loaded.trades) == pytest.approx(
        sum(float(line.split(",")[6]) for line in
            (SHARED_DATA / "lean" / "ibm_20131007_bars_1m.csv").read_text().splitlines()[1:]))


def test_missing_columns_give_a_clear_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no column 'timestamp', 'price'"):
        replay.load(path)


def bad_files(tmp_path):
    header = "time,symbol,price,quantity\n"
    big = tmp_path / "big.csv"
    big.write_text(header + "2013-10-07T13:30:00Z,SPY,170,1\n2013-10-07T13:30:01Z,SPY,170," + "9" * 200_000 + "\n")
    cut = tmp_path / "cut.csv.gz"
    whole = gzip.compress((header + "".join(f"2013-10-07T13:30:{i % 60:02d}Z,SPY,170,1\n"
                                            for i in range(20_000))).encode())
    cut.write_bytes(whole[:len(whole) // 2])
    latin = tmp_path / "latin.csv"
    latin.write_bytes((header + "2013-10-07T13:30:00Z,SPY,170,1\n2013-10-07T13:30:01Z,SPÿ,170,1\n").encode("latin-1"))
    return {"big": big, "cut": cut, "latin": latin}


@pytest.mark.parametrize("name, message", [("big", "line 3: not readable as CSV"),
                                           ("cut", "the compressed file is cut short or damaged"),
                                           ("latin", "line 3: not UTF-8")])
def test_the_producer_says_it_in_one_line_and_exits_2(tmp_path, name, message):
    import os
    import subprocess
    import sys

    from tradewatch.config import PROJECT_ROOT
    path = bad_files(tmp_path)[name]
    result = subprocess.run([sys.executable, "producer.py", "--replay", str(path), "--timestamp-column", "time"],
                            cwd=PROJECT_ROOT, env={**os.environ, "TRADEWATCH_HOME": str(tmp_path / "home")},
                            capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]


def test_files_that_cannot_be_read_say_where_and_why(tmp_path):
    """A field over the csv module's 128 KiB, a cut .gz and a line that is not UTF-8 each end the
    replay with one clear error naming the line (they ended it with a traceback)."""
    files = bad_files(tmp_path)
    big, cut, latin = files["big"], files["cut"], files["latin"]
    columns = replay.ColumnMap(timestamp="time")
    with pytest.raises(ValueError, match=r"^line 3: not readable as CSV \(field larger than field limit"):
        replay.load(big, columns)
    with pytest.raises(ValueError, match=r"^after line \d+: the compressed file is cut short or damaged"):
        replay.load(cut, columns)
    with pytest.raises(ValueError, match=r"^line 3: not UTF-8"):
        replay.load(latin, columns)
