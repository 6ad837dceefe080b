"""Indicators against an independent vectorised computation with pandas."""
import numpy as np
import pandas as pd
import pytest

from tradewatch.indicators import series


@pytest.fixture
def closes():
    rng = np.random.default_rng(4)
    return list(100 * np.exp(np.cumsum(rng.normal(0, 0.01, 300))))


def column(values, name):
    return pd.Series([getattr(v, name) for v in values], dtype="float64")


def test_sma_ema_macd_bollinger_match_pandas(closes):
    got = series(closes)
    s = pd.Series(closes)
    ema12 = s.ewm(span=12, adjust=False).mean()
    ema26 = s.ewm(span=26, adjust=False).mean()
    macd = ema12 - ema26
    signal = macd.ewm(span=9, adjust=False).mean()
    expected = {
        "sma_20": s.rolling(20).mean(), "sma_50": s.rolling(50).mean(),
        "ema_12": ema12, "ema_26": ema26, "macd": macd, "macd_signal": signal,
        "macd_histogram": macd - signal,
        "bollinger_upper": s.rolling(20).mean() + 2 * s.rolling(20).std(ddof=0),
        "bollinger_lower": s.rolling(20).mean() - 2 * s.rolling(20).std(ddof=0),
    }
    for name, reference in expected.items():
        pd.testing.assert_series_equal(column(got, name), reference, check_names=False, rtol=1e-9, atol=1e-9)
    assert got[18].sma_20 is None and got[19].sma_20 is not None and got[48].sma_50 is None


def test_rsi_matches_wilder_smoothing_in_pandas(closes):
    got = column(series(closes), "rsi_14")
    change = pd.Series(closes).diff()
    gain = change.clip(lower=0).iloc[1:].ewm(alpha=1 / 14, adjust=False).mean()
    loss = (-change.clip(upper=0)).iloc[1:].ewm(alpha=1 / 14, adjust=False).mean()
    rsi = 100 - 100 / (1 + gain / loss)
    rsi.iloc[:13] = np.nan
    expected = pd.concat([pd.Series([np.nan]), rsi]).reset_index(drop=True)
    pd.testing.assert_series_equal(got, expected, check_names=False, rtol=1e-9, atol=1e-9)
    assert got.dropna().between(0, 100).all()


def test_rsi_is_100_when_prices_only_rise():
    assert series([float(i) for i in range(1, 30)])[-1].rsi_14 == 100.0
