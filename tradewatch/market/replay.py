"""Replay of recorded data: CSV files (optionally gzipped, or the one file of a .zip) of trades, of
1-minute bars or of quotes.

Trades files need a timestamp and a price column; quantity, symbol, trade id, exchange, side (or
whether the buyer was the maker), sale condition and the bid and ask of the trade's moment are
mapped by name (defaults fit ../shared/data/lean/*_trades.csv.gz). Binance's public trade files
(data.binance.vision: `trades` and `aggTrades`, spot without a header line, futures with one) replay
as downloaded, zipped or not: their layout is known, the taker's side comes from `is_buyer_maker`,
the symbol from the file's name, the trade id as the live feed's (`binance:<symbol>:<id>`).
A bars file (open, high, low, close, volume columns) becomes four trades per bar at the bar's open,
high, low and close, splitting its volume evenly. A quotes file (timestamp, bid, bid_size, ask,
ask_size; no price column) is the top of a book over time: each row a best bid and ask with their
sizes, an empty or 0 price an empty side.

Several files replay as one (`load_files`, what `producer.py --replay A --replay B` does): a day's
trades with its quotes. A trade without its own bid and ask takes those of its symbol's last quote
at or before it. Trades without a side get one by the quote rule where the quote is known (above
the midpoint a buy, below a sell; Lee and Ready, 1991), else by the tick rule (uptick buy,
downtick sell, unchanged the previous side). `events` merges the trades with the quotes as book
messages of a one-level book (tradewatch/book.py) in event time, a quote before a trade of the
same millisecond.

Rows that cannot be read (a value that is not one, a row cut short) are reported with their line
number and skipped; the rest replays.

A replay streams (`Replay`, what the producer sends from): each file is read as it is sent, so memory
holds REORDER_ROWS rows a file, not the file — a month of a busy pair's trades is tens of millions
of rows. Rows slightly out of event-time order come out in order (they are held that many rows);
one further out is sent when it is read, late, and counted. A file that cannot be read at all (no
such file, missing columns, not a CSV) is refused before anything is sent; damage found further in
ends the replay there, after the rows before it. `load_files` reads whole files into lists, sorted.
"""
from __future__ import annotations

import csv
import gzip
import heapq
import io
import itertools
import logging
import math
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tradewatch.book import SNAPSHOT_EVERY_MS, BookMessage, InvalidBook, decode_book
from tradewatch.events import InvalidTrade, Trade, iso_to_ms, trade_from_dict

log = logging.getLogger(__name__)

SIDE_WORDS = {"b": "buy", "buy": "buy", "bid": "buy", "s": "sell", "sell": "sell", "ask": "sell"}
BAR_OFFSETS_MS = (0, 15_000, 30_000, 45_000)  # where open, high, low, close land inside a 1m bar


@dataclass
class ColumnMap:
    timestamp: str = "timestamp"
    price: str = "price"
    quantity: str = "quantity"
    symbol: str = "symbol"
    trade_id: str = "trade_id"
    exchange: str = "exchange"
    side: str = "side"
    buyer_maker: str = "is_buyer_maker"     # true: the buyer was the maker, so the taker sold
    condition: str = "condition"
    bid: str = "bid"
    bid_size: str = "bid_size"
    ask: str = "ask"
    ask_size: str = "ask_size"


# Binance's trade files: spot ones come without a header; futures ones have it, without is_best_match
BINANCE_LAYOUTS = {
    "trades": ("id", "price", "qty", "quote_qty", "time", "is_buyer_maker", "is_best_match"),
    "aggTrades": ("agg_trade_id", "price", "quantity", "first_trade_id", "last_trade_id", "transact_time",
                  "is_buyer_maker", "is_best_match"),
}
BINANCE_COLUMNS = {"trades": ColumnMap(timestamp="time", quantity="qty", trade_id="id"),
                   "aggTrades": ColumnMap(timestamp="transact_time", trade_id="agg_trade_id")}
BINANCE_FILE_NAME = re.compile(r"^(?P<symbol>[A-Za-z0-9_-]+?)-(?:trades|aggTrades)-\d{4}-\d{2}(-\d{2})?\.")


