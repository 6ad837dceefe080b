"""`python anomaly_detector.py backtest`: stored trades replayed through the live detector's own
code — DetectionPipeline, alerts_for and the Deduplicator, built from the settings exactly as
tradewatch/stages/detector.py builds them — once with today's settings and once with changed ones
(`--set NAME=VALUE`), side by side. Writes nothing.

Trades come from the database and, for the spans `maintain` archived and dropped, from the Parquet
archive, in the order the live detector saw them (per symbol: event time, then Kafka position).
A symbol's state is its own (rolling windows, tick size, breaker, pump watch, alert cooldowns), so
the order between symbols does not matter: an archived span is read one symbol at a time, and the
symbols are split among processes, one per core (`--workers`), each replaying its own. Every
symbol is warmed up on the day before `--since` (its alerts not counted), as the live detector
had been: its windows (the last 50 prices, the largest of the last 1,000 sizes and of the past
day's, the whale's reference), tick, band and pump baseline are then the live one's (up to what
decayed before that day), so today's settings give the stored alert ids over a range the live
detector covered.

Scored against what is known: analysts' dispositions of the stored alerts (store/detections.py)
and the simulator's injected labels on the trades (an alert on a labelled trade is a true one).
"""
from __future__ import annotations

import heapq
import math
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Iterator, NamedTuple

import pyarrow.compute as pc
import pyarrow.parquet as pq

from tradewatch import maintain
from tradewatch.alerts import Deduplicator, alerts_for, precision
from tradewatch.config import Settings
from tradewatch.detect.features import WHALE_DAY_MS
from tradewatch.detect.forest import ForestModel
from tradewatch.detect.pipeline import DetectionPipeline
from tradewatch.detect.rules import DetectorConfig
from tradewatch.events import Trade
from tradewatch.stages.detector import detector_config, rule_detector
from tradewatch.store import db, queries

# the settings detection reads (stages/detector.py): through detector_config and the Deduplicator
DETECTION_SETTINGS = ("zscore_window", "zscore_threshold", "breaker_cool_off_seconds", "out_of_range_widths",
                      "alert_cooldown_critical_seconds", "alert_cooldown_high_seconds", "alert_cooldown_medium_seconds")
# the DetectorConfig fields a setting gives
FROM_SETTINGS = {"price_window", "zscore_threshold", "cool_off_s", "range_widths"}
RULE_PARAMETERS = tuple(f.name for f in fields(DetectorConfig) if f.name not in FROM_SETTINGS)
BATCH = 5_000
WARM_UP = timedelta(milliseconds=WHALE_DAY_MS)     # the detector's longest memory


class Raised(NamedTuple):
    """What the summary needs of an alert a variant raised; not its evidence, with which the
    alerts of a week of the demo's feed took 1 GB."""
    alert_id: str
    alert_type: str
    timestamp_ms: int
    trade_id: str


class BadSetting(ValueError):
    """A --set that names nothing detection reads, or a value out of its range."""


@dataclass
class Variant:
    """One way of detecting: the settings the live detector would be started with, and the rule
    parameters that have no setting of their own."""
    settings: Settings
    rules: dict = field(default_factory=dict)

    @property
    def config(self) -> DetectorConfig:
        return replace(detector_config(self.settings), **self.rules)


def changed(today: Settings, pairs: list[str]) -> tuple[Variant, dict[str, tuple]]:
    """The variant `--set NAME=VALUE …` describes, and each change as (today's value, new value)."""
    settings_changes, rules, shown = {}, {}, {}
    defaults = DetectorConfig()
    for pair in pairs:
        name, equals, raw = pair.partition("=")
        name = name.strip().lower()
        if not equals or not raw.strip():
            raise BadSetting(f"--set needs NAME=VALUE, got {pair!r}")
        if name in DETECTION_SETTINGS:
            kind, before = type(getattr(today, name)), getattr(today, name)
        elif name in RULE_PARAMETERS:
            kind, before = type(getattr(defaults, name)), getattr(defaults, name)
        else:
            raise BadSetting(f"--set {name}: not something detection reads; one of "
                             f"{', '.join(DETECTION_SETTINGS + RULE_PARAMETERS)}")
        try:
            value = kind(raw) if kind is float else int(raw)
        except ValueError:
            raise BadSetting(f"--set {name} must be {'a whole number' if kind is int else 'a number'}, "
                             f"got {raw!r}") from None
        if name in RULE_PARAMETERS and not (math.isfinite(value) and value > 0):
            raise BadSetting(f"--set {name} must be a finite number more than 0, got {raw!r}")
        (settings_changes if name in DETECTION_SETTINGS else rules)[name] = value
        shown[name] = (before, value)
    try:
        settings = today.with_overrides(**settings_changes)
    except ValueError as error:              # the settings' own range check, naming the setting
        raise BadSetting(f"--set: {error}") from None
    return Variant(settings, rules), shown


