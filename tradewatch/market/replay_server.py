"""A local WebSocket server that speaks a venue's public trade and book streams from a recorded
sample: how the tests reach `producer.py --live`, and a classroom without internet.

    python -m tradewatch.market.replay_server coinbase              # ws://127.0.0.1:8765
    python producer.py --live coinbase --url ws://127.0.0.1:8765

It waits for the venue's subscribe message (Coinbase `{"type": "subscribe", ...}` with the `matches`
and/or `level2_batch` channels; Binance `{"method": "SUBSCRIBE", "params": ["btcusdt@trade",
"btcusdt@depth@100ms", ...]}`), answers it as the venue does, then sends the sample's messages for
the subscribed symbols and channels, each line of the file one text frame, exactly as written
(malformed ones included).

Books: lines `# book {...}` (first in the file) give a symbol's book at the start (Binance
`{"s", "lastUpdateId", "bids", "asks"}`, Coinbase `{"product_id", "bids", "asks"}`); the server
applies each book message it passes (`depthUpdate`, `l2update`) to its own copy, and a line
`# lost {...}` is a book message applied but never sent, as a message lost on the way. Coinbase
subscribers to `level2_batch` get the `snapshot` of each book first; Binance clients fetch it as
from the venue, `GET /api/v3/depth?symbol=BTCUSDT&limit=100` on the same port.

A line `# disconnect` drops the connection
there without a close frame, as a network failure does; the next connection resumes `--overlap`
messages before that point, so the client sees trades again that it must drop. Other connections
start from the beginning. At the end of the sample the connection stays open: the server pings it
every `--ping-interval` seconds (Binance: 20 s) and drops a client that does not answer in time, as
the venues do; the first answer is logged ("the client answers pings"). `--now` stamps each message
with the time it is sent, so the dashboard shows it as live; `--loop` repeats the sample without end
(trade and update ids go on where the sample's ended; implies --now), for a lesson-long classroom
demo:

    python -m tradewatch.market.replay_server binance --loop --rate 20
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson

from tradewatch.config import PROJECT_ROOT

log = logging.getLogger("tradewatch.replay_server")

SAMPLES = {"coinbase": PROJECT_ROOT / "tests" / "data" / "coinbase_matches.jsonl",
           "binance": PROJECT_ROOT / "tests" / "data" / "binance_trades.jsonl"}
DISCONNECT = "# disconnect"


class BadSubscription(ValueError):
    pass


@dataclass(frozen=True)
class Subscription:
    symbols: set[str]        # upper case
    channels: set[str]       # trade, heartbeat, book


def coinbase_accept(request: dict) -> tuple[Subscription, str]:
    if request.get("type") != "subscribe":
        raise BadSubscription("expected a message of type subscribe")
    names = {c if isinstance(c, str) else c.get("name") for c in request.get("channels", [])}
    products = request.get("product_ids") or []
    channels = {{"matches": "trade", "heartbeat": "heartbeat", "level2_batch": "book"}.get(n) for n in names} - {None}
    if not channels - {"heartbeat"} or not products:
        raise BadSubscription("subscribe to the matches or level2_batch channel with product_ids")
    ack = {"type": "subscriptions", "channels": [{"name": name, "product_ids": products} for name in sorted(names)]}
    return Subscription({p.upper() for p in products}, channels), orjson.dumps(ack).decode()


BINANCE_STREAMS = {"trade": "trade", "depth": "book", "depth@100ms": "book"}


def binance_accept(request: dict) -> tuple[Subscription, str]:
    params = request.get("params") or []
    if request.get("method") != "SUBSCRIBE" or not params or not all(
            isinstance(p, str) and p.partition("@")[2] in BINANCE_STREAMS for p in params):
        raise BadSubscription("expected SUBSCRIBE with <symbol>@trade or <symbol>@depth@100ms streams")
    subscription = Subscription({p.split("@")[0].upper() for p in params},
                                {BINANCE_STREAMS[p.partition("@")[2]] for p in params})
    return subscription, orjson.dumps({"result": None, "id": request.get("id")}).decode()


def coinbase_symbol(message: dict) -> str | None:
    return message.get("product_id")


def binance_symbol(message: dict) -> str | None:
    return message.get("s")


def coinbase_channel(message: dict) -> str | None:
    channels = {"match": "trade", "last_match": "trade", "heartbeat": "heartbeat", "l2update": "book"}
    return channels.get(message.get("type"))


def binance_channel(message: dict) -> str | None:
    return {"trade": "trade", "depthUpdate": "book"}.get(message.get("e"))


def coinbase_now(message: dict, now_ms: int) -> None:
    if "time" in message:
        message["time"] = datetime.fromtimestamp(now_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def binance_now(message: dict, now_ms: int) -> None:
    for field in ("E", "T"):
        if field in message:
            message[field] = now_ms


class Book:
    """A venue's book as the server holds it: prices and sizes as the venue's strings."""

    def __init__(self, seq: int = 0, bids: list | None = None, asks: list | None = None):
        self.seq = seq
        self.bids = {p: q for p, q in bids or []}
        self.asks = {p: q for p, q in asks or []}

    def change(self, side: dict, price: str, size: str) -> None:
        if float(size) == 0:
            side.pop(price, None)
        else:
            side[price] = size

    def levels(self, limit: int | None = None) -> tuple[list, list]:
        bids = sorted(self.bids.items(), key=lambda level: -float(level[0]))[:limit]
        asks = sorted(self.asks.items(), key=lambda level: float(level[0]))[:limit]
        return [list(b) for b in bids], [list(a) for a in asks]


def coinbase_book(message: dict) -> tuple[str, Book]:
    return message["product_id"].upper(), Book(0, message["bids"], message["asks"])


def binance_book(message: dict) -> tuple[str, Book]:
    return message["s"].upper(), Book(message["lastUpdateId"], message["bids"], message["asks"])


def coinbase_apply(book: Book, message: dict) -> None:
    if all(side in ("buy", "sell") for side, _, _ in message["changes"]):      # else malformed on purpose
        for side, price, size in message["changes"]:
            book.change(book.bids if side == "buy" else book.asks, price, size)


def binance_apply(book: Book, message: dict) -> None:
    if not isinstance(message.get("U"), int):
        return                                   # malformed on purpose
    for price, size in message["b"]:
        book.change(book.bids, price, size)
    for price, size in message["a"]:
        book.change(book.asks, price, size)
    book.seq = message["u"]


@dataclass(frozen=True)
class Speaks:
    accept: object
    symbol: object
    channel: object
    now: object
    ids: dict                # channel -> the fields holding the venue's integer ids
    book: object             # a `# book` line -> (symbol, Book)
    apply: object            # a book message onto the server's Book


VENUES = {"coinbase": Speaks(coinbase_accept, coinbase_symbol, coinbase_channel, coinbase_now, {"trade": ("trade_id",)},
                             coinbase_book, coinbase_apply),
          "binance": Speaks(binance_accept, binance_symbol, binance_channel, binance_now,
                            {"trade": ("t",), "book": ("U", "u")}, binance_book, binance_apply)}
BOOK, LOST = "# book ", "# lost "


class ReplayServer:
    def __init__(self, venue: str, lines: list[str], rate: float | None = 200.0, overlap: int = 3,
                 now: bool = False, ping_interval: float = 20.0, loop: bool = False):
        self.speaks, self.rate, self.overlap = VENUES[venue], rate, overlap
        self.venue = venue
        self.now, self.loop = now or loop, loop
        self.books: dict[str, Book] = {}
        for line in lines:
            if line.startswith(BOOK):
                symbol, book = self.speaks.book(orjson.loads(line[len(BOOK):]))
                self.books[symbol] = book
        self.lines = [line for line in lines if not line.startswith(BOOK)]
        self.spans = self._id_spans() if loop else {}
        self.resume_at: int | None = None        # where the connection after a drop starts (a position
                                                 # over the repeated sample: pass × lines + line)
        self.applied = -1                        # the last position whose book message is in self.books
        self.dropped: set[int] = set()          # the `# disconnect` lines already acted on
        self.connections = 0
        self.ping_interval = ping_interval

    async def handle(self, connection) -> None:
        self.connections += 1
        try:
            request = orjson.loads(await asyncio.wait_for(connection.recv(), timeout=30))
            subscription, ack = self.speaks.accept(request)
        except (BadSubscription, orjson.JSONDecodeError, AttributeError, TypeError) as error:
            await connection.send(orjson.dumps({"type": "error", "message": f"Failed to subscribe: {error}"}).decode())
            await connection.close()
            return
        await connection.send(ack)
        if self.venue == "coinbase" and "book" in subscription.channels:
            for symbol in sorted(subscription.symbols & set(self.books)):
                bids, asks = self.books[symbol].levels()
                await connection.send(orjson.dumps({"type": "snapshot", "product_id": symbol, "bids": bids,
                                                    "asks": asks}).decode())
        start, self.resume_at = (self.resume_at or 0), None
        position, sent_in_pass = start, 0
        while self.lines and (self.loop or position < len(self.lines)):
            repeat, index = divmod(position, len(self.lines))
            here, position = position, position + 1
            if self.loop and index == len(self.lines) - 1:
                if repeat and not sent_in_pass:
                    break                         # nothing in the sample for these symbols
                sent_in_pass = 0
                await asyncio.sleep(0)
            line = self.lines[index]
            if line == DISCONNECT:
                if index in self.dropped:
                    continue
                self.dropped.add(index)
                self.resume_at = max(start, here - self.overlap)
                log.info("dropping the connection at line %d (the next one resumes at %d)", index, self.resume_at)
                connection.transport.abort()
                return
            line = self._for(line, subscription, repeat, apply=here > self.applied)
            self.applied = max(self.applied, here)
            if line is None:
                continue
            await connection.send(line)
            sent_in_pass += 1
            if self.rate:
                await asyncio.sleep(1 / self.rate)
        while True:                               # the end of the sample: keep-alive pings only
            try:
                await asyncio.wait_for(connection.wait_closed(), timeout=1.0)
                return
            except asyncio.TimeoutError:
                if connection.latency:            # set when the answer to a keep-alive ping came
                    log.info("the client answers pings (%.1f ms)", connection.latency * 1000)
                    await connection.wait_closed()
                    return

    def depth(self, connection, request):
        """The Binance REST snapshot, `GET /api/v3/depth?symbol=…&limit=…`; None for a WebSocket
        handshake (the stream)."""
        url = urlsplit(request.path)
        if url.path != "/api/v3/depth":
            return None
        query = parse_qs(url.query)
        book = self.books.get(query.get("symbol", [""])[0].upper())
        if book is None:
            return connection.respond(HTTPStatus.BAD_REQUEST, '{"code":-1121,"msg":"Invalid symbol."}')
        bids, asks = book.levels(int(query.get("limit", ["100"])[0]))
        return connection.respond(HTTPStatus.OK, orjson.dumps({"lastUpdateId": book.seq, "bids": bids,
                                                                "asks": asks}).decode())

    def _id_spans(self) -> dict[tuple[str, str], int]:
        """Per symbol and channel, how far its ids reach in the sample: a repeat shifts them by as
        much, so the ids of the next pass go on where the sample's ended."""
        low: dict[tuple[str, str], int] = {}
        high: dict[tuple[str, str], int] = {}
        for line in self.lines:
            try:
                message = orjson.loads(line.removeprefix(LOST))
            except orjson.JSONDecodeError:
                continue
            if not isinstance(message, dict):
                continue
            key = (self.speaks.symbol(message), self.speaks.channel(message))
            for name in self.speaks.ids.get(key[1], ()):
                if isinstance(message.get(name), int):
                    low[key] = min(low.get(key, message[name]), message[name])
                    high[key] = max(high.get(key, message[name]), message[name])
        return {key: high[key] - low[key] + 1 for key in low}

    def _for(self, line: str, subscription: Subscription, repeat: int = 0, apply: bool = False) -> str | None:
        """The line to send to a client with this subscription (None: not its symbol or channel, or
        lost), in the sample's `repeat`-th pass (--loop). `apply`: a book message goes into the
        server's book (the first time the server passes it)."""
        lost = line.startswith(LOST)
        try:
            message = orjson.loads(line.removeprefix(LOST))
        except orjson.JSONDecodeError:
            return line                          # malformed on purpose: sent as written
        if not isinstance(message, dict):
            return line
        symbol, channel = self.speaks.symbol(message), self.speaks.channel(message)
        if repeat:
            for name in self.speaks.ids.get(channel, ()):
                if isinstance(message.get(name), int):
                    message[name] += repeat * self.spans.get((symbol, channel), 0)
        if apply and channel == "book" and isinstance(symbol, str) and symbol.upper() in self.books:
            self.speaks.apply(self.books[symbol.upper()], message)
        if lost or (symbol is not None and symbol.upper() not in subscription.symbols) or (
                channel is not None and channel not in subscription.channels):
            return None
        if self.now:
            self.speaks.now(message, int(time.time() * 1000))
            return orjson.dumps(message).decode()
        return orjson.dumps(message).decode() if repeat else line


