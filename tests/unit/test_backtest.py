"""The backtest's parts that need no services (#37): what --set accepts, a silent symbol warmed up
afresh as the live stage evicts it, and the range cut at the spans `maintain` archived. The
backtest itself runs against the real database in tests/integration/test_backtest.py."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from tradewatch import backtest
from tradewatch.config import Settings
from tradewatch.events import Trade


def test_set_reaches_the_settings_and_the_rule_parameters_and_names_what_it_refuses():
    today = Settings()
    variant, changes = backtest.changed(today, ["WHALE_FACTOR=4", "zscore_threshold=10",
                                                "alert_cooldown_high_seconds=0"])
    assert variant.config.whale_factor == 4.0 and variant.config.zscore_threshold == 10.0
    assert variant.settings.alert_cooldown_high_seconds == 0 and today.alert_cooldown_high_seconds == 60
    assert changes == {"whale_factor": (2.8, 4.0), "zscore_threshold": (8.0, 10.0),
                       "alert_cooldown_high_seconds": (60.0, 0.0)}
    assert backtest.Variant(today).config == backtest.changed(today, [])[0].config, "no --set: today's"
    with pytest.raises(backtest.BadSetting, match="--set price_window: not something detection reads"):
        backtest.changed(today, ["price_window=10"])      # its setting is ZSCORE_WINDOW: one name for one thing
    with pytest.raises(backtest.BadSetting, match="setting ZSCORE_WINDOW must be more than 0"):
        backtest.changed(today, ["zscore_window=0"])


def test_a_symbol_silent_longer_than_the_idle_eviction_starts_afresh():
    settings = Settings(symbol_idle_evict_seconds=60)
    replay = backtest.Replay(backtest.Variant(settings), None)
    trades = [Trade(f"a{i}", "AAPL", i * 1000, 100.0 + i % 2 * 0.01, 1.0, "buy", "X") for i in range(20)]
    replay.process(trades + [Trade("b", "MSFT", 100_000, 50.0, 1.0, "buy", "X")])
    later = [Trade(f"c{i}", "AAPL", 90_000 + i * 1000, 100.0, 1.0, "buy", "X") for i in range(3)]   # 71 s silent
    replay.process(later)
    assert replay.pipeline.rules.symbols["AAPL"].features(later[-1]).history == 3, "the three since, not 23"
    assert replay.pipeline.rules.symbols["MSFT"].features(later[-1]).history == 1


def archive_span(home, label: str) -> str:
    where = home / "archive" / "trades" / f"date={label}"
    where.mkdir(parents=True)
    (where / "part-x.parquet").write_bytes(b"")
    (where / "part-x.json").write_text(json.dumps({"file": "part-x.parquet", "rows": 1}))
    (where / "part-y.parquet").write_bytes(b"")        # no record: not part of the archive
    return str(where / "part-x.parquet")


def test_the_range_is_cut_at_the_archived_spans(tmp_path):
    settings = Settings(tradewatch_home=str(tmp_path))
    year, day = archive_span(tmp_path, "2013"), archive_span(tmp_path, "2014-01-03")

    def at(text):
        return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)
    cut = backtest.pieces(settings, at("2013-10-07"), at("2014-01-05"))
    assert [(a.isoformat()[:10], b.isoformat()[:10], [str(f) for f in files]) for a, b, files in cut] == [
        ("2013-10-07", "2014-01-01", [year]), ("2014-01-01", "2014-01-03", []), ("2014-01-03", "2014-01-04", [day]),
        ("2014-01-04", "2014-01-05", [])]
    assert backtest.pieces(settings, at("2015-01-01"), at("2015-01-02")) == [(at("2015-01-01"), at("2015-01-02"), [])]
