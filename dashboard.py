"""TradeWatch live dashboard: `streamlit run dashboard.py`. Reads PostgreSQL only (tradewatch/store/queries.py)."""
from __future__ import annotations

from datetime import timedelta

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots
from sqlalchemy.exc import DBAPIError

from tradewatch import services
from tradewatch.access import LOOPBACK, may_acknowledge
from tradewatch.book import Top, imbalance
from tradewatch.candles import BASE_SIZE
from tradewatch.config import Settings
from tradewatch.formatting import compact, exact
from tradewatch.heartbeat import LATENCY_MEANS
from tradewatch.market import history
from tradewatch.store import detections, queries
from tradewatch.store.health import EXPECTED_STAGES, gone_from_this_host, stage_statuses
from tradewatch.windows import parse_size

RANGES = {"Last 15 minutes": 15, "Last hour": 60, "Last 6 hours": 360, "Last 24 hours": 1440, "Last 7 days": 10080}
SEVERITY_COLORS = {"CRITICAL": "#d62728", "HIGH": "#ff7f0e", "MEDIUM": "#e6c229", "LOW": "#1f77b4"}
SEVERITIES = list(SEVERITY_COLORS)
# 120 points per stage for the hour: a third of the rows of the 10-s samples, read in a third of the time
PIPELINE_STEP_S = 30
STAGE_COLORS = {"consumer": "#1f77b4", "aggregator": "#2ca02c", "detector": "#d62728", "flink": "#9467bd",
                "quotes": "#8c564b"}

# icons are Material Symbols, which Streamlit serves with its own font: an emoji is an empty box on a
# machine without an emoji font
st.set_page_config(page_title="TradeWatch", page_icon=":material/monitoring:", layout="wide")
try:
    settings = Settings.load()
except ValueError as bad_setting:       # one line naming the setting, not a traceback
    st.error(f"{bad_setting} — fix it in .env or the environment, then reload this page")
    st.stop()


@st.cache_resource
def engine():
    return queries.engine_for(settings.sqlalchemy_url)


# Results are shared by every open page for one second (the shortest refresh interval) and the
# cache is bounded, so memory stays flat however long the page refreshes.
cached = st.cache_data(ttl=1, max_entries=256, show_spinner=False)


@cached
def q(name: str, *args):
    return getattr(queries, name)(engine(), *args)


def database_down(error: Exception) -> None:
    """The outage in words: what the demo watching PostgreSQL saw (its cause, from its log), else
    what this page can tell."""
    watched = (services.read_states(settings) or {}).get("postgres")
    if watched is not None and watched.status != "up":
        st.error(f"PostgreSQL {watched.words()} — `make demo` starts it again by itself; the pipeline resumes "
                 f"where it stopped{'. ' + watched.fix if watched.fix else ''}", icon=":material/error:")
        return
    st.error(f"Database unavailable at {settings.postgres_host}:{settings.postgres_port} — retrying "
             f"automatically. Start it with `make services`. ({type(error).__name__})", icon=":material/error:")


ALL_SYMBOLS = "All symbols"


def view_changed() -> None:
    if st.session_state.view == ALL_SYMBOLS:
        st.query_params.pop("symbol", None)
    else:
        st.query_params["symbol"] = st.session_state.view


st.title("TradeWatch — live market surveillance")

with st.sidebar:
    st.header("Controls")
    refresh = st.slider("Refresh every (seconds)", 1, 10, min(max(settings.dashboard_refresh_seconds, 1), 10),
                        key="refresh")
    range_name = st.selectbox("Time range", list(RANGES), index=1, key="range")
    try:
        has_flink = q("table_exists", "flink_metrics")
        sources = {k: v for k, v in queries.METRICS_TABLES.items() if v != "flink_metrics" or has_flink}
        source_name = st.selectbox("Metrics from", list(sources), key="source")
        source = sources[source_name]
        all_symbols = q("symbols", source)
    except DBAPIError as error:
        database_down(error)
        source, all_symbols = "stock_metrics", []
    # the symbol view lives in the address (?symbol=AAPL), so a link to it can be shared
    linked = st.query_params.get("symbol")
    view_options = [ALL_SYMBOLS, *all_symbols, *([linked] if linked and linked not in all_symbols else [])]
    if "view" not in st.session_state:
        st.session_state.view = linked or ALL_SYMBOLS
    view = st.selectbox("Symbol view", view_options, key="view", on_change=view_changed,
                        help="One symbol in depth: candles with indicators and anomalies, its flags, alerts, "
                             "whale trades and tape. The page's address names it, so the view can be shared.")
    chosen = st.multiselect("Symbols", all_symbols, placeholder="all symbols", key="symbols",
                            disabled=view != ALL_SYMBOLS)
    anomalies_only = st.checkbox("Anomalies only", key="anomalies_only")
    candle_size = st.radio("Candle size", list(settings.window_labels), horizontal=True, key="candle_size")
    show_ema = st.toggle("EMA 12/26 on the candles", key="ema")
    if (st.get_option("server.address") or "") not in LOOPBACK and settings.api_key:
        st.text_input("API key (to acknowledge alerts)", type="password", key="api_key_entered")


def no_data(what: str) -> None:
    st.info(f"No data yet: {what} appear once trades flow (`make demo`).", icon=":material/hourglass_empty:")


