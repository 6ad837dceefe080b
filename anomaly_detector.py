#!/usr/bin/env python3
"""Anomaly detection: train the Isolation Forest, analyze trades or any CSV series, run live, evaluate,
backtest changed settings on stored trades."""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from tradewatch.alerts import PRECISION_MIN_MARKED, per_rule
from tradewatch.cli import StopFlag, cores, iso_time, load_settings, positive_int, setup_logging
from tradewatch.config import Settings, shared_data_dir
from tradewatch.detect import evaluate, forecast, forest
from tradewatch.detect.pipeline import DetectionPipeline
from tradewatch.detect.rules import RuleDetector
from tradewatch.detect.series import SERIES_DETECTORS
from tradewatch import backtest, runtime
from tradewatch.stages.detector import detector_config, load_model, rule_detector
from tradewatch.stages.detector import run as run_detector
from tradewatch.store import db, queries




def symbols_arg(text: str) -> list[str]:
    return [s.strip().upper() for s in text.split(",") if s.strip()]


def cmd_train(args, settings: Settings) -> int:
    conn = db.connect(settings)
    counts = queries.trade_counts(conn, args.symbols, args.since, args.until)
    need = forest.MIN_TRAIN_TRADES
    for symbol in args.symbols or []:
        if counts.get(symbol, 0) < need:
            print(f"error: {symbol} has {counts.get(symbol, 0)} trades in that range, training needs at least {need}",
                  file=sys.stderr)
            return 2
    usable = sorted(s for s, n in counts.items() if n >= need)
    skipped = {s: n for s, n in counts.items() if n < need}
    if skipped:
        print(f"skipping symbols with fewer than {need} trades: {skipped}", file=sys.stderr)
    if not usable:
        print(f"error: not enough data: {sum(counts.values())} trades in that range "
              f"(best symbol: {max(counts.values(), default=0)}), training needs at least {need} for a symbol",
              file=sys.stderr)
        return 2
    rules = RuleDetector(detector_config(settings))
    rows, first, last = [], None, None
    for trade in queries.iter_trades(conn, usable, args.since, args.until):
        d = rules.process(trade)
        first = first if first is not None else trade.timestamp_ms
        last = trade.timestamp_ms
        if d.features.history >= rules.config.min_history:
            rows.append(d.features.vector())
    training = {"symbols": {s: counts[s] for s in usable}, "rows": len(rows), "pooled": True,
                "from": utc_iso(first), "until": utc_iso(last)}
    try:
        model = forest.train(np.array(rows), training)
    except forest.NotEnoughData as error:
        print(f"error: not enough data: {error}", file=sys.stderr)
        return 2
    path = forest.save(model, settings.model_path)
    candles = queries.final_candles_frame(conn, args.symbols, args.since, args.until)
    conn.close()
    print(json.dumps({"model": str(path), "version": model.version, **training,
                      "forecast": train_forecast(candles, settings)}, indent=2))
    return 0


def utc_iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat()


def train_forecast(candles: pd.DataFrame, settings: Settings) -> dict:
    """The volatility forecaster from the final candles, saved beside the forest when a window size
    had enough of them; per size what was chosen and how it scored walk-forward (all in the .json)."""
    fitted, report = forecast.train(candles)
    sizes = {label: r if "skipped" in r else
             {"windows": r["windows"], "chosen": r["chosen"],
              "model_qlike_vs_ewma": round(r["walk_forward"]["model"]["qlike_vs_ewma"], 4),
              "coverage_90": round(r["walk_forward"][r["chosen"]]["coverage_90"], 4)} for label, r in report.items()}
    if not fitted:
        return {"model": None, "sizes": sizes or "no final candles in that range"}
    training = {"symbols": sorted(candles["symbol"].unique()), "from": utc_iso(int(candles["start_ms"].min())),
                "until": utc_iso(int(candles["start_ms"].max()))}
    path, version = forecast.save(fitted, report, training, settings.model_path)
    return {"model": str(path), "version": version, "sizes": sizes}


