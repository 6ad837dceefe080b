"""Market-quality statistics of a symbol's trade prints: the signs studies of fake (wash) volume
look for, computable without an order book or account ids (Cong, Li, Tang and Yang, "Crypto Wash
Trading", 2021, and the literature it builds on).

    Benford      first significant digit of trade sizes against Benford's law, log10(1 + 1/d):
                 chi-square (8 degrees of freedom) and the mean absolute deviation (MAD) with
                 Nigrini's first-digit bands (close <= 0.006, acceptable <= 0.012, marginal <=
                 0.015, else nonconforming)
    clustering   people trade round sizes: trades at each round size (multiples of `unit`, the
                 power of ten at or below the median size) against the trades at the sizes
                 beside it (±1…±5 steps of unit/10: 100 against 50…90 and 110…150): their ratio
                 (the index; ~1 when sizes are not clustered) and a t over the round sizes of the
                 log ratio of each to its neighbours
    tail         the Pareto (Hill) exponent of the largest 5 % of sizes: real markets' trade sizes
                 are heavy-tailed with an exponent between about 1 and 2 (the "cubic law" of
                 volume: ~1.5)
    volume-volatility  Spearman rank correlation of each minute's volume with its |log return|
                 (close to close of the aggregator's 1-minute candles): real volume comes with
                 price moves, fake volume need not

Pure (no I/O): inputs are a size histogram (distinct sizes and their counts, what one GROUP BY
returns, however many trades there were) and the minute volumes and closes.

A sign is raised only by what fake volume does and a regulated market does not: no round-size
clustering, a tail outside the band, volume unrelated to moves. Benford's law alone is not one:
where trading is in round lots (US equities: 100 shares), most sizes start with 1 and Benford fails
on real, regulated days (SPY 2013-10-07: MAD 0.057) — it counts when sizes also show no clustering
(sizes drawn by a program).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

BENFORD = np.log10(1 + 1 / np.arange(1, 10))
MAD_BANDS = ((0.006, "close"), (0.012, "acceptable"), (0.015, "marginal"))
NEIGHBOURS = 5                 # size bins each side of a round size
CLUSTER_MIN_INDEX = 2.0        # round sizes at least this many times as frequent as their neighbours
MIN_T = 2.0                    # ... and significantly so (paired t), as volume with |return| (Spearman t)
TAIL_SHARE = 0.05              # the Hill estimator over the largest 5 % of trades
TAIL_BAND = (1.0, 2.5)         # Pareto exponents of real trade sizes (regulated markets: 1–2)
MIN_TRADES = 500               # fewer trades: the size statistics are not judged
MIN_MINUTES = 30               # fewer minutes with a return: the correlation is not judged


def _histogram(sizes, counts) -> tuple[np.ndarray, np.ndarray]:
    sizes, counts = np.asarray(sizes, dtype=float), np.asarray(counts, dtype=float)
    keep = np.isfinite(sizes) & (sizes > 0) & (counts > 0)
    order = np.argsort(sizes[keep])
    return sizes[keep][order], counts[keep][order]


def first_digits(sizes, counts) -> np.ndarray:
    """Counts of first significant digits 1..9."""
    sizes, counts = _histogram(sizes, counts)
    if not len(sizes):
        return np.zeros(9)
    # the digit of 0.3 is 3, of 2999.9999999 is 2: scale into [1, 10) with a guard for float error
    scaled = sizes / 10.0 ** np.floor(np.log10(sizes))
    scaled = np.where(scaled >= 10 - 1e-12, scaled / 10, scaled)
    digits = np.clip(np.floor(scaled + 1e-12).astype(int), 1, 9)
    return np.bincount(digits, weights=counts, minlength=10)[1:]


def benford(sizes, counts) -> dict:
    observed = first_digits(sizes, counts)
    n = float(observed.sum())
    if not n:
        return {"trades": 0}
    shares = observed / n
    expected = BENFORD * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    mad = float(np.abs(shares - BENFORD).mean())
    return {"trades": int(n), "shares": [round(float(s), 4) for s in shares],
            "expected": [round(float(e), 4) for e in BENFORD], "chi2": round(chi2, 2),
            "p_value": float(stats.chi2.sf(chi2, 8)), "mad": round(mad, 4),
            "conformity": next((name for limit, name in MAD_BANDS if mad <= limit), "nonconforming")}


def weighted_median(sizes: np.ndarray, counts: np.ndarray) -> float:
    cumulative = np.cumsum(counts)
    return float(sizes[np.searchsorted(cumulative, cumulative[-1] / 2)])


def clustering(sizes, counts) -> dict:
    sizes, counts = _histogram(sizes, counts)
    n = float(counts.sum())
    if not n:
        return {"trades": 0}
    unit = 10.0 ** math.floor(math.log10(weighted_median(sizes, counts)))
    step = unit / 10
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])

    def exactly(size: float) -> float:                        # trades of this size (to float error)
        low, high = size - step * 1e-6, size + step * 1e-6
        return float(cumulative[np.searchsorted(sizes, high, "left")] - cumulative[np.searchsorted(sizes, low, "left")])

    top = float(sizes[np.searchsorted(cumulative[1:], 0.99 * n)])    # round sizes up to the 99th percentile
    at, beside = [], []
    for m in range(1, max(1, int(top / unit)) + 1):
        r = m * unit
        at.append(exactly(r))
        beside.append(sum(exactly(r + j * step) for j in range(-NEIGHBOURS, NEIGHBOURS + 1) if j) / (2 * NEIGHBOURS))
    at_arr, beside_arr = np.array(at), np.array(beside)
    # the t of log((at + 1) / (beside + 1)) over the round sizes: 100 shares and 3,000 shares weigh alike
    ratios = np.log((at_arr + 1) / (beside_arr + 1))
    if len(ratios) > 1 and ratios.std(ddof=1) > 0:
        t = float(ratios.mean() / (ratios.std(ddof=1) / math.sqrt(len(ratios))))
    else:       # one round size: its count against the neighbours' as a Poisson z
        t = float((at_arr - beside_arr).sum() / math.sqrt(max(beside_arr.sum(), 1.0)))
    on_unit = np.isclose(sizes / unit, np.round(sizes / unit), rtol=0, atol=1e-6)
    return {"trades": int(n), "unit": unit, "round_sizes": len(at), "at_round": int(at_arr.sum()),
            "index": round(float((at_arr.sum() + 1) / (beside_arr.sum() + 1)), 2), "t": round(t, 2),
            "round_share": round(float(counts[on_unit].sum() / n), 4)}


def tail(sizes, counts, share: float = TAIL_SHARE) -> dict:
    """Hill estimator of the Pareto exponent over the largest `share` of trades."""
    sizes, counts = _histogram(sizes, counts)
    n = float(counts.sum())
    if not n:
        return {"trades": 0}
    above = np.cumsum(counts[::-1])[::-1]                     # trades at or above each size
    k_index = int(np.searchsorted(-above, -share * n, "left"))   # smallest size with <= share of trades above
    threshold = sizes[min(k_index, len(sizes) - 1)]
    larger = sizes > threshold
    k = float(counts[larger].sum())
    if not k:
        return {"trades": int(n), "alpha": None, "k": 0}
    alpha = k / float((counts[larger] * np.log(sizes[larger] / threshold)).sum())
    return {"trades": int(n), "alpha": round(alpha, 3), "k": int(k), "threshold": float(threshold)}


def volume_volatility(volumes, closes) -> dict:
    """Each minute's volume against the |log return| from the previous minute's close."""
    volumes, closes = np.asarray(volumes, dtype=float), np.asarray(closes, dtype=float)
    ok = np.isfinite(closes[1:]) & np.isfinite(closes[:-1]) & (closes[:-1] > 0) & (closes[1:] > 0)
    moves = np.abs(np.log(closes[1:][ok] / closes[:-1][ok]))
    volume = volumes[1:][ok]
    if len(moves) < 3 or np.ptp(moves) == 0 or np.ptp(volume) == 0:
        return {"minutes": int(len(moves)), "rho": None, "t": None}
    rho = float(stats.spearmanr(volume, moves).statistic)
    t = rho * math.sqrt((len(moves) - 2) / max(1 - rho * rho, 1e-12))
    return {"minutes": int(len(moves)), "rho": round(rho, 3), "t": round(t, 2)}


def quality(sizes, counts, volumes=(), closes=()) -> dict:
    """Every statistic, the signs of fake volume among them and a verdict."""
    result = {"benford": benford(sizes, counts), "clustering": clustering(sizes, counts),
              "tail": tail(sizes, counts), "volume_volatility": volume_volatility(volumes, closes)}
    signs = []
    c, b, t, v = result["clustering"], result["benford"], result["tail"], result["volume_volatility"]
    judged = c.get("trades", 0) >= MIN_TRADES
    if judged:
        clustered = c["index"] >= CLUSTER_MIN_INDEX and c["t"] >= MIN_T
        if not clustered:
            signs.append(f"no round-size clustering (index {c['index']:g}, t {c['t']:g})")
        if b["conformity"] == "nonconforming" and not clustered:
            signs.append(f"first digits far from Benford's law (MAD {b['mad']:g}) and not from round lots")
        if t.get("alpha") is not None and not TAIL_BAND[0] <= t["alpha"] <= TAIL_BAND[1]:
            signs.append(f"size tail exponent {t['alpha']:g} outside {TAIL_BAND[0]:g}–{TAIL_BAND[1]:g}")
    if v["minutes"] >= MIN_MINUTES and v["rho"] is not None and v["t"] < MIN_T:
        signs.append(f"volume unrelated to price moves (Spearman {v['rho']:g}, t {v['t']:g})")
    result["signs"] = signs
    if not judged and v["minutes"] < MIN_MINUTES:
        result["verdict"] = "too few trades to judge"
    else:
        result["verdict"] = "remarkable" if signs else "unremarkable"
    return result


def per_symbol_day(histograms, minutes) -> list[dict]:
    """`quality` of each (symbol, day) from the frames of store.queries.size_histograms and
    minute_volumes."""
    out = []
    candles = {key: group for key, group in minutes.groupby(["symbol", "day"])} if len(minutes) else {}
    for (symbol, day), group in histograms.groupby(["symbol", "day"]):
        minute = candles.get((symbol, day))
        volumes, closes = ((minute["volume"].to_numpy(), minute["close"].to_numpy()) if minute is not None else ((), ()))
        out.append({"symbol": symbol, "day": str(day), **quality(group["size"].to_numpy(), group["trades"].to_numpy(),
                                                                  volumes, closes)})
    return out