SERVICE_COLORS = {"up": "green", "starting": "orange", "down": "red", "failed": "red", "full": "red"}


def service_badges() -> str:
    """Kafka's and PostgreSQL's badges, from the demo watching them (none without a demo): read from
    a file, so they are shown while PostgreSQL is down too."""
    states = services.read_states(settings) or {}
    return " ".join(f":{SERVICE_COLORS.get(s.status, 'gray')}-badge[{s.service} "
                    f"{s.words().replace('[', '(').replace(']', ')')}]" for s in states.values())


def health_strip() -> None:
    """One badge per service (from the demo) and per stage from its heartbeat: green up, orange late
    or starting, red down or failed, grey stopped."""
    watched = service_badges()
    try:
        if not q("table_exists", "stage_health"):
            return
        rows = q("stage_health").to_dict("records")
    except DBAPIError:
        if watched:
            st.markdown(f"**Pipeline** {watched}")
        raise
    statuses = stage_statuses(rows, gone_from_this_host)
    badges = " ".join(f":{s.color}-badge[{s.stage} {s.status} · {s.detail}]" for s in statuses)
    store = q("storage", settings.home)
    disk = (f":{'red' if store['low'] else 'gray'}-badge[database {store['database_bytes'] / 1024**3:.2f} GiB · "
            f"archive {store['archive_bytes'] / 1024**3:.2f} GiB · "
            f"disk {store['free_disk_percent']:.0f} % free{' — LOW' if store['low'] else ''}]")
    st.markdown(f"**Pipeline** {watched} {badges} {disk}")


def kpi_row(symbols, since, until, previous_since) -> None:
    now = q("kpis", source, symbols, since, until)
    before = q("kpis", source, symbols, previous_since, since)
    # (label, key, short form for the tile, exact form for the tooltip)
    labels = [("Trades", "trades", lambda v: f"{v:,.0f}", None),
              ("Volume", "volume", compact, lambda v: exact(v, 0, 4)),
              ("Traded value", "traded_value", lambda v: compact(v, "$"), lambda v: f"${v:,.2f}"),
              ("Active symbols", "active_symbols", lambda v: f"{v:,.0f}", None),
              ("Anomalies", "anomalies", lambda v: f"{v:,.0f}", None)]
    for column, (label, key, short, full) in zip(st.columns(len(labels)), labels):
        delta = now[key] - before[key]
        column.metric(label, short(now[key]), delta=f"{delta:+,.0f} vs previous" if full is None
                      else f"{'+' if delta >= 0 else ''}{short(delta)} vs previous",
                      delta_color="off" if key == "anomalies" else "normal",
                      help=f"exactly {full(now[key])}" if full else None)


def sensible_time_axis(figure, starts: pd.Series, step: timedelta, at_least: int) -> None:
    """Show at least `at_least` steps ending at the newest point: a lone first candle must not be
    stretched over an axis ticked in fractions of a millisecond."""
    newest = pd.Timestamp(starts.max()) + step
    oldest = min(pd.Timestamp(starts.min()) - step / 2, newest - at_least * step)
    figure.update_xaxes(range=[oldest, newest])


def shade_simulated_history(figure, subplots: int = 0) -> None:
    """The past `make demo` simulated at start (producer.py --history), shaded and named on a chart
    (on each of its `subplots` rows, if it has them)."""
    span = history.span(settings)
    if span is None:
        return
    for row in range(1, subplots + 1) if subplots else [None]:
        figure.add_vrect(x0=span[0], x1=span[1], fillcolor="#7f7f7f", opacity=0.08, line_width=0, layer="below",
                         **({"row": row, "col": 1} if row else {}))
    figure.add_annotation(x=span[1], y=1, xref="x", yref="paper", xanchor="right", yanchor="bottom",
                          showarrow=False, text="simulated at start │ live", font=dict(color="#7f7f7f", size=11))