def cmd_analyze(args, settings: Settings) -> int:
    if args.csv:
        return analyze_csv(args)
    conn = db.connect(settings)
    pipeline = DetectionPipeline(rule_detector(settings), load_model(settings))
    per_symbol: dict[str, dict] = {}
    top = []
    batch = []
    symbols = [args.symbol.upper()] if args.symbol else None

    def flush():
        for d in pipeline.process(batch):
            stats = per_symbol.setdefault(d.trade.symbol, {"trades": 0, "anomalies": 0, "by_type": Counter(),
                                                            "by_severity": Counter()})
            stats["trades"] += 1
            if d.is_anomaly:
                stats["anomalies"] += 1
                stats["by_type"].update(d.types)
                stats["by_severity"][d.severity] += 1
                top.append(d)
        batch.clear()

    for trade in queries.iter_trades(conn, symbols, args.since, args.until):
        batch.append(trade)
        if len(batch) >= 5000:
            flush()
    flush()
    conn.close()
    engine = queries.engine_for(settings.sqlalchemy_url)
    rules = per_rule(queries.rule_precision(engine, symbols, args.since, args.until))
    engine.dispose()
    top.sort(key=lambda d: d.score, reverse=True)
    report = {"symbols": {s: {**v, "by_type": dict(v["by_type"]), "by_severity": dict(v["by_severity"])}
                          for s, v in sorted(per_symbol.items())},
              "top_anomalies": [{"time": d.trade.event_time.isoformat(), "symbol": d.trade.symbol,
                                 "price": d.trade.price, "quantity": d.trade.quantity,
                                 "move_pct": round(d.features.deviation * 100, 3), "score": round(d.score, 3),
                                 "severity": d.severity, "types": d.types} for d in top[:args.top]],
              "rules": rules}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not per_symbol:
        print("no trades in that range")
        return 0
    print(f"{'symbol':10} {'trades':>9} {'anomalies':>9}  by type / severity")
    for symbol, s in report["symbols"].items():
        print(f"{symbol:10} {s['trades']:>9,} {s['anomalies']:>9,}  {s['by_type'] or '-'} {s['by_severity'] or ''}")
    print(f"\ntop {len(report['top_anomalies'])} anomalies by score:")
    for a in report["top_anomalies"]:
        print(f"  {a['time']}  {a['symbol']:8} price {a['price']:>12,.4f}  move {a['move_pct']:+7.2f}%  "
              f"score {a['score']:6.2f}  {a['severity']:8} {','.join(a['types'])}")
    print_rules(rules)
    return 0


def print_rules(rules: list[dict]) -> None:
    """The stored alerts per rule and what analysts said of them."""
    if not rules:
        print("\nno stored alerts in that range")
        return
    print(f"\nstored alerts by rule (precision once {PRECISION_MIN_MARKED} are marked true or false positive):")
    print(f"  {'rule':18} {'alerts':>7} {'true':>6} {'false':>6} {'review':>6}  precision")
    for r in rules:
        shown = "—" if r["precision"] is None else f"{r['precision']:.0%}"
        print(f"  {r['rule']:18} {r['alerts']:>7,} {r['true_positive']:>6,} {r['false_positive']:>6,} "
              f"{r['needs_review']:>6,}  {shown}")


def analyze_csv(args) -> int:
    try:
        frame = pd.read_csv(args.csv)
        times = pd.to_datetime(frame[args.time_column])
        values = pd.to_numeric(frame[args.value_column], errors="coerce")
    except (OSError, KeyError, ValueError) as error:
        print(f"error: cannot read {args.csv}: {error!r} (columns: --time-column / --value-column)", file=sys.stderr)
        return 2
    series = pd.Series(values.to_numpy(dtype=float), index=times).dropna().sort_index()
    # Some real series repeat a timestamp (two readings in one interval): one point per time, the mean.
    duplicates = int(series.index.duplicated().sum())
    if duplicates:
        series = series.groupby(level=0).mean()
        print(f"note: {duplicates} repeated timestamps in {args.csv} averaged into one point each", file=sys.stderr)
    detectors = [args.detector] if args.detector else [d for d in SERIES_DETECTORS if d != "zscore_baseline"]
    out = {"file": str(args.csv), "points": len(series), "repeated_timestamps_averaged": duplicates, "detectors": {}}
    for name in detectors:
        flags = SERIES_DETECTORS[name](series)
        out["detectors"][name] = [{"timestamp": t.isoformat(), "value": float(series[t]), "score": round(float(s), 3)}
                                  for t, s in flags.items()]
    print(json.dumps(out, indent=2))
    return 0