def read_sample(path: Path) -> list[str]:
    return [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]


async def serve(server: ReplayServer, host: str, port: int, ready=print) -> None:
    from websockets.asyncio.server import serve as ws_serve
    async with ws_serve(server.handle, host, port, ping_interval=server.ping_interval,
                        ping_timeout=server.ping_interval, process_request=server.depth) as running:
        bound = running.sockets[0].getsockname()[1]
        ready(f"listening on ws://{host}:{bound}")
        await running.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("venue", choices=sorted(VENUES))
    parser.add_argument("--file", type=Path, help="sample to replay (default: the venue's in tests/data)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 = any free port (printed)")
    parser.add_argument("--rate", default="200", help="messages per second, or 'max' (default 200)")
    parser.add_argument("--overlap", type=int, default=3, help="messages sent again after a drop (default 3)")
    parser.add_argument("--now", action="store_true", help="stamp each trade with the time it is sent")
    parser.add_argument("--loop", action="store_true",
                        help="repeat the sample forever, trade ids going on where it ended (implies --now)")
    parser.add_argument("--ping-interval", type=float, default=20.0,
                        help="seconds between keep-alive pings; no answer within as long drops the client (20)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)       # not a line per snapshot request
    path = args.file or SAMPLES[args.venue]
    try:
        lines = read_sample(path)
        rate = None if args.rate == "max" else float(args.rate)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    server = ReplayServer(args.venue, lines, rate, args.overlap, args.now, args.ping_interval, args.loop)
    try:
        asyncio.run(serve(server, args.host, args.port, ready=lambda text: print(text, flush=True)))
    except KeyboardInterrupt:
        pass
    except OSError as error:
        print(f"error: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