def candle_panel(symbols, since, until) -> None:
    # read again on every refresh: a page opened before the first window was written must not
    # keep the empty list it started with
    options = symbols or q("symbols", source)
    if not options:
        no_data("candles")
        return
    symbol = options[0] if len(options) == 1 else st.selectbox("Candles for", options, key="candle_symbol")
    size = candle_size if source == "stock_metrics" else BASE_SIZE
    frame = q("candles", source, symbol, size, since, until)
    if frame.empty:
        no_data(f"{size} candles of {symbol}")
        return
    x = frame.window_start
    figure = make_subplots(rows=4, cols=1, shared_xaxes=True, row_heights=[0.52, 0.14, 0.17, 0.17],
                           vertical_spacing=0.03, subplot_titles=("", "Volume", "RSI 14", "MACD 12/26/9"))
    figure.add_trace(go.Candlestick(x=x, open=frame.open, high=frame.high, low=frame.low, close=frame.close,
                                    name=symbol), row=1, col=1)
    figure.add_trace(go.Scatter(x=x, y=frame.vwap, name="VWAP", line=dict(color="#9467bd")), 1, 1)
    overlays = [("sma_20", "SMA 20", "dot"), ("sma_50", "SMA 50", "dash"),
                ("bollinger_upper", "Bollinger upper", "dot"), ("bollinger_lower", "Bollinger lower", "dot")]
    if show_ema:
        overlays += [("ema_12", "EMA 12", "solid"), ("ema_26", "EMA 26", "solid")]
    for column, name, dash in overlays:
        if frame[column].notna().any():
            figure.add_trace(go.Scatter(x=x, y=frame[column], name=name, line=dict(dash=dash, width=1)), 1, 1)
    if frame["band_high"].notna().any():
        # the 90 % band forecast for each window at the close of the one before, held over the window
        step = dict(shape="hv", width=0.5, color="rgba(44,160,44,0.6)")
        figure.add_trace(go.Scatter(x=x, y=frame.band_low, name="90 % band low", line=step, showlegend=False,
                                    legendgroup="band"), 1, 1)
        figure.add_trace(go.Scatter(x=x, y=frame.band_high, line=step, fill="tonexty", legendgroup="band",
                                    fillcolor="rgba(44,160,44,0.10)",
                                    name=f"90 % band, {frame['band_forecaster'].dropna().iloc[-1]}"), 1, 1)
    marks = q("anomaly_points", [symbol], since, until)
    if not marks.empty:
        figure.add_trace(go.Scatter(x=marks.ts, y=marks.price, mode="markers", name="Anomalies",
                                    marker=dict(color=[SEVERITY_COLORS.get(v, "#000") for v in marks.severity],
                                                size=9, symbol="x"),
                                    text=marks.severity + " " + marks.types), 1, 1)
    figure.add_trace(go.Bar(x=x, y=frame.volume, name="Volume", marker_color="#7f7f7f"), 2, 1)
    figure.add_trace(go.Scatter(x=x, y=frame.rsi_14, name="RSI 14", line=dict(color="#17becf")), 3, 1)
    for level in (30, 70):
        figure.add_hline(y=level, line=dict(dash="dot", width=1, color="#d62728" if level == 70 else "#2ca02c"),
                         row=3, col=1)
    figure.add_trace(go.Scatter(x=x, y=frame.macd, name="MACD", line=dict(color="#1f77b4")), 4, 1)
    figure.add_trace(go.Scatter(x=x, y=frame.macd_signal, name="Signal", line=dict(color="#ff7f0e")), 4, 1)
    figure.add_trace(go.Bar(x=x, y=frame.macd_histogram, name="Histogram",
                            marker_color=["#d62728" if pd.notna(v) and v < 0 else "#2ca02c" for v in frame.macd_histogram]),
                     4, 1)
    figure.update_yaxes(range=[0, 100], row=3, col=1)
    shade_simulated_history(figure, subplots=4)
    sensible_time_axis(figure, x, timedelta(milliseconds=parse_size(size)), at_least=30)
    figure.update_layout(height=760, margin=dict(l=10, r=10, t=30, b=10), xaxis_rangeslider_visible=False,
                         title=f"{symbol} {size} candles", uirevision=f"{symbol}-{size}")
    st.plotly_chart(figure, width="stretch", key="candles")


def book_quote(book: dict) -> dict:
    """What the page shows of one book: its top, spread (also in basis points of the mid) and
    imbalance over the levels read — the definitions of tradewatch/book.py, as the API's."""
    top = Top.of(book["bids"], book["asks"])
    return {"top": top, "bps": None if top.spread is None else top.spread / top.mid * 1e4,
            "imbalance": imbalance(book["bids"], book["asks"])}


def no_book(symbol: str) -> None:
    st.info(f"No order book of {symbol}: books come from `producer.py --book` through `consumer.py --quotes` "
            "(`make demo` runs both).", icon=":material/hourglass_empty:")


def book_panel(symbol: str) -> None:
    """The symbol's order book as the quotes stage holds it (`order_books`, a quarter of a second
    old at most): best bid and ask, spread, imbalance, and a depth chart of BOOK_DEPTH levels a side."""
    found = q("order_books", [symbol], settings.book_depth)
    if not found:
        no_book(symbol)
        return
    book = found[0]
    shown = book_quote(book)
    top = shown["top"]
    bid, ask, spread, lean = st.columns(4)
    bid.metric("Best bid", exact(top.bid), help=f"size {exact(top.bid_size, 0)}")
    ask.metric("Best ask", exact(top.ask), help=f"size {exact(top.ask_size, 0)}")
    spread.metric("Spread", exact(top.spread), delta=None if shown["bps"] is None else f"{shown['bps']:.1f} bps",
                  delta_color="off", delta_arrow="off", help="best ask − best bid; in basis points of the mid")
    lean.metric("Imbalance", "—" if shown["imbalance"] is None else f"{shown['imbalance']:+.2f}",
                help=f"(bid size − ask size) / both, over the {settings.book_depth} best levels a side: "
                     "+1 all bids, −1 all asks")
    if book["stale"]:
        st.warning("A sequence gap since the last snapshot: these are the last known levels, not trusted "
                   "until the next snapshot.", icon=":material/warning:")
    figure = go.Figure()
    for name, levels, color in (("Bids", book["bids"], "#2ca02c"), ("Asks", book["asks"], "#d62728")):
        prices = [p for p, _ in levels]
        depth = pd.Series([s for _, s in levels]).cumsum().tolist()
        figure.add_trace(go.Scatter(x=prices, y=depth, name=name, mode="lines", line=dict(color=color, shape="hv"),
                                    fill="tozeroy"))
    figure.update_layout(height=360, margin=dict(l=10, r=10, t=30, b=10), xaxis_title="price",
                         yaxis_title="size, cumulative from the touch", uirevision=f"depth-{symbol}",
                         title=f"{symbol} depth · {len(book['bids'])} bids, {len(book['asks'])} asks · "
                               f"as of {pd.Timestamp(book['ts']):%H:%M:%S.%f}"[:-3] + " UTC")
    st.plotly_chart(figure, width="stretch", key="depth")


