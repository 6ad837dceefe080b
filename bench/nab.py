#!/usr/bin/env python3
"""How well the default series detector (`analyze --csv`, series.Likelihood) holds on series it
was not tuned on.

1. NAB's standard profile over every file of ../shared/data/nab, and per category.
2. Leave one category out: for each labelled category, the setting of a small grid (tail
   probability × averaging span × refractory span) best on the other categories (the series with
   no anomaly included), scored on the one left out — the score a category gets when nothing was
   chosen on it. The default is the grid's setting best on all of them.
3. The generated daily-cycle series (evaluate.daily_cycle_series), which no setting was chosen on,
   and the generated series of other shapes, rates and units (evaluate.other_shape_series) on seeds
   no setting was chosen on.
Each with the daily cycle (the default) and without it (period=None, the detector before it), so
the gain is measured in one run.
"""
from __future__ import annotations

import argparse
import itertools
import time
from functools import partial
from pathlib import Path

from common import report

from tradewatch.config import shared_data_dir
from tradewatch.detect import evaluate
from tradewatch.detect.series import likelihood

GRID = {"tail": (3e-2, 1e-2, 3e-3), "short": (6, 12, 24), "refractory": (72, 144, 288)}


def per_file_raw(files: dict, detect) -> dict:
    out = {}
    for name, (category, series, spans) in files.items():
        flagged = series.index.isin(detect(series).index)
        raw, windows, _ = evaluate.nab_raw_score(list(flagged), series.index, spans)
        out[name] = (category, raw, windows)
    return out


def score(raws: dict, categories) -> float:
    raw = sum(r[1] for r in raws.values() if r[0] in categories)
    windows = sum(r[2] for r in raws.values() if r[0] in categories)
    return round(100 * (raw + windows) / (2 * windows), 1)


def leave_one_out(files: dict, daily: bool) -> dict:
    categories = sorted({f[0] for f in files.values()})
    labelled = [c for c in categories if any(f[2] for f in files.values() if f[0] == c)]
    settings = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    extra = {} if daily else {"period": None}
    raws = [per_file_raw(files, partial(likelihood, **s, **extra)) for s in settings]
    result = {}
    for left_out in labelled:
        others = [c for c in categories if c != left_out]
        best = max(range(len(settings)), key=lambda i: score(raws[i], others))
        result[left_out] = {"score": score(raws[best], [left_out]), "setting_chosen_on_the_others": settings[best]}
    best_all = max(range(len(settings)), key=lambda i: score(raws[i], categories))
    result["mean"] = round(sum(r["score"] for r in result.values()) / len(labelled), 1)
    result["best_on_all"] = {"score": score(raws[best_all], categories), "setting": settings[best_all]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nab-dir", type=Path, default=shared_data_dir() / "nab")
    args = parser.parse_args()
    started = time.perf_counter()
    files = evaluate.load_nab(args.nab_dir)
    detectors = {"daily_cycle": likelihood, "no_daily_cycle": partial(likelihood, period=None)}
    nab = evaluate.score_nab(args.nab_dir, detectors)
    cycles = evaluate.score_daily_cycles(detectors=detectors)
    shapes = evaluate.score_other_shapes(detectors=detectors)
    report({
        "files": len(files),
        "nab_default": {name: {"score": nab["score"][name],
                               "per_category": {c: v["score"] for c, v in nab["per_category"][name].items()},
                               "detections_outside_windows": sum(v["detections_outside_windows"]
                                                                 for v in nab["per_category"][name].values())}
                        for name in detectors},
        "leave_one_category_out": {"daily_cycle": leave_one_out(files, True),
                                   "no_daily_cycle": leave_one_out(files, False)},
        "daily_cycle_series": {name: cycles[name]["score"] for name in detectors},
        "other_shape_series": {name: {"score": shapes[name]["score"],
                                      "per_kind": {kind: [v["detected"], v["detections_outside_windows"]]
                                                   for kind, v in shapes[name]["per_kind"].items()}}
                               for name in detectors},
        "seconds": round(time.perf_counter() - started, 1),
    })


if __name__ == "__main__":
    main()