class Replay:
    """The live detector stage's detection, without Kafka and the database: the pipeline, one alert
    per type of a flagged trade, the cooldowns; a symbol silent for SYMBOL_IDLE_EVICT_SECONDS
    forgotten and warmed up afresh, as the stage evicts it."""

    def __init__(self, variant: Variant, model: ForestModel | None):
        self.pipeline = DetectionPipeline(rule_detector(variant.settings, variant.config), model)
        self.dedup = Deduplicator.from_settings(variant.settings)
        self.idle_ms = variant.settings.symbol_idle_evict_seconds * 1000
        self.last_ms: dict[str, int] = {}
        self.alerts: list[Raised] = []

    def process(self, trades: list[Trade]) -> None:
        start = 0
        for i, t in enumerate(trades):
            last = self.last_ms.get(t.symbol)
            if last is not None and t.timestamp_ms - last > self.idle_ms:
                self._detect(trades[start:i])
                start = i
                self.pipeline.rules.forget({t.symbol})
                self.dedup.forget({t.symbol})
            self.last_ms[t.symbol] = t.timestamp_ms if last is None else max(last, t.timestamp_ms)
        self._detect(trades[start:])

    def _detect(self, trades: list[Trade]) -> None:
        for d in self.pipeline.process(trades):
            if d.is_anomaly:
                self.alerts += [Raised(a.alert_id, a.alert_type, a.timestamp_ms, a.trade_id)
                                for a in alerts_for(d) if self.dedup.allow(a)]


def pieces(settings: Settings, since: datetime, until: datetime) -> list[tuple[datetime, datetime, list]]:
    """[since, until) cut at the spans `maintain` archived (with their files) and the rest (no files)."""
    out, at = [], since
    for span, files in maintain.archived(settings, "trades", "ts"):
        start, end = max(span.start, at), min(span.end, until)
        if start >= end:
            continue
        if start > at:
            out.append((at, start, []))
        out.append((start, end, files))
        at = end
    if at < until:
        out.append((at, until, []))
    return out


def archived_rows(conn, files: list, symbols: list[str] | None, since: datetime, until: datetime) -> Iterator[tuple]:
    """The rows of an archived span in [since, until), as queries.trade_rows gives them, one symbol
    at a time (a span never sits in memory whole): the archive's merged with any the database holds
    in the span (archived and not dropped yet, or arrived since), each trade once."""
    if symbols is None:
        found = set(queries.trade_counts(conn, None, since, until))
        for f in files:
            found |= set(pc.unique(pq.read_table(f, columns=["symbol"]).column(0)).to_pylist())
        symbols = sorted(found)
    for symbol in symbols:
        table = pq.read_table(files, filters=[("symbol", "=", symbol), ("ts", ">=", since), ("ts", "<", until)])
        table = table.sort_by([("ts", "ascending"), ("kafka_partition", "ascending"), ("kafka_offset", "ascending")])
        ms = pc.divide(table.column("ts").cast("int64"), 1000)     # µs since the epoch (stored from ms)
        archive = zip(*[table.column(c).to_pylist() for c in ("trade_id", "symbol")], ms.to_pylist(), *[
            table.column(c).to_pylist() for c in ("price", "quantity", "side", "exchange", "bid", "ask", "condition",
                                                 "injected_anomaly")])
        seen = set()
        for row in heapq.merge(archive, queries.trade_rows(conn, [symbol], since, until), key=lambda r: r[2]):
            if (row[0], row[2]) not in seen:
                seen.add((row[0], row[2]))
                yield row


