"""A local WebSocket server that speaks a venue's public trade stream from a recorded sample: how the
tests reach `producer.py --live`, and a classroom without internet.

    python -m tradewatch.market.replay_server coinbase              # ws://127.0.0.1:8765
    python producer.py --live coinbase --url ws://127.0.0.1:8765

It waits for the venue's subscribe message (Coinbase `{"type": "subscribe", ...}` with the `matches`
channel; Binance `{"method": "SUBSCRIBE", "params": ["btcusdt@trade", ...]}`), answers it as the
venue does, then sends the sample's messages for the subscribed symbols, each line of the file one
text frame, exactly as written (malformed ones included). A line `# disconnect` drops the connection
there without a close frame, as a network failure does; the next connection resumes `--overlap`
messages before that point, so the client sees trades again that it must drop. Other connections
start from the beginning. At the end of the sample the connection stays open: the server pings it
every `--ping-interval` seconds (Binance: 20 s) and drops a client that does not answer in time, as
the venues do; the first answer is logged ("the client answers pings"). `--now` stamps each trade
with the time it is sent, so the dashboard shows it as live; `--loop` repeats the sample without end
(trade ids go on where the sample's ended; implies --now), for a lesson-long classroom demo:

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
from pathlib import Path

import orjson

from tradewatch.config import PROJECT_ROOT

log = logging.getLogger("tradewatch.replay_server")

SAMPLES = {"coinbase": PROJECT_ROOT / "tests" / "data" / "coinbase_matches.jsonl",
           "binance": PROJECT_ROOT / "tests" / "data" / "binance_trades.jsonl"}
DISCONNECT = "# disconnect"


class BadSubscription(ValueError):
    pass


def coinbase_accept(request: dict) -> tuple[set[str], str]:
    if request.get("type") != "subscribe":
        raise BadSubscription("expected a message of type subscribe")
    channels = {c if isinstance(c, str) else c.get("name") for c in request.get("channels", [])}
    products = request.get("product_ids") or []
    if "matches" not in channels or not products:
        raise BadSubscription("subscribe to the matches channel with product_ids")
    ack = {"type": "subscriptions", "channels": [{"name": name, "product_ids": products} for name in sorted(channels)]}
    return set(products), orjson.dumps(ack).decode()


def binance_accept(request: dict) -> tuple[set[str], str]:
    params = request.get("params") or []
    if request.get("method") != "SUBSCRIBE" or not all(isinstance(p, str) and p.endswith("@trade") for p in params):
        raise BadSubscription("expected SUBSCRIBE with <symbol>@trade streams")
    return {p.split("@")[0].upper() for p in params}, orjson.dumps({"result": None, "id": request.get("id")}).decode()


def coinbase_symbol(message: dict) -> str | None:
    return message.get("product_id")


def binance_symbol(message: dict) -> str | None:
    return message.get("s")


def coinbase_now(message: dict, now_ms: int) -> None:
    if "time" in message:
        message["time"] = datetime.fromtimestamp(now_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def binance_now(message: dict, now_ms: int) -> None:
    for field in ("E", "T"):
        if field in message:
            message[field] = now_ms


@dataclass(frozen=True)
class Speaks:
    accept: object
    symbol: object
    now: object
    trade_id: str            # the field holding the venue's integer trade id


VENUES = {"coinbase": Speaks(coinbase_accept, coinbase_symbol, coinbase_now, "trade_id"),
          "binance": Speaks(binance_accept, binance_symbol, binance_now, "t")}


class ReplayServer:
    def __init__(self, venue: str, lines: list[str], rate: float | None = 200.0, overlap: int = 3,
                 now: bool = False, ping_interval: float = 20.0, loop: bool = False):
        self.speaks, self.lines, self.rate, self.overlap = VENUES[venue], lines, rate, overlap
        self.now, self.loop = now or loop, loop
        self.spans = self._id_spans() if loop else {}
        self.resume_at: int | None = None        # where the connection after a drop starts (a position
                                                 # over the repeated sample: pass × lines + line)
        self.dropped: set[int] = set()          # the `# disconnect` lines already acted on
        self.connections = 0
        self.ping_interval = ping_interval

    async def handle(self, connection) -> None:
        self.connections += 1
        try:
            request = orjson.loads(await asyncio.wait_for(connection.recv(), timeout=30))
            symbols, ack = self.speaks.accept(request)
        except (BadSubscription, orjson.JSONDecodeError, AttributeError, TypeError) as error:
            await connection.send(orjson.dumps({"type": "error", "message": f"Failed to subscribe: {error}"}).decode())
            await connection.close()
            return
        await connection.send(ack)
        start, self.resume_at = (self.resume_at or 0), None
        position, sent_in_pass = start, 0
        while self.lines and (self.loop or position < len(self.lines)):
            repeat, index = divmod(position, len(self.lines))
            position += 1
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
                self.resume_at = max(start, position - 1 - self.overlap)
                log.info("dropping the connection at line %d (the next one resumes at %d)", index, self.resume_at)
                connection.transport.abort()
                return
            line = self._for(line, symbols, repeat)
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

    def _id_spans(self) -> dict[str, int]:
        """Per symbol, how far its trade ids reach in the sample: a repeat shifts them by as much,
        so the ids of the next pass go on where the sample's ended."""
        low: dict[str, int] = {}
        high: dict[str, int] = {}
        for line in self.lines:
            try:
                message = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(message, dict) and isinstance(message.get(self.speaks.trade_id), int):
                symbol, trade_id = self.speaks.symbol(message), message[self.speaks.trade_id]
                low[symbol], high[symbol] = min(low.get(symbol, trade_id), trade_id), max(high.get(symbol, trade_id), trade_id)
        return {symbol: high[symbol] - low[symbol] + 1 for symbol in low}

    def _for(self, line: str, symbols: set[str], repeat: int = 0) -> str | None:
        """The line to send to a client subscribed to `symbols` (None: not its symbol), in the
        sample's `repeat`-th pass (--loop)."""
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            return line                          # malformed on purpose: sent as written
        if not isinstance(message, dict):
            return line
        symbol = self.speaks.symbol(message)
        if symbol is not None and symbol.upper() not in symbols:
            return None
        if repeat and isinstance(message.get(self.speaks.trade_id), int):
            message[self.speaks.trade_id] += repeat * self.spans.get(symbol, 0)
        if self.now:
            self.speaks.now(message, int(time.time() * 1000))
            return orjson.dumps(message).decode()
        return line


def read_sample(path: Path) -> list[str]:
    return [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]


async def serve(server: ReplayServer, host: str, port: int, ready=print) -> None:
    from websockets.asyncio.server import serve as ws_serve
    async with ws_serve(server.handle, host, port, ping_interval=server.ping_interval,
                        ping_timeout=server.ping_interval) as running:
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