def cmd_evaluate(args, settings: Settings) -> int:
    forecasts = evaluate.score_forecasts(Path(args.lean_dir), settings.ohlc_excluded)
    if args.forecasts:
        print_forecasts(forecasts)
        return 0
    config = detector_config(settings)
    seeds = [int(s) for s in args.seeds.split(",")]
    model = evaluate.train_on_simulation(args.train_seed, args.trades, args.anomaly_rate, config)
    result = {
        "simulated_rules": evaluate.score_simulated(seeds, args.trades, args.anomaly_rate, config),
        "simulated_rules_and_forest": evaluate.score_simulated(seeds, args.trades, args.anomaly_rate, config, model),
        "real_trades_rules": evaluate.score_real(Path(args.lean_dir), config),
        "real_trades_rules_and_forest": evaluate.score_real(Path(args.lean_dir), config, model),
        "out_of_range_recorded_days": evaluate.score_out_of_range(Path(args.lean_dir), config, settings.ohlc_excluded),
        "pumps_illiquid_rules": evaluate.score_pumps(seeds, config=config),
        "pumps_illiquid_rules_and_forest": evaluate.score_pumps(seeds, config=config, model=model),
        "pumps_illiquid_wide_spreads_rules": evaluate.score_spreads(seeds, config=config),
        "pumps_illiquid_conditions_rules": evaluate.score_conditions(seeds, config=config),
        "nab": evaluate.score_nab(Path(args.nab_dir)) if Path(args.nab_dir).is_dir() else "NAB data not found",
        "series_daily_cycles": evaluate.score_daily_cycles(),
        "series_other_shapes": evaluate.score_other_shapes(),
        "book_simulated": evaluate.score_book(),
        "forecasts": forecasts,
    }
    print(json.dumps(result, indent=2))
    return 0


def print_forecasts(result: dict) -> None:
    """The walk-forward scores of the forecasters, one block per data set and size."""
    print("Forecasts of the next window's variance, walk-forward (each block forecast by forecasters fitted only on"
          "\nwindows before it). QLIKE: lower is better; MSE of σ and of the range as a multiple of the EWMA's;"
          "\ncoverage: the share of windows whose high and low stayed inside the 90 % band.")
    for data, r in result.items():
        print(f"\n{data}: {r['symbols']} symbol(s), {r['windows']:,} windows — the product uses {r['chosen']}")
        print(f"  {'forecaster':10} {'forecasts':>9} {'QLIKE':>9} {'vs EWMA':>8} {'MSE σ':>7} {'MSE range':>9} "
              f"{'coverage':>8}")
        for name, f in r["forecasters"].items():
            print(f"  {name:10} {f['forecasts']:>9,} {f['qlike']:>9.3f} {f['qlike_vs_ewma']:>+8.3f} "
                  f"{f['mse_sigma_vs_ewma']:>6.2f}x {f['mse_range_vs_ewma']:>8.2f}x {f['coverage_90']:>8.1%}")


def cmd_backtest(args, settings: Settings) -> int:
    if args.until <= args.since:
        print("error: --until must be after --since", file=sys.stderr)
        return 2
    try:
        variant, changes = backtest.changed(settings, args.set or [])
    except backtest.BadSetting as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    variants = {"today": backtest.Variant(settings)}
    if changes:
        variants["changed"] = variant
    conn = db.connect(settings)
    try:
        result = backtest.run(settings, conn, args.since, args.until, args.symbols, variants, load_model(settings),
                              args.workers)
        report = backtest.summary(result, backtest.stored(conn, args.since, args.until, args.symbols), args.since,
                                  args.until, args.symbols, changes)
    finally:
        conn.close()
    print(json.dumps(report, indent=2) if args.json else backtest.text(report))
    return 0


def describe_quality(q: dict) -> str:
    """One line of market-quality statistics (tradewatch/detect/quality.py) for a symbol-day."""
    b, c, t, v = q["benford"], q["clustering"], q["tail"], q["volume_volatility"]
    parts = [f"{q['symbol']} {q['day']}: {q['verdict']}", f"{b['trades']:,} trades"]
    if b["trades"]:
        parts += [f"Benford MAD {b['mad']:g} ({b['conformity']})",
                  f"round sizes (x{c['unit']:g}) {c['index']:g}x their neighbours (t {c['t']:g}, "
                  f"{c['round_share']:.0%} of trades)",
                  f"size tail exponent {t['alpha']:g}" if t.get("alpha") is not None else "no size tail"]
    parts.append(f"volume ~ |1-min return| Spearman {v['rho']:g} (t {v['t']:g}, {v['minutes']} minutes)"
                 if v["rho"] is not None else f"volume ~ |return|: {v['minutes']} minutes, not computed")
    line = " · ".join(parts)
    return line + "".join(f"\n    sign: {sign}" for sign in q["signs"])


