"""Market surveillance reports for a period: what traded, what moved, what the detector flagged and
alerted, which breakers opened, and how clean the data was, as one self-contained HTML file (static
SVG charts, no script, no network) and a Markdown file with the same figures.

`build` reads every figure from the database (tradewatch/store/queries.py), `sections` lays them out
once as sections of paragraphs, tables and charts, and render.py writes that layout as Markdown and
as HTML, so the two files cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pandas as pd
from sqlalchemy.engine import Engine

from tradewatch.alerts import PRECISION_MIN_MARKED, per_rule
from tradewatch.config import Settings
from tradewatch.detect import quality as market_quality
from tradewatch.formatting import exact, integer, money, percent
from tradewatch.report import charts
from tradewatch.store import queries

GAP_SECONDS = 300          # a stretch this long without any trade is listed as a gap in the feed
TOP = 20


@dataclass
class Report:
    since: datetime
    until: datetime
    symbols: list[str] | None
    currency: str
    bucket_minutes: int
    per_symbol: pd.DataFrame
    gaps: pd.DataFrame = field(default_factory=pd.DataFrame)
    anomalies: pd.DataFrame = field(default_factory=pd.DataFrame)
    top_flags: pd.DataFrame = field(default_factory=pd.DataFrame)
    alerts: pd.DataFrame = field(default_factory=pd.DataFrame)
    alert_reasons: pd.DataFrame = field(default_factory=pd.DataFrame)   # the most severe, with why each fired
    rules: list[dict] = field(default_factory=list)      # alerts per rule, analysts' verdicts, precision
    breakers: pd.DataFrame = field(default_factory=pd.DataFrame)
    events: pd.DataFrame = field(default_factory=pd.DataFrame)      # pump-and-dump (tradewatch/detect/pump.py)
    closing: pd.DataFrame = field(default_factory=pd.DataFrame)     # indicators of each symbol's last window
    quality: dict[str, pd.DataFrame] = field(default_factory=dict)
    candles: dict[str, pd.DataFrame] = field(default_factory=dict)
    markers: dict[str, pd.DataFrame] = field(default_factory=dict)
    flag_counts: pd.DataFrame = field(default_factory=pd.DataFrame)
    market_quality: list[dict] = field(default_factory=list)      # tradewatch/detect/quality.py per symbol-day

    @property
    def empty(self) -> bool:
        return self.per_symbol.empty

    @property
    def title(self) -> str:
        return f"TradeWatch report — {period_name(self.since, self.until)}"


def whole_period(since: datetime, until: datetime) -> str | None:
    """'day' or 'hour' when [since, until) is exactly one UTC day or hour, else None."""
    if until - since == timedelta(days=1) and since.hour == since.minute == since.second == since.microsecond == 0:
        return "day"
    if until - since == timedelta(hours=1) and since.minute == since.second == since.microsecond == 0:
        return "hour"
    return None


def period_name(since: datetime, until: datetime) -> str:
    """'2013-10-07' for a UTC day, '2013-10-07 14:00' for an hour, else 'since → until'."""
    kind = whole_period(since, until)
    if kind:
        return since.strftime("%Y-%m-%d" if kind == "day" else "%Y-%m-%d %H:00")
    return f"{stamp(since)} → {stamp(until)}"


def stamp(moment) -> str:
    return "—" if moment is None or pd.isna(moment) else pd.Timestamp(moment).strftime("%Y-%m-%d %H:%M:%S UTC")


def bucket_minutes(since: datetime, until: datetime) -> int:
    """Candle size of the charts: 1 minute for up to a day, else 5."""
    return 1 if until - since <= timedelta(days=1) else 5


def build(engine: Engine, settings: Settings, since: datetime, until: datetime,
          symbols: list[str] | None = None) -> Report:
    excluded = sorted(c.strip() for c in settings.ohlc_exclude_conditions.split(",") if c.strip())
    minutes = bucket_minutes(since, until)
    report = Report(since, until, symbols, settings.report_currency, minutes,
                    queries.report_symbols(engine, symbols, since, until, excluded))
    if report.empty:
        return report
    report.gaps = queries.report_gaps(engine, symbols, since, until, GAP_SECONDS)
    report.closing = queries.report_closing_indicators(engine, symbols, since, until)
    report.anomalies = queries.report_anomalies(engine, symbols, since, until)
    report.top_flags = queries.report_top_flags(engine, symbols, since, until, TOP)
    report.alerts = queries.report_alerts(engine, symbols, since, until)
    report.alert_reasons = queries.report_alert_reasons(engine, symbols, since, until, TOP)
    report.rules = per_rule(queries.rule_precision(engine, symbols, since, until))
    report.breakers = queries.report_breaker_openings(engine, symbols, since, until)
    report.events = queries.report_events(engine, symbols, since, until)
    report.quality = queries.report_data_quality(engine, symbols, since, until, excluded)
    report.flag_counts = queries.flag_counts(engine, symbols, since, until, f"{minutes}m")
    report.market_quality = market_quality.per_symbol_day(queries.size_histograms(engine, symbols, since, until),
                                                          queries.minute_volumes(engine, symbols, since, until))
    for symbol in report.per_symbol["symbol"]:
        report.candles[symbol] = queries.candles(engine, "stock_metrics", symbol, f"{minutes}m", since, until)
        report.markers[symbol] = queries.anomaly_points(engine, [symbol], since, until)
    return report


# --- layout: sections of ("p", text) | ("table", headers, rows) | ("svg", markup, caption) ---------

Block = tuple
Section = tuple[str, list[Block]]


def capped(rows: list[list], limit: int, what: str) -> list[list]:
    """The first `limit` of (label, count) rows, then one "and N more" row with their sum; counts
    formatted."""
    shown = [[label, integer(n)] for label, n in rows[:limit]]
    rest = rows[limit:]
    if rest:
        shown.append([f"… and {len(rest):,} more {what}", integer(sum(n for _, n in rest))])
    return shown


def _table(headers: list[str], rows: list[list[str]], none: str) -> Block:
    return ("table", headers, rows) if rows else ("p", none)


def _largest(row) -> str:
    if pd.isna(row["largest_quantity"]):
        return "—"
    return f"{exact(row['largest_quantity'], 0)} @ {exact(row['largest_price'])} ({pd.Timestamp(row['largest_at']):%H:%M:%S})"


def _change(row):
    return None if pd.isna(row["open"]) or pd.isna(row["close"]) else row["close"] / row["open"] - 1


RSI_OVERBOUGHT, RSI_OVERSOLD = 70, 30


def rsi_state(rsi) -> str:
    if rsi is None or pd.isna(rsi):
        return "—"
    return f"{rsi:.1f} ({'overbought' if rsi > RSI_OVERBOUGHT else 'oversold' if rsi < RSI_OVERSOLD else 'neutral'})"


def macd_state(histogram, previous) -> str:
    """Above or below its signal line, and 'crossed' when the last window changed the side."""
    if histogram is None or pd.isna(histogram):
        return "—"
    side = "above signal (bullish)" if histogram >= 0 else "below signal (bearish)"
    crossed = previous is not None and not pd.isna(previous) and (previous >= 0) != (histogram >= 0)
    return f"{'crossed ' if crossed else ''}{side}"


def sections(report: Report) -> list[Section]:
    scope = ", ".join(report.symbols) if report.symbols else "all symbols"
    head = [("p", f"Period {stamp(report.since)} to {stamp(report.until)} (event time) · {scope}.")]
    if report.empty:
        return [("Coverage", head + [("p", "There were no trades in this period.")])]
    frame, money_of = report.per_symbol, (lambda v: money(v, report.currency))
    total = int(frame["trades"].sum())
    coverage = head + [
        ("p", f"{integer(total)} trades of {len(frame)} symbols; first trade {stamp(frame['first_trade'].min())}, "
              f"last trade {stamp(frame['last_trade'].max())}."),
        _table(["Gap from", "to", "minutes"],
               [[stamp(g.gap_start), stamp(g.gap_end), exact(g.seconds / 60, 1, 1)] for g in report.gaps.itertuples()],
               f"No gap of {GAP_SECONDS // 60} minutes or more in the feed.")]
    per_symbol = [[r["symbol"], exact(r["open"]), exact(r["high"]), exact(r["low"]), exact(r["close"]),
                   percent(_change(r)), exact(r["volume"], 0), money_of(r["traded_value"]), exact(r["vwap"], 2, 6),
                   integer(r["trades"]), _largest(r),
                   "—" if pd.isna(r["realised_volatility"]) else percent(r["realised_volatility"]).lstrip("+")]
                  for _, r in frame.iterrows()]
    changes = frame.assign(change=[_change(r) for _, r in frame.iterrows()]).dropna(subset=["change"])
    movers = changes.reindex(changes["change"].abs().sort_values(ascending=False).index).head(5)
    active = frame.sort_values(["traded_value", "symbol"], ascending=[False, True]).head(5)
    markets = [
        ("table", ["Symbol", "Open", "High", "Low", "Close", "Change", "Volume", "Traded value", "VWAP", "Trades",
                   "Largest trade", "Realised volatility"], per_symbol),
        ("p", "Open, high, low and close leave out trades whose sale condition is in OHLC_EXCLUDE_CONDITIONS "
              "(as the aggregator does); volume, value and counts include every trade. Realised volatility: "
              "square root of the sum of squared log returns between the aggregator's 1-minute closes."),
        _table(["Symbol", "Last window (UTC)", "RSI 14 at the close", "MACD", "Signal", "MACD state"],
               [[c.symbol, stamp(c.window_start), rsi_state(c.rsi_14), exact(c.macd, 2, 6), exact(c.macd_signal, 2, 6),
                 macd_state(c.macd_histogram, c.previous_histogram)] for c in report.closing.itertuples()],
               "No 1-minute indicators from the aggregator for this period."),
        ("p", f"Indicators of each symbol's last 1-minute window: RSI 14 above {RSI_OVERBOUGHT} is overbought, "
              f"below {RSI_OVERSOLD} oversold; MACD 12/26 against its 9-window signal line."),
        ("table", ["Top movers", "Change", "Close"], [[m.symbol, percent(m.change), exact(m.close)]
                                                     for m in movers.itertuples()]),
        ("table", ["Most active", "Traded value", "Trades"], [[a.symbol, money_of(a.traded_value), integer(a.trades)]
                                                             for a in active.itertuples()]),
    ]
    anomalies = [
        _table(["Anomaly type", "Severity", "Flagged trades"],
               [[a.anomaly_type, a.severity, integer(a.trades)] for a in report.anomalies.itertuples()],
               "No trade was flagged."),
        _table(["Time", "Symbol", "Price", "Quantity", "Types", "Severity", "Score"],
               [[stamp(f.ts), f.symbol, exact(f.price), exact(f.quantity, 0), f.types, f.severity, exact(f.score, 2, 3)]
                for f in report.top_flags.itertuples()], "")]
    if report.top_flags.empty:
        anomalies.pop()
    alerts = [_table(["Severity", "Alerts", "Acknowledged"],
                     [[a.severity, integer(a.alerts), integer(a.acknowledged)] for a in report.alerts.itertuples()],
                     "No alert was raised.")]
    if report.rules:
        alerts += [_table(["Rule", "Alerts", "True positive", "False positive", "Needs review", "Precision"],
                          [[r["rule"], integer(r["alerts"]), integer(r["true_positive"]), integer(r["false_positive"]),
                            integer(r["needs_review"]),
                            "—" if r["precision"] is None else percent(r["precision"], 0).lstrip("+")]
                           for r in report.rules], ""),
                   ("p", "What analysts marked of each rule's alerts (dashboard or API). Precision: the share "
                         f"marked true of those marked true or false, once {PRECISION_MIN_MARKED} are.")]
    if not report.alert_reasons.empty:
        alerts += [("p", f"The most severe alerts (at most {TOP}) and why each fired: the value measured, the "
                         "baseline it was compared with and the threshold it crossed."),
                   _table(["Alert time", "Symbol", "Type", "Severity", "Why it fired"],
                          [[stamp(a.ts), a.symbol, a.alert_type, a.severity, a.why]
                           for a in report.alert_reasons.itertuples()], "")]
    breakers = [_table(["Symbol", "Opened at"], [[b.symbol, stamp(b.at)] for b in report.breakers.itertuples()],
                       "No circuit breaker opened.")]
    events = [_table(["Symbol", "Started", "Start price", "Peak at", "Peak price", "Gain", "Volume multiple",
                       "Burst trades", "Taker buys", "Dump from the peak", "Dump duration", "State"],
                      [[e.symbol, stamp(e.started_at), exact(e.start_price), stamp(e.peak_at), exact(e.peak_price),
                        percent(e.gain_pct / 100), f"{e.volume_multiple:.0f}×", integer(e.burst_trades),
                        "—" if pd.isna(e.buy_share) else percent(e.buy_share).lstrip("+"),
                        percent(None if pd.isna(e.dump_depth_pct) else -e.dump_depth_pct / 100),
                        "—" if pd.isna(e.dump_seconds) else f"{e.dump_seconds / 60:.1f} min", e.state]
                       for e in report.events.itertuples()],
                      "No pump-and-dump event started in the period."),
              ("p", "A pump-and-dump event, from trade prints alone: a burst of aggressive buys far above the "
                    "symbol's own recent rate lifting the price; the peak, the dump (the share of the gain given "
                    "back) and the end follow as they unfold. Gain is from the last price before the burst.")]
    quality = report.quality
    data_quality = [
        _table(["Dead letters (received in the period) by reason", "Messages"],
               capped([[d.reason[:200], d.messages] for d in quality["dead_letters"].itertuples()], 20, "reasons"),
               "No dead letter was received in the period."),
        _table(["Late trades by reason", "Trades"],
               [[t.reason, integer(t.trades)] for t in quality["late_trades"].itertuples()], "No late trade."),
        _table(["Kept out of OHLC, by condition", "Trades"],
               [[str(c.condition), integer(c.trades)] for c in quality["excluded_from_ohlc"].itertuples()],
               "No trade was kept out of OHLC by its condition."),
    ]
    # symbol-days with signs first, then by symbol: the table is capped, what needs a look is not cut
    judged = sorted(report.market_quality, key=lambda q: (not q["signs"], q["symbol"], q["day"]))
    quality_rows = [[q["symbol"], q["day"], q["verdict"] + "".join(f"; {s}" for s in q["signs"]),
                     f"{q['benford']['mad']:g} ({q['benford']['conformity']})" if q["benford"].get("trades") else "—",
                     f"{q['clustering']['index']:g}× (t {q['clustering']['t']:g})" if q["clustering"].get("trades") else "—",
                     percent(q["clustering"].get("round_share")).lstrip("+") if q["clustering"].get("trades") else "—",
                     "—" if q["tail"].get("alpha") is None else f"{q['tail']['alpha']:g}",
                     "—" if q["volume_volatility"]["rho"] is None else
                     f"{q['volume_volatility']['rho']:g} (t {q['volume_volatility']['t']:g})"]
                    for q in judged[:TOP]]
    if len(judged) > TOP:
        quality_rows.append([f"… and {len(judged) - TOP:,} more symbol-days", "", "", "", "", "", "", ""])
    market = [
        _table(["Symbol", "Day", "Verdict", "Benford MAD", "Round sizes vs neighbours", "At round sizes",
                "Size tail exponent", "Volume ~ |1-min return| (Spearman)"], quality_rows, "No trades."),
        ("p", "Signs of fake volume, from trade prints alone: trade sizes with no clustering at round sizes "
              "(people trade round lots, programs drawing sizes do not), a size tail outside the Pareto "
              f"exponents of real markets ({market_quality.TAIL_BAND[0]:g}–{market_quality.TAIL_BAND[1]:g}), "
              "volume that does not come with price moves. Benford's law of first digits counts only when "
              "sizes are not clustered: round lots put most first digits at 1 on real, regulated days."),
        ("svg", charts.first_digits(judged, "First digit of trade sizes against Benford's law"),
         "First digits of trade sizes per symbol-day (at most 8 shown) and Benford's law"),
    ]
    size = f"{report.bucket_minutes}-minute"
    bucket = pd.Timedelta(minutes=report.bucket_minutes)     # every chart spans the same trading time
    span = (frame["first_trade"].min().floor(bucket), frame["last_trade"].max().ceil(bucket))
    charts_section = []
    for symbol, candles in report.candles.items():
        if candles.empty:
            charts_section.append(("p", f"{symbol}: no {size} candles from the aggregator for this period."))
            continue
        charts_section.append(("svg", charts.candles(candles, report.markers[symbol], report.bucket_minutes,
                                                    f"{symbol} — {size} candles and volume", span),
                               f"{symbol}: {len(candles)} {size} candles, {len(report.markers[symbol])} anomaly markers"))
    charts_section.append(("svg", charts.anomalies_over_time(report.flag_counts, report.bucket_minutes, span),
                           f"Flagged trades per {size} bucket"))
    return [("Coverage", coverage), ("Markets", markets), ("Anomalies", anomalies), ("Alerts", alerts),
            ("Circuit breakers", breakers), ("Pump-and-dump events", events),
            ("Market quality", market), ("Data quality", data_quality),
            ("Charts", charts_section)]