def books_panel(symbols) -> None:
    """Every symbol's top of book, spread and imbalance; nothing when no book is held."""
    books = q("order_books", symbols, settings.book_depth)
    if not books:
        return
    st.subheader("Order books")
    shown = [book_quote(b) for b in books]
    st.dataframe(pd.DataFrame({
        "Symbol": [b["symbol"] for b in books],
        "Bid": [exact(s["top"].bid) for s in shown], "Bid size": [exact(s["top"].bid_size, 0) for s in shown],
        "Ask": [exact(s["top"].ask) for s in shown], "Ask size": [exact(s["top"].ask_size, 0) for s in shown],
        "Spread": [exact(s["top"].spread) for s in shown],
        "Spread (bps)": [None if s["bps"] is None else round(s["bps"], 1) for s in shown],
        f"Imbalance ({settings.book_depth} levels)": [None if s["imbalance"] is None else round(s["imbalance"], 2)
                                                     for s in shown],
        "As of (UTC)": [f"{pd.Timestamp(b['ts']):%H:%M:%S}" for b in books],
        "Stale": ["gap" if b["stale"] else "" for b in books]}).set_index("Symbol"), width="stretch")


def price_panel(symbols, since, until) -> None:
    prices = q("price_series", source, symbols, since, until)
    marks = q("anomaly_points", symbols, since, until)
    if prices.empty and marks.empty:
        no_data("prices")
        return
    figure = go.Figure()
    if not anomalies_only:
        for symbol, rows in prices.groupby("symbol"):
            base = rows.price.iloc[0]
            figure.add_trace(go.Scatter(x=rows.ts, y=(rows.price / base - 1) * 100, name=symbol,
                                        mode="lines" if len(rows) > 30 else "lines+markers"))
    first = prices.groupby("symbol").price.first()
    for severity, rows in marks.groupby("severity"):
        y = [(p / first.get(s, p) - 1) * 100 for s, p in zip(rows.symbol, rows.price)]
        figure.add_trace(go.Scatter(x=rows.ts, y=y, mode="markers", name=f"{severity} anomaly",
                                    marker=dict(color=SEVERITY_COLORS.get(severity, "#000"), size=10,
                                                symbol="x"),
                                    text=rows.symbol + " " + rows.types + " (" + rows.in_minute.astype(str)
                                    + " in that minute)"))
    flagged = int(marks.in_minute.sum()) if not marks.empty else 0
    shown = (f"{len(marks):,} markers for {flagged:,} flagged trades (the strongest per minute and symbol)"
             if flagged else "no anomalies in range")
    sensible_time_axis(figure, pd.concat([prices.ts, marks.ts]) if not marks.empty else prices.ts,
                       timedelta(minutes=1), at_least=15)
    shade_simulated_history(figure)
    figure.update_layout(height=360, margin=dict(l=10, r=10, t=30, b=10), yaxis_title="% vs range start",
                         title=f"Price (1-minute closes) with anomalies — {shown}", uirevision="prices")
    st.plotly_chart(figure, width="stretch", key="prices")


def share_panels(symbols, since, until) -> None:
    frame = q("per_symbol", source, symbols, since, until)
    left, right = st.columns(2)
    if frame.empty:
        with left:
            no_data("per-symbol volumes")
        return
    bars = go.Figure([go.Bar(x=frame.symbol, y=frame.volume, name="Volume", offsetgroup=1),
                      go.Bar(x=frame.symbol, y=frame.traded_value, name="Traded value", yaxis="y2", offsetgroup=2)])
    bars.update_layout(height=340, barmode="group", title="Volume and traded value per symbol",
                       yaxis2=dict(overlaying="y", side="right"), margin=dict(l=10, r=10, t=30, b=10))
    left.plotly_chart(bars, width="stretch", key="per_symbol")
    pie = go.Figure([go.Pie(labels=frame.symbol, values=frame.volume, hole=0.4)])
    pie.update_layout(height=340, title="Share of volume", margin=dict(l=10, r=10, t=30, b=10))
    right.plotly_chart(pie, width="stretch", key="share")


def scanner_panel(symbols, since, until) -> None:
    st.subheader("Market scanner")
    frame = q("scanner", source, symbols, since, until)
    if frame.empty:
        no_data("scanner rows")
        return
    st.dataframe(frame, hide_index=True, width="stretch", key="scanner", column_config={
        "last": st.column_config.NumberColumn("Last", format="%.4f"),
        "change_pct": st.column_config.NumberColumn("% change", format="%.3f%%"),
        "vwap": st.column_config.NumberColumn("VWAP", format="%.4f"),
        "volume": st.column_config.NumberColumn("Volume", format="%.0f"),
        "buy_share": st.column_config.ProgressColumn("Buy pressure", min_value=0.0, max_value=1.0, format="%.2f"),
        "signal": st.column_config.TextColumn("Signal")})