def cmd_quality(args, settings: Settings) -> int:
    from tradewatch.detect import quality     # scipy.stats: 0.7 s of CPU a live detector's start does not need

    engine = queries.engine_for(settings.sqlalchemy_url)
    symbols = [args.symbol.upper()] if args.symbol else None
    histograms = queries.size_histograms(engine, symbols, args.since, args.until)
    if histograms.empty:
        print(f"error: no trades{' of ' + symbols[0] if symbols else ''} in that range", file=sys.stderr)
        return 2
    results = quality.per_symbol_day(histograms, queries.minute_volumes(engine, symbols, args.since, args.until))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for q in results:
            print(describe_quality(q))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Detect unusual trades: rules (price move, circuit breaker, "
                                     "whale volume, z-score, momentum runs) and an Isolation Forest.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the Isolation Forest from the trades table and the volatility "
                           "forecaster from the final candles; save a new version of each")
    train.add_argument("--symbols", type=symbols_arg, help="comma-separated (default: every symbol with enough data)")
    train.add_argument("--since", type=iso_time)
    train.add_argument("--until", type=iso_time)
    analyze = sub.add_parser("analyze", help="report anomalies per symbol, or flag points of a CSV series")
    analyze.add_argument("symbol", nargs="?")
    analyze.add_argument("--since", type=iso_time)
    analyze.add_argument("--until", type=iso_time)
    analyze.add_argument("--top", type=int, default=10)
    analyze.add_argument("--json", action="store_true", help="machine-readable output")
    analyze.add_argument("--csv", type=Path, help="any CSV time series instead of the trades table")
    analyze.add_argument("--time-column", default="timestamp")
    analyze.add_argument("--value-column", default="value")
    analyze.add_argument("--detector", choices=sorted(SERIES_DETECTORS))
    sub.add_parser("run", help="consume `trades` live: flag trades, raise alerts")
    qual = sub.add_parser("quality", help="market-quality statistics per symbol and day (Benford, round-size "
                                          "clustering, size tail, volume against volatility): signs of fake volume")
    qual.add_argument("symbol", nargs="?")
    qual.add_argument("--since", type=iso_time)
    qual.add_argument("--until", type=iso_time)
    qual.add_argument("--json", action="store_true", help="machine-readable output")
    ev = sub.add_parser("evaluate", help="precision/recall/F1 on simulated data; NAB window scores")
    ev.add_argument("--seeds", default="101,102,103", help="simulator seeds to score on")
    ev.add_argument("--train-seed", type=int, default=1, help="seed of the Isolation Forest's training stream")
    ev.add_argument("--trades", type=int, default=50_000, help="trades per seed")
    ev.add_argument("--anomaly-rate", type=float, default=0.005)
    ev.add_argument("--nab-dir", default=str(shared_data_dir() / "nab"))
    ev.add_argument("--lean-dir", default=str(shared_data_dir() / "lean"),
                    help="recorded trading days the real-data evaluation injects anomalies into")
    ev.add_argument("--forecasts", action="store_true",
                    help="only the volatility forecasts against their baselines, as a table")
    back = sub.add_parser("backtest", help="replay stored trades (database and archive) through the live "
                                           "detection code with today's settings and changed ones; writes nothing")
    back.add_argument("--since", type=iso_time, required=True)
    back.add_argument("--until", type=iso_time, required=True)
    back.add_argument("--symbols", type=symbols_arg, help="comma-separated (default: every symbol)")
    back.add_argument("--set", action="append", metavar="NAME=VALUE",
                      help="a detection setting or rule parameter to try, e.g. zscore_threshold=10 (repeatable)")
    back.add_argument("--workers", type=positive_int, default=cores(),
                      help="processes replaying symbols side by side (default: this machine's cores, %(default)s)")
    back.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    setup_logging()
    settings = load_settings()
    try:
        if args.command == "train":
            return cmd_train(args, settings)
        if args.command == "analyze":
            return cmd_analyze(args, settings)
        if args.command == "evaluate":
            return cmd_evaluate(args, settings)
        if args.command == "quality":
            return cmd_quality(args, settings)
        if args.command == "backtest":
            return cmd_backtest(args, settings)
        run_detector(settings, StopFlag())
        return 0
    except runtime.StageFailed:
        return 1            # the stage logged why
    except (db.DatabaseUnavailable, db.DatabaseRefused) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
