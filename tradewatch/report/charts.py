"""Static SVG charts for reports (matplotlib, Agg): they need no script and no network to show."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from tradewatch.detect.quality import BENFORD  # noqa: E402

plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
                     "axes.spines.right": False, "svg.hashsalt": "tradewatch"})
UP, DOWN = "#1a9850", "#d73027"
SEVERITY_COLOURS = {"CRITICAL": "#7b3294", "HIGH": "#d73027", "MEDIUM": "#fc8d59", "LOW": "#fee090"}


def _svg(figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]          # inline: without the XML prologue and doctype


def _time_axis(axis, span: tuple | None) -> None:
    if span is not None:
        axis.set_xlim(*(pd.Timestamp(t).tz_convert("UTC").tz_localize(None) for t in span))
    locator = mdates.AutoDateLocator(minticks=4, maxticks=10)
    axis.xaxis.set_major_locator(locator)
    axis.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def candles(frame: pd.DataFrame, markers: pd.DataFrame, width_minutes: int, title: str, span: tuple | None = None) -> str:
    """Candles (high-low wick, open-close body) with anomaly markers, and volume bars below."""
    figure, (prices, volume) = plt.subplots(2, 1, sharex=True, figsize=(10, 4.6),
                                            gridspec_kw={"height_ratios": (3, 1), "hspace": 0.05})
    starts = pd.to_datetime(frame["window_start"], utc=True).dt.tz_localize(None)
    centres = starts + pd.Timedelta(minutes=width_minutes / 2)
    rising = frame["close"] >= frame["open"]
    colours = [UP if r else DOWN for r in rising]
    width = pd.Timedelta(minutes=width_minutes * 0.7)
    prices.vlines(centres, frame["low"], frame["high"], colors=colours, linewidth=0.6)
    bottoms = frame[["open", "close"]].min(axis=1)
    heights = (frame["close"] - frame["open"]).abs().clip(lower=(frame["high"].max() - frame["low"].min()) * 1e-3)
    prices.bar(centres, heights, width, bottoms, color=colours, linewidth=0)
    for severity, points in markers.groupby("severity"):
        prices.scatter(pd.to_datetime(points["ts"], utc=True).dt.tz_localize(None), points["price"], marker="v",
                       s=28, color=SEVERITY_COLOURS.get(severity, "black"), label=f"{severity} anomaly", zorder=3)
    if not markers.empty:
        prices.legend(loc="upper left", fontsize=8, frameon=False)
    prices.set_title(title, loc="left")
    prices.set_ylabel("price")
    volume.bar(centres, frame["volume"], width, color=colours, linewidth=0)
    volume.set_ylabel("volume")
    _time_axis(volume, span)
    return _svg(figure)


def anomalies_over_time(counts: pd.DataFrame, width_minutes: int, span: tuple | None = None) -> str:
    """Flagged trades per bucket, stacked by anomaly type."""
    figure, axis = plt.subplots(figsize=(10, 2.6))
    table = counts.pivot_table(index="bucket", columns="anomaly_type", values="trades", aggfunc="sum", fill_value=0)
    if table.empty:
        axis.text(0.5, 0.5, "no anomalies in this period", ha="center", va="center", transform=axis.transAxes)
        axis.set_yticks([])
    else:
        starts = pd.to_datetime(table.index, utc=True).tz_localize(None)
        bottom = pd.Series(0, index=table.index)
        for kind in table.columns:
            axis.bar(starts, table[kind], pd.Timedelta(minutes=width_minutes), bottom, label=kind, align="edge")
            bottom = bottom + table[kind]
        axis.legend(loc="upper left", fontsize=8, frameon=False, ncol=4)
        _time_axis(axis, span)
    axis.set_ylabel("flagged trades")
    axis.set_title("Anomalies over time", loc="left")
    return _svg(figure)


def first_digits(entries: list[dict], title: str) -> str:
    """Share of trades by the first digit of their size, one bar group per symbol-day, against
    Benford's law (the line), and each one's round-size clustering in the legend."""
    figure, axis = plt.subplots(figsize=(10, 2.8))
    digits = list(range(1, 10))
    shown = [e for e in entries if e["benford"].get("trades")][:8]
    width = 0.8 / max(len(shown), 1)
    for k, entry in enumerate(shown):
        axis.bar([d - 0.4 + width * (k + 0.5) for d in digits], entry["benford"]["shares"], width,
                 label=f"{entry['symbol']} {entry['day']} (round sizes {entry['clustering']['index']:g}× neighbours)")
    axis.plot(digits, list(BENFORD), color="black", marker="o", markersize=3, linewidth=1, label="Benford's law")
    axis.set_xticks(digits)
    axis.set_xlabel("first digit of trade size")
    axis.set_ylabel("share of trades")
    axis.legend(loc="upper right", fontsize=8, frameon=False)
    axis.set_title(title, loc="left")
    return _svg(figure)