def whales_and_tape(symbols, since, until) -> None:
    left, right = st.columns([1, 1])
    with left:
        st.subheader("Whale trades")
        whales = q("whale_trades", symbols, since, until)
        if whales.empty:
            no_data("whale trades")
        for row in whales.itertuples():
            with st.container(border=True):
                st.markdown(f":material/waves: **{row.symbol}** {row.side} **{exact(row.quantity, 0)}** @ {exact(row.price)} "
                            f"= ${row.value:,.0f}  \n{pd.Timestamp(row.ts):%Y-%m-%d %H:%M:%S} UTC · score {row.score:.1f}")
    with right:
        st.subheader("Trade tape")
        tape = q("trade_tape", symbols, anomalies_only)
        if tape.empty:
            no_data("trades")
        else:
            # a static table: cells grow with their text, so no digit is ever clipped
            st.table(pd.DataFrame({
                "Time (UTC)": [f"{pd.Timestamp(t):%H:%M:%S.%f}"[:-3] for t in tape.ts],
                "Symbol": tape.symbol, "Side": tape.side,
                "Price": [exact(p) for p in tape.price], "Quantity": [exact(v, 0) for v in tape.quantity],
                "Exchange": tape.exchange, "Anomaly": tape.severity.fillna("")}).set_index("Time (UTC)"))


def events_panel(symbols) -> None:
    """Pump-and-dump events (tradewatch/detect/pump.py), shown when there are any."""
    events = q("manipulation_events", None, None, 50)
    if symbols:
        events = events[events.symbol.isin(symbols)]
    if events.empty:
        return
    st.subheader("Pump-and-dump events")
    st.table(pd.DataFrame({
        "Started (UTC)": [f"{pd.Timestamp(t):%Y-%m-%d %H:%M:%S}" for t in events.started_at],
        "Symbol": events.symbol, "State": events.state,
        "Start": [exact(p) for p in events.start_price], "Peak": [exact(p) for p in events.peak_price],
        "Gain": [f"{g:+.1f}%" for g in events.gain_pct],
        "Burst": [f"{n} trades, {m:,.0f}x baseline" for n, m in zip(events.burst_trades, events.volume_multiple)],
        "Dump": ["" if pd.isna(d) else f"-{d:.1f}% in {s:,.0f} s" for d, s in zip(events.dump_depth_pct,
                                                                                  events.dump_seconds)],
    }).set_index("Started (UTC)").head(20))


def pipeline_panel() -> None:
    """The pipeline over the last hour of the clock, from the samples each stage's heartbeat writes
    every 10 s (a point per PIPELINE_STEP_S): records per second, lag, and the latency the stages
    measure."""
    st.subheader("Pipeline over the last hour")
    now = pd.Timestamp.now(tz="UTC")
    frame = q("pipeline", now.floor(f"{PIPELINE_STEP_S}s") - timedelta(hours=1), PIPELINE_STEP_S)
    if frame.empty:
        st.info("No pipeline samples yet: each running stage writes one every 10 s.", icon=":material/hourglass_empty:")
        return
    order = [*EXPECTED_STAGES, *sorted(set(frame.stage) - set(EXPECTED_STAGES))]
    stages = {stage: frame[frame.stage == stage] for stage in order if stage in set(frame.stage)}
    flow, lag, latency = go.Figure(), go.Figure(), go.Figure()
    if "consumer" in stages:
        rows = stages["consumer"]
        flow.add_trace(go.Scatter(x=rows["at"], y=rows.arriving_per_s, name="arriving in Kafka",
                                  line=dict(dash="dot", color="#7f7f7f")))
    for stage, rows in stages.items():
        color = STAGE_COLORS.get(stage)
        flow.add_trace(go.Scatter(x=rows["at"], y=rows.per_s, name=stage, line=dict(color=color)))
        lag.add_trace(go.Scatter(x=rows["at"], y=rows.lag, name=stage, line=dict(color=color)))
        if stage in LATENCY_MEANS:
            timed = rows[rows.p99_ms.notna()]
            for column, dash in (("p50_ms", "solid"), ("p99_ms", "dot")):
                latency.add_trace(go.Scatter(x=timed["at"], y=timed[column], mode="lines+markers",
                                             name=f"{LATENCY_MEANS[stage]} {column[:3]}",
                                             line=dict(dash=dash, color=color)))
    # the hour, or from the first sample when the stages started since (ten minutes at least)
    oldest = min(max(pd.Timestamp(frame["at"].min()), now - timedelta(hours=1)), now - timedelta(minutes=10))
    for figure, title, unit in ((flow, "Records per second", "records/s"), (lag, "Lag", "records behind"),
                                (latency, "Latency from Kafka", "ms (log)")):
        figure.update_layout(height=300, margin=dict(l=10, r=10, t=30, b=10), title=title, yaxis_title=unit,
                             legend=dict(orientation="h", y=-0.25), uirevision=title)
        figure.update_xaxes(range=[oldest, now])
    latency.update_yaxes(type="log")
    for column, figure, key in zip(st.columns(3), (flow, lag, latency), ("pipeline_flow", "pipeline_lag",
                                                                          "pipeline_latency")):
        column.plotly_chart(figure, width="stretch", key=key)
    st.caption("Now: " + " · ".join(pipeline_now(stages)))