def run(settings: Settings, conn, since: datetime, until: datetime, symbols: list[str] | None,
        variants: dict[str, Variant], model: ForestModel | None, workers: int = 1) -> dict:
    """Every variant over the stored trades of [since, until), warmed up on the day before; their
    alerts from `since` on, the trades read by source (warm_up, database, archive) and the labels.
    With `workers` > 1 the symbols are split into that many groups of about equal trades, each
    replayed by a process of its own: a symbol's state is its own, so the alerts are one process's."""
    started = time.perf_counter()
    groups = split(settings, conn, since, until, symbols, workers) if workers > 1 else [symbols]
    if len(groups) > 1:
        with ProcessPoolExecutor(len(groups), mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(partial(_replay_apart, settings, since, until, variants, model), groups))
    else:
        parts = [replay(settings, conn, since, until, groups[0], variants, model)]
    in_order = {name: sorted((a for p in parts for a in p["alerts"][name]), key=lambda a: (a.timestamp_ms, a.alert_id))
                for name in variants}
    return {"alerts": in_order,
            "read": dict(sum((Counter(p["read"]) for p in parts), Counter())),
            "labels": {trade: label for p in parts for trade, label in p["labels"].items()},
            "seconds": time.perf_counter() - started}


def split(settings: Settings, conn, since: datetime, until: datetime, symbols: list[str] | None,
          workers: int) -> list[list[str] | None]:
    """The symbols with trades in the range (warm-up included) in at most `workers` groups of about
    equal trades: the busiest first, each to the group with the fewest so far."""
    counts = Counter(queries.trade_counts(conn, symbols, since - WARM_UP, until))
    conn.commit()
    for start, end, files in pieces(settings, since - WARM_UP, until):
        for f in files:
            column = pq.read_table(f, columns=["symbol"], filters=[("ts", ">=", start), ("ts", "<", end)]).column(0)
            counts.update({c["values"]: c["counts"] for c in pc.value_counts(column).to_pylist()
                           if symbols is None or c["values"] in symbols})
    loads = [0] * min(workers, len(counts))
    groups: list[list[str]] = [[] for _ in loads]
    for symbol, n in counts.most_common():
        least = loads.index(min(loads))
        loads[least] += n
        groups[least].append(symbol)
    return [sorted(g) for g in groups] or [symbols]


def _replay_apart(settings: Settings, since: datetime, until: datetime, variants: dict[str, Variant],
                  model: ForestModel | None, symbols: list[str]) -> dict:
    conn = db.connect(settings)
    try:
        return replay(settings, conn, since, until, symbols, variants, model)
    finally:
        conn.close()


def replay(settings: Settings, conn, since: datetime, until: datetime, symbols: list[str] | None,
           variants: dict[str, Variant], model: ForestModel | None) -> dict:
    """run() in one process: the trades of `symbols` (None: all) read in order, each batch through
    every variant."""
    replays = {name: Replay(v, model) for name, v in variants.items()}
    read, labels = Counter(), {}
    for start, end, files in pieces(settings, since - WARM_UP, since) + pieces(settings, since, until):
        source = "warm_up" if end <= since else "archive" if files else "database"
        rows = archived_rows(conn, files, symbols, start, end) if files else queries.trade_rows(conn, symbols, start,
                                                                                                end)
        batch = []
        for row in rows:
            batch.append(Trade(*row[:10]))         # the label stays out of the detector
            if row[10] is not None and source != "warm_up":
                labels[row[0]] = row[10]
            if len(batch) >= BATCH:
                for r in replays.values():
                    r.process(batch)
                read[source] += len(batch)
                batch = []
        for r in replays.values():
            r.process(batch)
        read[source] += len(batch)
        conn.commit()
    since_ms = since.timestamp() * 1000
    return {"alerts": {name: [a for a in r.alerts if a.timestamp_ms >= since_ms] for name, r in replays.items()},
            "read": read, "labels": labels}


def stored(conn, since: datetime, until: datetime, symbols: list[str] | None) -> dict[str, str | None]:
    """The detector's stored alerts of the range (the book's are not replayed here): alert id -> its
    disposition (None: not marked)."""
    with conn.cursor() as cur:
        cur.execute("SELECT alert_id, disposition FROM alerts WHERE source = 'detector' AND ts >= %s AND ts < %s"
                    " AND (%s::text[] IS NULL OR symbol = ANY(%s))", (since, until, symbols, symbols))
        found = dict(cur.fetchall())
    conn.commit()
    return found


def _day(alert: Raised) -> str:
    return datetime.fromtimestamp(alert.timestamp_ms / 1000, timezone.utc).date().isoformat()


