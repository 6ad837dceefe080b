"""Market-quality statistics (tradewatch/detect/quality.py) on distributions whose answer is known,
and on the recorded SPY and IBM days of 2013-10-07 (regulated, real): those come out unremarkable,
sizes drawn by a program do not."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tradewatch.config import shared_data_dir
from tradewatch.detect import quality

LEAN = shared_data_dir() / "lean"


def histogram(sizes) -> tuple[np.ndarray, np.ndarray]:
    counts = pd.Series(sizes).value_counts()
    return counts.index.to_numpy(), counts.to_numpy()


def test_first_digits_of_awkward_sizes():
    digits = quality.first_digits([0.3, 2999.9999999, 100, 9.99, 0.0123, 7e-9], [1, 1, 2, 1, 1, 1])
    assert list(digits) == [3, 1, 1, 0, 0, 0, 1, 0, 1]


def test_benford_conforming_and_not():
    rng = np.random.default_rng(7)
    scale_free = quality.benford(*histogram(np.round(10 ** rng.uniform(0, 4, 50_000), 2)))
    assert scale_free["mad"] <= 0.006 and scale_free["conformity"] == "close", scale_free
    assert scale_free["p_value"] > 1e-4
    flat = quality.benford(*histogram(rng.integers(1, 10, 50_000)))        # every first digit alike
    assert flat["conformity"] == "nonconforming" and flat["p_value"] < 1e-10, flat


def test_round_sizes_clustering():
    rng = np.random.default_rng(3)
    smooth = np.round(np.exp(rng.normal(np.log(300), 1, 40_000)))
    lots = np.where(rng.random(40_000) < 0.5, np.maximum(np.round(smooth / 100), 1) * 100, smooth)
    people, program = quality.clustering(*histogram(lots)), quality.clustering(*histogram(smooth))
    assert people["unit"] == 100 and people["index"] > 10 and people["t"] > 5, people
    assert 0.5 < program["index"] < 2 and program["t"] < 2, program
    assert 0.45 < people["round_share"] < 0.6


def test_hill_exponent_of_a_pareto_tail():
    rng = np.random.default_rng(11)
    sizes = np.round(10 * (1 + rng.pareto(1.5, 200_000)), 4)
    assert quality.tail(*histogram(sizes))["alpha"] == pytest.approx(1.5, abs=0.12)


def test_volume_with_and_without_price_moves():
    rng = np.random.default_rng(5)
    returns = rng.normal(0, 0.001, 600)
    closes = 100 * np.exp(np.cumsum(returns))
    related = 1e5 * np.abs(np.concatenate([[0], np.diff(np.log(closes))])) + rng.exponential(20, 600)
    unrelated = rng.exponential(100, 600)
    with_moves = quality.volume_volatility(related, closes)
    without = quality.volume_volatility(unrelated, closes)
    assert with_moves["minutes"] == 599 and with_moves["rho"] > 0.5 and with_moves["t"] > 10, with_moves
    assert abs(without["t"]) < 3, without


@pytest.mark.parametrize("name", ["spy", "ibm"])
def test_the_recorded_regulated_days_are_unremarkable(name):
    trades = pd.read_csv(LEAN / f"{name}_20131007_trades.csv.gz", parse_dates=["timestamp"])
    minutes = trades.set_index("timestamp").resample("1min").agg({"quantity": "sum", "price": "last"}).dropna()
    result = quality.quality(*histogram(trades["quantity"]), minutes["quantity"], minutes["price"])
    assert result["verdict"] == "unremarkable" and result["signs"] == [], result
    # why: round lots of 100 (clustered far beyond their neighbours), so Benford fails and says nothing
    assert result["clustering"]["unit"] == 100 and result["clustering"]["index"] > 50
    assert result["benford"]["conformity"] == "nonconforming" and result["benford"]["shares"][0] > 0.5
    assert quality.TAIL_BAND[0] <= result["tail"]["alpha"] <= quality.TAIL_BAND[1]
    assert result["volume_volatility"]["rho"] > 0.1 and result["volume_volatility"]["t"] > 2


def test_sizes_drawn_by_a_program_are_remarkable():
    rng = np.random.default_rng(2)
    sizes = np.round(rng.uniform(0.01, 1, 20_000), 4)         # a wash-trading bot's uniform sizes
    closes = 100 * np.exp(np.cumsum(rng.normal(0, 0.001, 300)))
    result = quality.quality(*histogram(sizes), rng.exponential(100, 300), closes)
    assert result["verdict"] == "remarkable"
    assert any(s.startswith("no round-size clustering") for s in result["signs"])
    assert any(s.startswith("first digits far from Benford") for s in result["signs"])
    assert any(s.startswith("size tail exponent") for s in result["signs"])
    assert any(s.startswith("volume unrelated to price moves") for s in result["signs"])


def test_too_few_trades_are_not_judged():
    result = quality.quality([100, 200], [3, 2])
    assert result["verdict"] == "too few trades to judge" and result["signs"] == []