def pipeline_now(stages: dict[str, pd.DataFrame]) -> list[str]:
    """The newest sample of each stage in words, e.g. "consumer 20.0/s, lag 3" and
    "trade → row p50 4 ms, p99 41 ms"."""
    said = []
    for stage, rows in stages.items():
        last = rows.iloc[-1]
        rate = "" if pd.isna(last.per_s) else f" {last.per_s:,.1f}/s,"
        said.append(f"{stage}{rate} lag {'?' if pd.isna(last.lag) else f'{last.lag:,.0f}'}")
        timed = rows[rows.p99_ms.notna()]
        if stage in LATENCY_MEANS and not timed.empty:
            said.append(f"{LATENCY_MEANS[stage]} p50 {milliseconds(timed.p50_ms.iloc[-1])}, "
                        f"p99 {milliseconds(timed.p99_ms.iloc[-1])}")
    return said


def milliseconds(value: float) -> str:
    return f"{value:.1f} ms" if value < 10 else f"{value:,.0f} ms"


def acknowledge_allowed() -> tuple[bool, str]:
    return may_acknowledge(st.get_option("server.address") or "", settings.api_key,
                           st.session_state.get("api_key_entered"))


def acknowledge(alert_id: str) -> None:
    """Button callback: runs before the rerun, so the feed redraws with the alert acknowledged."""
    if acknowledge_allowed()[0]:         # checked here too: a disabled button is only the page's promise
        detections.acknowledge_alert(engine(), alert_id)
        q.clear()


def open_alert(alert_id: str | None) -> None:
    """Button callback: the alert opened below the feed, named in the address (?alert=…) so a link
    to it can be shared."""
    if alert_id is None:
        st.query_params.pop("alert", None)
    else:
        st.query_params["alert"] = alert_id


def alert_feed(symbols) -> None:
    st.subheader("Alerts")
    opened = st.query_params.get("alert")
    if opened:
        alert_detail(opened)
    severities = st.multiselect("Severity", SEVERITIES, default=SEVERITIES, key="alert_severities")
    alerts = q("alerts_feed", severities, symbols)
    if alerts.empty:
        no_data("alerts")
        return
    allowed, note = acknowledge_allowed()
    if note:
        st.caption(note)
    for row in alerts.head(20).itertuples():
        text, why, button = st.columns([6, 1, 1])
        mark = ":material/check_circle:" if row.acknowledged else ":material/notifications_active:"
        verdict = f" :gray-badge[{VERDICTS[row.disposition]}]" if row.disposition in VERDICTS else ""
        text.markdown(f"{mark} :{'red' if row.severity == 'CRITICAL' else 'orange' if row.severity == 'HIGH' else 'blue'}"
                      f"[**{row.severity}**] {row.message}{verdict}")
        why.button("Why?", key=f"why-{row.alert_id}", on_click=open_alert, args=(row.alert_id,),
                   help="The evidence: what was measured, against which baseline and threshold, with a chart")
        if not row.acknowledged:
            button.button("Acknowledge", key=f"ack-{row.alert_id}", on_click=acknowledge, args=(row.alert_id,),
                          disabled=not allowed)


# around an alert: the baseline's trades (or this much before it when it names none) and after it
AROUND_BEFORE, AROUND_AFTER = timedelta(minutes=2), timedelta(minutes=1)


def alert_detail(alert_id: str) -> None:
    """One alert opened: why it fired in a sentence, its evidence, and the symbol's trades around
    it with the baseline and the threshold drawn (tradewatch/detect/evidence.py)."""
    found = q("alert", alert_id)
    with st.container(border=True):
        head, close = st.columns([7, 1])
        close.button("Close", key="close-alert", on_click=open_alert, args=(None,))
        if found.empty:
            head.warning(f"No alert {alert_id} (dropped by retention, or a wrong link).")
            return
        alert = found.iloc[0]
        ts = pd.Timestamp(alert.ts)
        head.markdown(f"**{alert.severity} {alert.alert_type} {alert.symbol}** at {ts:%Y-%m-%d %H:%M:%S} UTC")
        evidence = alert.evidence if isinstance(alert.evidence, dict) else None
        if evidence is None:
            st.markdown(f"{alert.message}  \n_Stored before alerts carried their evidence: no baseline or "
                        "threshold to show._")
        else:
            st.markdown(f"**Why:** {evidence['sentence']}")
        first_ms = (evidence or {}).get("trades", {}).get("first_ms")
        since = min(ts - AROUND_BEFORE, pd.Timestamp(first_ms, unit="ms", tz="UTC") if first_ms else ts)
        trades = q("trades_page", alert.symbol, since, ts + AROUND_AFTER, None, 5000)
        if not trades.empty:
            st.plotly_chart(alert_chart(alert, evidence, trades), width="stretch", key="alert_chart")
        if evidence is not None:
            evidence_table(evidence)
        verdict_panel(alert_id, alert.disposition)


VERDICTS = {"true_positive": "True positive", "false_positive": "False positive", "needs_review": "Needs review"}