@dataclass(slots=True)
class Quote:
    """One row of a quotes file: a symbol's best bid and ask with their sizes (None, 0: an empty side)."""
    timestamp_ms: int
    symbol: str
    bid: float | None
    bid_size: float
    ask: float | None
    ask_size: float


REORDER_ROWS = 10_000    # rows a file holds to put rows slightly out of order in event time (~3 MB)
SKIPPED_KEPT = 100       # unreadable rows whose reasons are kept (all are counted)


@dataclass
class ReplayFile:
    """Files read whole (load_files)."""
    trades: list[Trade]
    quotes: list[Quote] = field(default_factory=list)
    skipped_rows: list[str] = field(default_factory=list)  # "line N: reason", the first SKIPPED_KEPT


def parse_time_ms(text: str) -> int:
    """ISO-8601 (UTC when no offset) or a number: epoch seconds, milliseconds or microseconds."""
    text = text.strip()
    if not text:
        raise ValueError("no time")
    try:
        number = float(text)
    except ValueError:
        return iso_to_ms(text)
    if number > 1e14:
        return int(number // 1000)      # microseconds
    if number > 1e11:
        return int(number)              # milliseconds
    return int(round(number * 1000))    # seconds


class ReplayError(ValueError):
    """A file of a replay that cannot be read: which one, and why."""
    def __init__(self, path: str | Path, error: Exception):
        super().__init__(f"cannot replay {path}: {error}")
        self.reason = error


class Replay:
    """Files replayed as one stream in event time, each read as it is taken (the module's docstring).

    Opening reads each file's first `hold` rows (None: the whole file, sorted) and raises ReplayError
    for a file that cannot be read; iterating raises it for damage found further in. `trades`,
    `quotes`, `late` and `skipped` count what was taken so far; `skipped_rows` keeps the first reasons."""

    def __init__(self, paths: Sequence[str | Path], columns: ColumnMap | None = None, symbol: str | None = None,
                 exchange: str = "REPLAY", hold: int | None = REORDER_ROWS):
        self.trades = self.quotes = self.late = self.skipped = 0
        self.skipped_rows: list[str] = []
        self._named = len(paths) > 1            # a reason names its file when there are several
        self.files: list[_File] = []
        try:
            for path in paths:
                self.files.append(_File(Path(path), columns or ColumnMap(), symbol, exchange, hold, self))
        except ReplayError:
            self.close()
            raise

    def has(self, kind: str) -> bool:
        """Whether a file of this kind ("trades" or "quotes") has rows left to replay."""
        return any(f.kind == kind and (f.held or f.rows is not None) for f in self.files)

    def held_trades(self) -> Iterator[Trade]:
        """The trades read ahead and not yet taken (at most `hold` a file)."""
        return (event for f in self.files if f.kind == "trades" for _, _, event in f.held)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def skip(self, path: Path, line: int, reason: str) -> None:
        self.skipped += 1
        if len(self.skipped_rows) < SKIPPED_KEPT:
            self.skipped_rows.append(f"{path}: line {line}: {reason}" if self._named else f"line {line}: {reason}")

    def __iter__(self) -> Iterator[Trade | Quote]:
        """The trades, each with its quote and a side (the module's docstring), and the quotes, in
        event time, a quote before a trade of the same millisecond."""
        latest: dict[str, Quote] = {}
        last_price: dict[str, float] = {}
        last_side: dict[str, str] = {}
        for event in heapq.merge(*self.files, key=lambda e: (e.timestamp_ms, type(e) is not Quote)):
            if type(event) is Quote:
                latest[event.symbol] = event
                self.quotes += 1
            else:
                quote = latest.get(event.symbol)
                if quote is not None and event.bid is None and event.ask is None:
                    event.bid, event.ask = quote.bid, quote.ask
                _infer_side(event, last_price, last_side)
                self.trades += 1
            yield event


class _File:
    """One file's rows as trades or quotes, read as they are taken and put in event time within the
    `hold` rows held (a heap of (event time, row order, event))."""

    def __init__(self, path: Path, columns: ColumnMap, symbol: str | None, exchange: str, hold: int | None,
                 replay: Replay):
        self.path, self.hold, self.replay = path, hold, replay
        self.held: list = []
        self.order, self.last_ms, self.skipped = 0, -math.inf, 0
        self.handle = None
        self.kind = "trades"
        self.rows: Iterator | None = None
        try:
            try:
                self.handle = io.TextIOWrapper(_binary(path), encoding="utf-8", newline="")
            except zipfile.BadZipFile as error:
                raise ValueError(f"not a readable .zip ({error})") from None
            self.rows = self._rows(columns, symbol, exchange)
            next(self.rows)             # the header read and checked, the kind known
            self._fill()
        except (OSError, ValueError) as error:
            self.close()
            raise ReplayError(path, error) from error

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        self.rows = None

    def __iter__(self) -> Iterator[Trade | Quote]:
        while self.held:
            ms, _, event = heapq.heappop(self.held)
            try:
                self._fill()
            except (OSError, ValueError) as error:
                self.close()
                raise ReplayError(self.path, error) from error
            if ms < self.last_ms:
                self.replay.late += 1       # read after later rows had gone: sent now, late
            else:
                self.last_ms = ms
            yield event

    def _fill(self) -> None:
        while self.rows is not None and (self.hold is None or len(self.held) < self.hold):
            item = next(self.rows, None)
            if item is None:
                self.close()
                if self.skipped:
                    log.warning("%s: skipped %d unreadable rows", self.path, self.skipped)
            elif isinstance(item[1], str):
                self.skipped += 1
                self.replay.skip(self.path, *item)
            else:
                heapq.heappush(self.held, (item[1].timestamp_ms, self.order, item[1]))
                self.order += 1

    def _rows(self, columns: ColumnMap, symbol: str | None, exchange: str):
        """None once the header is checked, then each row as (line, Trade or Quote, or why it cannot be read)."""
        handle = self.handle
        reader = csv.DictReader(handle)     # counts the lines read (none) until the file's reader is made
        try:
            first = next(handle, "")
            layout, headered = _binance_layout(next(csv.reader([first]), []))
            lines = itertools.chain([first], handle)
            reader = csv.DictReader(lines) if headered else csv.DictReader(lines, fieldnames=layout)
            prefix = ""
            if layout:          # ids as the live feed's; an aggregate's apart from the trades'
                kind = "aggTrades" if "agg_trade_id" in layout else "trades"
                columns, exchange = BINANCE_COLUMNS[kind], "BINANCE"
                match = BINANCE_FILE_NAME.match(self.path.name)
                symbol = symbol or (match["symbol"] if match else None)
                prefix = f"binance:{(symbol or '').upper()}:{'a' if kind == 'aggTrades' else ''}"
            self.kind, rows = _read(reader, self.path, columns, symbol, exchange,
                                    first_line=2 if headered else 1, id_prefix=prefix)
            yield None
            yield from rows
        except csv.Error as error:         # e.g. a field over the csv module's 128 KiB limit
            raise ValueError(f"line {reader.reader.line_num}: not readable as CSV ({error})") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"line {_first_not_utf8(self.path)}: not UTF-8 ({error.reason}); save the file as"
                             " UTF-8") from None
        except (EOFError, gzip.BadGzipFile, zipfile.BadZipFile, zlib.error) as error:
            raise ValueError(f"after line {reader.reader.line_num}: the compressed file is cut short or damaged "
                             f"({error})") from None