def summary(result: dict, kept: dict[str, str | None], since: datetime, until: datetime,
            symbols: list[str] | None, changes: dict[str, tuple]) -> dict:
    """Per day and rule the alerts of each variant; per rule what analysts and labels say of them;
    how many stored alerts today's settings gave again."""
    alerts, labels = result["alerts"], result["labels"]
    names = list(alerts)
    per_day = Counter((_day(a), a.alert_type, name) for name in names for a in alerts[name])
    days = sorted({(d, rule) for d, rule, _ in per_day})
    rules = sorted({rule for _, rule in days})
    by_rule = {}
    for rule in rules:
        row = {"rule": rule}
        for name in names:
            mine = [a for a in alerts[name] if a.alert_type == rule]
            verdicts = Counter(kept.get(a.alert_id) for a in mine)
            true_, false_ = verdicts["true_positive"], verdicts["false_positive"]
            row[name] = {"alerts": len(mine), "true_positive": true_, "false_positive": false_,
                         "needs_review": verdicts["needs_review"], "precision": precision(true_, false_),
                         "on_labelled_trades": sum(a.trade_id in labels for a in mine)}
            if labels:
                row[name]["label_precision"] = round(row[name]["on_labelled_trades"] / len(mine), 4) if mine else None
        by_rule[rule] = row
    today = {a.alert_id for a in alerts["today"]}
    trades = sum(n for source, n in result["read"].items() if source != "warm_up")
    return {
        "since": since.isoformat(), "until": until.isoformat(), "symbols": symbols, "trades": trades,
        "read": result["read"], "labelled_trades": len(labels), "seconds": round(result["seconds"], 2),
        "trades_per_s": round(sum(result["read"].values()) / result["seconds"]) if result["seconds"] > 0 and trades
        else None,
        "changes": {k: {"today": a, "changed": b} for k, (a, b) in changes.items()},
        "alert_ids": {name: sorted(a.alert_id for a in alerts[name]) for name in names},
        "reproduced": {"stored": len(kept), "again": len(today & set(kept)),
                       "not_again": sorted(set(kept) - today)[:20], "not_stored": sorted(today - set(kept))[:20]},
        "days": [{"day": d, "rule": rule, **{name: per_day[(d, rule, name)] for name in names}} for d, rule in days],
        "rules": list(by_rule.values()),
    }


def text(report: dict) -> str:
    """The summary for a person: what was read, whether today's settings gave the stored alerts
    again, and per day and rule today's alerts beside the changed ones."""
    names = ["today", "changed"] if report["changes"] else ["today"]
    read = ", ".join(f"{source} {n:,}" for source, n in sorted(report["read"].items())) or "none"
    speed = f" ({report['trades_per_s']:,} trades/s)" if report["trades_per_s"] else ""
    lines = [f"backtest {report['since']} .. {report['until']}"
             f"{' of ' + ','.join(report['symbols']) if report['symbols'] else ''}: {report['trades']:,} trades"
             f" ({read}) in {report['seconds']:g} s{speed}"]
    for name, change in report["changes"].items():
        lines.append(f"  changed: {name} {change['today']:g} -> {change['changed']:g}")
    r = report["reproduced"]
    unstored = len(report["alert_ids"]["today"]) - r["again"]
    lines.append(f"today's settings raised {r['again']:,} of the {r['stored']:,} alerts stored for this range"
                 + (f"; not again: {', '.join(r['not_again'][:5])}" if r["not_again"] else "")
                 + (f"; {unstored:,} not stored (e.g. {r['not_stored'][0]})" if r["not_stored"] else ""))
    if not report["days"]:
        lines.append("no alerts")
        return "\n".join(lines)
    lines += ["", f"{'day':10}  {'rule':18}" + "".join(f"{n:>9}" for n in names)]
    for d in report["days"]:
        lines.append(f"{d['day']:10}  {d['rule']:18}" + "".join(f"{d[n]:>9,}" for n in names))
    lines += ["", f"{'rule':18}" + "".join(f"{n:>9}" for n in names)
              + "  marked true / false (precision)" + ("  on labelled trades" if report["labelled_trades"] else "")]
    for row in report["rules"]:
        marks = " -> ".join(f"{row[n]['true_positive']}/{row[n]['false_positive']} ({_share(row[n]['precision'])})"
                            for n in names)
        labelled = " -> ".join(_share(row[n].get("label_precision")) for n in names)
        lines.append(f"{row['rule']:18}" + "".join(f"{row[n]['alerts']:>9,}" for n in names) + f"  {marks}"
                     + (f"  {labelled}" if report["labelled_trades"] else ""))
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"