def record_verdict(alert_id: str) -> None:
    """Button callback: the verdict, its note and the analyst's name from the panel's widgets."""
    if acknowledge_allowed()[0]:         # the same rule as acknowledging, checked here too
        note = (st.session_state.get(f"note-{alert_id}") or "").replace("\x00", "")
        detections.set_disposition(engine(), alert_id, st.session_state[f"verdict-{alert_id}"], note,
                                   (st.session_state.get("analyst") or "").strip() or "dashboard", "dashboard")
        q.clear()


def verdict_panel(alert_id: str, current: str | None) -> None:
    """Mark the alert true or false positive, or for review, with a note; every change is kept."""
    allowed, note = acknowledge_allowed()
    st.markdown(f"**Disposition:** {VERDICTS.get(current, 'not marked yet')}")
    choice, text, name, button = st.columns([3, 3, 2, 1], vertical_alignment="bottom")
    choice.radio("Verdict", list(VERDICTS), format_func=VERDICTS.get, key=f"verdict-{alert_id}", horizontal=True)
    text.text_input("Note (optional)", key=f"note-{alert_id}", max_chars=2000)
    name.text_input("Your name", key="analyst", max_chars=100, placeholder="dashboard")
    button.button("Record", key="record-verdict", on_click=record_verdict, args=(alert_id,), disabled=not allowed,
                  help=note or "Adds the verdict to the alert's history")
    history = q("disposition_history", alert_id)
    if not history.empty:
        st.table(pd.DataFrame({
            "When (UTC)": [f"{pd.Timestamp(t):%Y-%m-%d %H:%M:%S}" for t in history["at"]],
            "Who": [f"{w} ({v})" for w, v in zip(history.by_whom, history.via)],
            "From": [VERDICTS.get(p, "not marked") for p in history.previous],
            "To": [VERDICTS[d] for d in history.disposition], "Note": history.note.fillna("")}).set_index("When (UTC)"))


def alert_chart(alert, evidence: dict | None, trades: pd.DataFrame) -> go.Figure:
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.05)
    figure.add_trace(go.Scatter(x=trades.ts, y=trades.price, name="Price", mode="lines+markers",
                                marker=dict(size=4), line=dict(color="#1f77b4", width=1)), 1, 1)
    figure.add_trace(go.Bar(x=trades.ts, y=trades.quantity, name="Quantity", marker_color="#7f7f7f"), 2, 1)
    fired = trades[trades.trade_id == alert.trade_id]
    if not fired.empty:
        figure.add_trace(go.Scatter(x=fired.ts, y=fired.price, name="This trade", mode="markers",
                                    marker=dict(color=SEVERITY_COLORS.get(alert.severity, "#000"), size=14,
                                                symbol="star")), 1, 1)
    if evidence is not None and evidence["measured"] in BOOK_MEASURES:
        book_lines(figure, evidence)
    elif evidence is not None:
        row = 2 if evidence["measured"] == "quantity" else 1      # a whale's lines are on the quantities
        start = trades.ts.min()
        if evidence["trades"].get("first_ms"):
            start = pd.Timestamp(evidence["trades"]["first_ms"], unit="ms", tz="UTC")
        span = [start, pd.Timestamp(alert.ts)]      # as the trade was judged
        lines = [("Threshold", evidence.get("level"), dict(dash="dot", color="#d62728"))]
        if evidence["measured"] != "burst":         # a burst's baseline is a count of trades, not a price
            lines.append(("Baseline", evidence.get("baseline"), dict(dash="dash", color="#2ca02c")))
        for name, value, style in lines:
            if value is not None:
                figure.add_trace(go.Scatter(x=span, y=[value, value], name=name, mode="lines", line=style), row, 1)
    figure.update_layout(height=360, margin=dict(l=10, r=10, t=30, b=10), legend=dict(orientation="h", y=-0.15),
                         title=f"{alert.symbol}: trades around the alert")
    return figure


# what the book's rules measure (tradewatch/detect/book_rules.py): an order's size, a count of updates
BOOK_MEASURES = ("size", "updates")


def book_lines(figure: go.Figure, evidence: dict) -> None:
    """A book alert over the trades: the time its messages span, shaded, and for a spoof each
    order's price over its life (from placed to cancelled)."""
    first, last = (pd.Timestamp(evidence["trades"][k], unit="ms", tz="UTC") for k in ("first_ms", "last_ms"))
    figure.add_vrect(x0=first, x1=max(last, first + pd.Timedelta(milliseconds=200)), fillcolor="#ff7f0e",
                     opacity=0.15, line_width=0, row=1, col=1)
    extra = evidence.get("extra", {})
    for price in extra.get("prices", []):
        figure.add_trace(go.Scatter(x=[first, last], y=[price, price], mode="lines",
                                    name=f"Pulled {extra.get('side', '')} order", line=dict(color="#d62728", width=3),
                                    showlegend=price == extra["prices"][0]), 1, 1)