def load_files(paths: Sequence[str | Path], columns: ColumnMap | None = None, symbol: str | None = None,
               exchange: str = "REPLAY") -> ReplayFile:
    """Several files read whole as one replay: a Replay's trades and quotes, each list in event time
    (stable). Raises ReplayError."""
    feed = Replay(paths, columns, symbol, exchange, hold=None)
    result = ReplayFile([])
    for event in feed:
        (result.quotes if type(event) is Quote else result.trades).append(event)
    result.skipped_rows = feed.skipped_rows
    return result


def load(path: str | Path, columns: ColumnMap | None = None, symbol: str | None = None,
         exchange: str = "REPLAY") -> ReplayFile:
    """Read one trades, bars or quotes CSV whole (as load_files does; raises OSError or ValueError)."""
    try:
        return load_files([path], columns, symbol, exchange)
    except ReplayError as error:
        raise error.reason from None


def _binary(path: Path):
    """The file's bytes: plain, a .gz, or the one file inside a .zip (how Binance serves its files)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix != ".zip":
        return open(path, "rb")
    with zipfile.ZipFile(path) as archive:     # the member stays readable after the archive is closed
        names = [name for name in archive.namelist() if not name.endswith("/")]
        if len(names) != 1:
            raise ValueError(f"a .zip to replay holds one CSV file; this one holds {len(names)}: {names[:3]}")
        return archive.open(names[0])


def _binance_layout(fields: list[str]) -> tuple[tuple[str, ...], bool]:
    """The column names of a Binance trade file from its first row (a header or, in spot files, the
    first trade), and whether that row is a header; ((), True) for any other file."""
    fields = [f.strip() for f in fields]
    for names in BINANCE_LAYOUTS.values():
        if fields and fields == list(names[:len(fields)]) and len(fields) >= len(names) - 1:
            return names, True
    maker = {"trades": 5, "aggTrades": 6}
    for kind, names in BINANCE_LAYOUTS.items():
        if (len(names) - 1 <= len(fields) <= len(names) and fields[0].isdigit()
                and fields[maker[kind]].lower() in ("true", "false") and fields[maker[kind] - 1].isdigit()):
            return names[:len(fields)], False
    return (), True


def _first_not_utf8(path: Path) -> int | str:
    """The number of the first line that is not UTF-8 (the text reader decodes whole blocks)."""
    with _binary(path) as raw:
        for number, line in enumerate(raw, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return "?"


def _read(reader: csv.DictReader, path: Path, columns: ColumnMap, symbol: str | None, exchange: str,
          first_line: int = 2, id_prefix: str = ""):
    """The file's kind ("trades" for trades and bars, or "quotes") and its rows as (line, Trade or
    Quote, or why the row cannot be read); raises ValueError for a header that does not fit."""
    header = set(reader.fieldnames or [])
    is_bars = {"open", "high", "low", "close"} <= header and columns.price not in header
    is_quotes = {columns.bid, columns.ask} <= header and columns.price not in header
    if is_quotes:
        missing = [c for c in (columns.timestamp, columns.bid_size, columns.ask_size) if c not in header]
        if missing:
            raise ValueError(f"{path}: a quotes file (bid and ask, no price) needs the column(s) "
                             f"{', '.join(map(repr, missing))} (columns are {', '.join(sorted(header))}); map them "
                             "with --timestamp-column/--bid-size-column/--ask-size-column")
    elif not is_bars:
        missing = [c for c in (columns.timestamp, columns.price) if c not in header]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (columns are "
                             f"{', '.join(sorted(header))}); map them with --timestamp-column/--price-column")
    if columns.symbol not in header and not symbol:
        raise ValueError(f"{path}: no '{columns.symbol}' column" + (" and no symbol in the file's name" if id_prefix
                         else "") + "; pass --symbol to name the instrument")
    if is_quotes:
        return "quotes", _quote_rows(reader, columns, symbol, exchange)
    rows = _bar_rows(reader, columns, symbol) if is_bars else \
        _trade_rows(reader, columns, symbol, path.stem, first_line, id_prefix)
    return "trades", _trades(rows, exchange)


def _trades(rows, exchange: str):
    for line, row in rows:
        if isinstance(row, str):
            yield line, row
            continue
        try:
            row.setdefault("exchange", exchange)
            yield line, trade_from_dict(row)
        except (InvalidTrade, ValueError, KeyError) as error:
            yield line, str(error)


# The row readers yield (line number, event dict) or (line number, reason it cannot be read).
def _fields(reader: csv.DictReader, first_line: int):
    """Each row of the file as (line number, its fields), blank lines left out (as csv.DictReader does),
    with a column absent from the header (`_column`'s -1) and those missing from a row cut short read
    as empty."""
    width = len(reader.fieldnames or ())
    for line, row in enumerate(filter(None, reader.reader), start=first_line):     # its csv.reader: lists
        if len(row) < width:
            row += [""] * (width - len(row))
        row.append("")
        yield line, row


def _column(reader: csv.DictReader, name: str) -> int:
    """Where a column is in a row of `_fields` (a repeated name: its last, as csv.DictReader); -1 when absent."""
    return {column: i for i, column in enumerate(reader.fieldnames or ())}.get(name, -1)


def _trade_rows(reader: csv.DictReader, columns: ColumnMap, symbol: str | None, stem: str, first_line: int = 2,
                id_prefix: str = ""):
    (trade_id, symbol_at, timestamp, price, quantity, side, buyer_maker, condition, exchange, bid, ask) = (
        _column(reader, getattr(columns, name)) for name in ("trade_id", "symbol", "timestamp", "price", "quantity",
                                                            "side", "buyer_maker", "condition", "exchange", "bid",
                                                            "ask"))
    for line, row in _fields(reader, first_line):
        try:
            event: dict[str, object] = {
                "schema_version": 1,
                "trade_id": id_prefix + row[trade_id] if row[trade_id] else f"{stem}-{line}",
                "symbol": (row[symbol_at] or symbol or "").upper(),
                "timestamp_ms": parse_time_ms(row[timestamp]),
                "price": _float(row[price]),
                "quantity": _float(row[quantity]) if row[quantity] else 1.0,
                "side": SIDE_WORDS.get(row[side].strip().lower()) or _taker(row[buyer_maker]),
                "condition": row[condition] or None,
            }
            if row[exchange]:
                event["exchange"] = row[exchange]
            for name, at in (("bid", bid), ("ask", ask)):
                quoted = _price(row[at])
                if quoted is not None:
                    event[name] = quoted
        except (ValueError, TypeError) as error:
            yield line, f"unreadable value ({error})"
            continue
        yield line, event


def _bar_rows(reader: csv.DictReader, columns: ColumnMap, symbol: str | None):
    time_at = _column(reader, columns.timestamp if columns.timestamp in (reader.fieldnames or []) else "window_start")
    symbol_at, volume_at = _column(reader, columns.symbol), _column(reader, "volume")
    price_at = [_column(reader, name) for name in ("open", "high", "low", "close")]
    for line, row in _fields(reader, 2):
        try:
            start = parse_time_ms(row[time_at])
            name = (row[symbol_at] or symbol or "").upper()
            prices = [_float(row[at]) for at in price_at]
            volume = _float(row[volume_at] or "4") / 4
        except (ValueError, TypeError) as error:
            yield line, f"unreadable bar ({error})"
            continue
        for index, (offset, price) in enumerate(zip(BAR_OFFSETS_MS, prices)):
            yield line, {"schema_version": 1, "trade_id": f"{name}-bar-{start}-{index}", "symbol": name,
                         "timestamp_ms": start + offset, "price": price, "quantity": volume, "side": "unknown"}


def _quote_rows(reader: csv.DictReader, columns: ColumnMap, symbol: str | None, exchange: str):
    at = {name: _column(reader, getattr(columns, name)) for name in ("timestamp", "symbol", "bid", "bid_size", "ask",
                                                                     "ask_size")}
    for line, row in _fields(reader, 2):
        try:
            bid, ask = _price(row[at["bid"]]), _price(row[at["ask"]])
            bid_size = _float(row[at["bid_size"]]) if bid is not None else 0.0
            ask_size = _float(row[at["ask_size"]]) if ask is not None else 0.0
            quote = Quote(parse_time_ms(row[at["timestamp"]]), (row[at["symbol"]] or symbol or "").upper(),
                          bid if bid_size else None, bid_size if bid else 0.0,
                          ask if ask_size else None, ask_size if ask else 0.0)
        except (ValueError, TypeError) as error:
            yield line, f"unreadable quote ({error})"
            continue
        try:           # what the quotes stage would refuse, refused here with its reason
            decode_book(_message(quote, exchange, 0, None).to_json_bytes())
        except InvalidBook as error:
            yield line, f"not a quote a book can hold ({error})"
            continue
        yield line, quote


def _taker(buyer_maker: str | None) -> str:
    """The taker's side from whether the buyer was the maker (Binance's `is_buyer_maker`)."""
    text = (buyer_maker or "").strip().lower()
    if text not in ("true", "false", ""):
        raise ValueError(f"is the buyer the maker: {buyer_maker!r} is neither true nor false")
    return {"true": "sell", "false": "buy"}.get(text, "unknown")


def _price(text: str | None) -> float | None:
    """A quote's price: empty or 0 is no price (that side of the book is empty)."""
    if text is None or not text.strip():
        return None
    value = _float(text)
    return value if value != 0 else None


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def _infer_side(trade: Trade, last_price: dict[str, float], last_side: dict[str, str]) -> None:
    """Buy or sell for a trade without a side (trades taken in event time): the quote rule where the
    trade has a bid and ask and is off their midpoint, else the tick rule (uptick buy, downtick sell,
    zero tick the previous side)."""
    previous = last_price.get(trade.symbol)
    mid = None if trade.bid is None or trade.ask is None else (trade.bid + trade.ask) / 2
    if trade.side == "unknown" and mid is not None and trade.price != mid:
        trade.side = "buy" if trade.price > mid else "sell"
    elif trade.side == "unknown" and previous is not None:
        if trade.price > previous:
            trade.side = "buy"
        elif trade.price < previous:
            trade.side = "sell"
        else:
            trade.side = last_side.get(trade.symbol, "unknown")
    last_price[trade.symbol] = trade.price
    last_side[trade.symbol] = trade.side