def evidence_table(evidence: dict) -> None:
    unit = {"%": " %", "x": "×", "sigma": " σ", "score": "", "s": " s"}.get(evidence["unit"], "")
    trades = evidence["trades"]
    span = " → ".join(f"{pd.Timestamp(ms, unit='ms', tz='UTC'):%H:%M:%S.%f}"[:-3]
                      for ms in (trades.get("first_ms"), trades.get("last_ms")) if ms)
    rows = {"Rule": evidence["rule"], "Measured": f"{evidence['measured']} {exact(evidence['value'])}",
            "Baseline": "—" if evidence["baseline"] is None else exact(evidence["baseline"]),
            "Baseline is": evidence["baseline_how"],
            "Change": f"{evidence['change']:+.3f}{unit}", "Threshold": f"{evidence['threshold']:g}{unit}",
            "Threshold is": evidence["threshold_how"],
            "Tick": "—" if evidence.get("tick") is None else exact(evidence["tick"]),
            "Book messages" if evidence["measured"] in BOOK_MEASURES else "Trades":
                f"{trades['count']:,} named" + (f" ({span} UTC)" if span else "") + f"; fired on {trades['trade_id']}",
            "Parameters": ", ".join(f"{k}={v}" for k, v in evidence["params"].items())}
    st.table(pd.DataFrame({"": list(rows), "Evidence": list(rows.values())}).set_index(""))
    drivers = evidence.get("extra", {}).get("drivers")
    if drivers:
        st.table(pd.DataFrame({"Feature": [d["feature"] for d in drivers],
                               "Value": [f"{d['value']:.4g}" for d in drivers],
                               "Typical": [f"{d['typical']:.4g}" for d in drivers],
                               "Score without it": [f"{d['score_without']:.2f}" for d in drivers]})
                 .set_index("Feature"))


def symbol_view(symbol: str, since, until, previous_since) -> None:
    st.subheader(f"{symbol} in depth")
    kpi_row([symbol], since, until, previous_since)
    candles, book = st.columns([3, 2])
    with candles:
        candle_panel([symbol], since, until)
    with book:
        book_panel(symbol)
    st.subheader("Flagged trades")
    flagged = q("symbol_flags", symbol, since, until)
    if flagged.empty:
        no_data(f"flagged trades of {symbol}")
    else:
        st.table(pd.DataFrame({
            "Time (UTC)": [f"{pd.Timestamp(t):%Y-%m-%d %H:%M:%S.%f}"[:-3] for t in flagged.ts],
            "Side": flagged.side, "Price": [exact(p) for p in flagged.price],
            "Quantity": [exact(v, 0) for v in flagged.quantity], "Severity": flagged.severity,
            "Kinds": flagged.types, "Score": [f"{v:.1f}" for v in flagged.score]}).set_index("Time (UTC)").head(20))
    whales_and_tape([symbol], since, until)
    events_panel([symbol])
    alert_feed([symbol])


# What moves with every trade is redrawn at the refresh the user chose; the rest of the overview —
# the shares of volume, the scanner, the pump-and-dump events and the pipeline's samples (each stage
# writes one every 10 s) — every PANEL_REFRESH_S, in a second fragment. Redrawn on every refresh,
# those panels cost a browser about a third of what the page does (bench/dashboard_cpu.py). Two
# fragments, not one per panel: every fragment's run costs the browser a pass over the page.
PANEL_REFRESH_S = 10
FAST = timedelta(seconds=refresh)
SLOW = timedelta(seconds=max(refresh, PANEL_REFRESH_S))


def shown_range() -> tuple | None:
    """(symbols, since, until, span) of the chosen range, ending at the newest data; None before any."""
    anchor = q("data_anchor")
    if anchor is None:
        return None
    until = anchor + timedelta(milliseconds=1)
    span = timedelta(minutes=RANGES[range_name])
    return [view] if view != ALL_SYMBOLS else chosen or None, until - span, until, span


@st.fragment(run_every=FAST)
def live() -> None:
    try:
        health_strip()
        shown = shown_range()
        if shown is None:
            st.info("No data yet — start the pipeline with `make demo` (or producer.py + consumer.py).", icon=":material/hourglass_empty:")
            return
        symbols, since, until, span = shown
        simulated = history.span(settings)
        slower = ("" if view != ALL_SYMBOLS or SLOW == FAST else
                  f" (scanner, shares and pipeline every {SLOW.seconds} s)")
        st.caption(f"{range_name} of data, up to {until - timedelta(milliseconds=1):%Y-%m-%d %H:%M:%S} UTC · "
                   f"refreshing every {refresh} s{slower} · "
                   f"metrics from `{source}`" + ("" if simulated is None or simulated[1] <= since else
                   f" · {simulated[0]:%H:%M:%S}–{simulated[1]:%H:%M:%S} UTC (shaded) was simulated when the "
                   f"demo started, live since"))
        if view != ALL_SYMBOLS:
            symbol_view(view, since, until, since - span)
            return
        kpi_row(symbols, since, until, since - span)
        candle_panel(symbols, since, until)
        books_panel(symbols)
        price_panel(symbols, since, until)
        whales_and_tape(symbols, since, until)
        alert_feed(symbols)
    except DBAPIError as error:
        database_down(error)


@st.fragment(run_every=SLOW)
def slower_panels() -> None:
    """The overview's slower half; nothing in the symbol view or before any data. A database outage
    is said once, by `live`."""
    try:
        shown = shown_range()
        if shown is None or view != ALL_SYMBOLS:
            return
        symbols, since, until, _ = shown
        share_panels(symbols, since, until)
        scanner_panel(symbols, since, until)
        events_panel(symbols)
        pipeline_panel()
    except DBAPIError:
        pass


live()
slower_panels()