def events(replayed: ReplayFile, exchange: str = "REPLAY") -> Iterator[Trade | BookMessage]:
    """The trades with their quotes as book messages, in event time (a quote first at equal times)."""
    return quote_books(heapq.merge(replayed.quotes, replayed.trades, key=lambda e: e.timestamp_ms), exchange)


def quote_books(events: Iterable[Quote | Trade], exchange: str = "REPLAY",
                snapshot_every_ms: int = SNAPSHOT_EVERY_MS) -> Iterator[BookMessage | Trade]:
    """Each symbol's quotes as book messages of a one-level book, trades passed on as they come: a
    snapshot first and every `snapshot_every_ms` of event time after, an update for each quote that
    changed the book (the old level removed where the price moved), nothing for a quote that repeats
    the last."""
    last: dict[str, Quote] = {}
    seqs: dict[str, int] = {}
    due: dict[str, int] = {}
    for quote in events:
        if type(quote) is not Quote:
            yield quote
            continue
        before = last.get(quote.symbol)
        snapshot = before is None or quote.timestamp_ms >= due[quote.symbol]
        if not snapshot and (before.bid, before.bid_size, before.ask, before.ask_size) == \
                (quote.bid, quote.bid_size, quote.ask, quote.ask_size):
            continue
        seq = seqs[quote.symbol] = seqs.get(quote.symbol, 0) + 1
        last[quote.symbol] = quote
        if snapshot:
            due[quote.symbol] = quote.timestamp_ms + snapshot_every_ms
            yield _message(quote, exchange, seq, None)
        else:
            yield _message(quote, exchange, seq, before)


def _message(quote: Quote, exchange: str, seq: int, before: Quote | None) -> BookMessage:
    """The snapshot of a quote's one-level book (`before` None), or the update from `before` to it."""
    if before is None:
        return BookMessage(quote.symbol, exchange, quote.timestamp_ms, "snapshot", seq,
                           [] if quote.bid is None else [(quote.bid, quote.bid_size)],
                           [] if quote.ask is None else [(quote.ask, quote.ask_size)])
    sides = []
    for old, old_size, new, new_size in ((before.bid, before.bid_size, quote.bid, quote.bid_size),
                                         (before.ask, before.ask_size, quote.ask, quote.ask_size)):
        change = [] if old is None or old == new else [(old, 0.0)]
        if new is not None and (new != old or new_size != old_size):
            change.append((new, new_size))
        sides.append(change)
    return BookMessage(quote.symbol, exchange, quote.timestamp_ms, "update", seq, sides[0], sides[1], seq - 1)
