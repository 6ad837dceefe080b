"""Writes the venue samples next to this file (run it again only to change them):

    coinbase_matches.jsonl   Coinbase Exchange `matches` channel: last_match, match, heartbeat
    binance_trades.jsonl     Binance Spot `<symbol>@trade` events
    coinbase_book.jsonl      Coinbase `level2_batch` (`l2update`) with `matches`, from `# book` states
    binance_book.jsonl       Binance `<symbol>@depth@100ms` (`depthUpdate`) with `@trade`, from `# book`
                             states (the REST snapshot the replay server answers is its book then)

Each line is one WebSocket text frame in the shape of the venue's public documentation (these
machines have no internet: nothing here was recorded from a venue). Each sample has two symbols,
~300 frames, and on purpose: one jump in one symbol's trade ids (3 trades never sent), one frame
that is not JSON (cut off), one trade whose id is not a number, and a `# disconnect` line where the
replay server (tradewatch/market/replay_server.py) drops the connection. The book samples have two
symbols each, ~260 book changes and some trades at the touch, one malformed change, a `# disconnect`,
and (Binance) one change `# lost` on the way — it adds a level far from the touch that no later
change moves, so a client that papered over the gap would end with a different book.
"""
from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).parent
START = datetime(2024, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def walk(rng: random.Random, price: float) -> float:
    return price * (1 + rng.gauss(0, 0.0003))


def coinbase(rng: random.Random) -> list[str]:
    prices = {"BTC-USD": 61250.0, "ETH-USD": 3412.5}
    ids = {"BTC-USD": 613_004_117, "ETH-USD": 498_221_870}
    sequence, when, lines = 78_112_004_551, START, []

    def match(product: str, kind: str = "match") -> dict:
        nonlocal sequence
        sequence += rng.randint(1, 40)
        prices[product] = walk(rng, prices[product])
        return {"type": kind, "trade_id": ids[product], "maker_order_id": f"{rng.getrandbits(128):032x}",
                "taker_order_id": f"{rng.getrandbits(128):032x}", "side": rng.choice(["buy", "sell"]),
                "size": f"{rng.lognormvariate(-4, 1.3):.8f}", "price": f"{prices[product]:.2f}",
                "product_id": product, "sequence": sequence, "time": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}

    for product in prices:                                  # sent once, right after subscribing
        lines.append(json.dumps(match(product, "last_match")))
    for n in range(290):
        when += timedelta(microseconds=rng.randint(20_000, 400_000))
        product = rng.choice(list(prices))
        ids[product] += 1
        if n == 120:
            ids[product] += 3                               # the gap: three trades never sent
        lines.append(json.dumps(match(product)))
        if n % 25 == 24:
            for p in prices:
                lines.append(json.dumps({"type": "heartbeat", "sequence": sequence, "last_trade_id": ids[p],
                                         "product_id": p, "time": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}))
        if n == 80:
            lines.append('{"type":"match","trade_id":')      # cut off: not JSON
        if n == 150:
            bad = match(product)
            bad["trade_id"] = "n/a"                          # an id that is not a number
            lines.append(json.dumps(bad))
        if n == 200:
            lines.append("# disconnect")
    return lines


def binance(rng: random.Random) -> list[str]:
    prices = {"BTCUSDT": 61240.01, "ETHUSDT": 3411.87}
    ids = {"BTCUSDT": 3_471_552_908, "ETHUSDT": 1_390_004_512}
    when_ms, lines = int(START.timestamp() * 1000), []
    for n in range(295):
        when_ms += rng.randint(5, 300)
        symbol = rng.choice(list(prices))
        ids[symbol] += 1
        if n == 140:
            ids[symbol] += 3
        prices[symbol] = walk(rng, prices[symbol])
        event = {"e": "trade", "E": when_ms + rng.randint(0, 4), "s": symbol, "t": ids[symbol],
                 "p": f"{prices[symbol]:.8f}", "q": f"{rng.lognormvariate(-4, 1.3):.8f}", "T": when_ms,
                 "m": rng.random() < 0.5, "M": True}
        lines.append(json.dumps(event, separators=(",", ":")))
        if n == 60:
            lines.append('{"e":"trade","E":17092')            # cut off: not JSON
        if n == 170:
            lines.append(json.dumps({**event, "t": "n/a"}, separators=(",", ":")))
        if n == 210:
            lines.append("# disconnect")
    return lines


class Ladder:
    """One symbol's book on a tick grid around a mid that wanders; changes only within `reach`
    ticks of the mid (so a level put farther away stays as it is)."""

    def __init__(self, rng: random.Random, mid: float, tick: float, levels: int = 15):
        self.rng, self.mid, self.tick, self.reach = rng, mid, tick, levels + 4
        self.bids = {self.price(-i): self.size() for i in range(1, levels + 1)}
        self.asks = {self.price(i): self.size() for i in range(1, levels + 1)}

    def price(self, ticks: int) -> str:
        return f"{self.mid + ticks * self.tick:.2f}"

    def size(self) -> str:
        return f"{self.rng.lognormvariate(0, 1):.8f}"

    def state(self) -> tuple[list, list]:
        return ([[p, q] for p, q in sorted(self.bids.items(), key=lambda x: -float(x[0]))],
                [[p, q] for p, q in sorted(self.asks.items(), key=lambda x: float(x[0]))])

    def changes(self) -> tuple[list, list]:
        """A few levels changed, added or removed; now and then the mid moves a tick (levels that
        would cross it go)."""
        bids, asks = [], []
        if self.rng.random() < 0.15:
            self.mid += self.tick * self.rng.choice((-1, 1))
            for side, out, crossed in ((self.bids, bids, lambda p: p >= self.mid),
                                       (self.asks, asks, lambda p: p <= self.mid)):
                for price in [p for p in side if crossed(float(p))]:
                    del side[price]
                    out.append([price, "0.00000000"])
        for _ in range(self.rng.randint(1, 3)):
            is_bid = self.rng.random() < 0.5
            side, out, sign = (self.bids, bids, -1) if is_bid else (self.asks, asks, 1)
            price = self.price(sign * self.rng.randint(1, self.reach))
            if price in side and self.rng.random() < 0.3:
                del side[price]
                out.append([price, "0.00000000"])
            else:
                side[price] = self.size()
                out.append([price, side[price]])
        return bids, asks

    def far(self) -> tuple[list, list]:
        price = self.price(-(self.reach + 30))
        self.bids[price] = "7.77000000"
        return [[price, "7.77000000"]], []


def binance_book(rng: random.Random) -> list[str]:
    ladders = {"BTCUSDT": Ladder(rng, 61240.00, 0.01), "ETHUSDT": Ladder(rng, 3411.80, 0.01)}
    update_ids = {"BTCUSDT": 48_211_700_000, "ETHUSDT": 31_877_400_000}
    trade_ids = {"BTCUSDT": 3_471_552_908, "ETHUSDT": 1_390_004_512}
    when_ms = int(START.timestamp() * 1000)
    lines = []
    for symbol, ladder in ladders.items():
        bids, asks = ladder.state()
        lines.append("# book " + json.dumps({"s": symbol, "lastUpdateId": update_ids[symbol], "bids": bids,
                                             "asks": asks}, separators=(",", ":")))
    for n in range(260):
        when_ms += rng.randint(20, 150)
        symbol = "BTCUSDT" if n == 100 else rng.choice(list(ladders))
        ladder = ladders[symbol]
        bids, asks = ladder.far() if n == 100 else ladder.changes()
        first = update_ids[symbol] + 1
        update_ids[symbol] += rng.randint(1, 6)
        event = {"e": "depthUpdate", "E": when_ms, "s": symbol, "U": first, "u": update_ids[symbol],
                 "b": bids, "a": asks}
        line = json.dumps(event, separators=(",", ":"))
        lines.append(("# lost " if n == 100 else "") + line)
        if n % 6 == 5:
            trade_ids[symbol] += 1
            buy = rng.random() < 0.5
            price = min(ladder.asks, key=float) if buy else max(ladder.bids, key=float)
            lines.append(json.dumps({"e": "trade", "E": when_ms, "s": symbol, "t": trade_ids[symbol], "p": price,
                                     "q": f"{rng.lognormvariate(-4, 1.3):.8f}", "T": when_ms, "m": not buy, "M": True},
                                    separators=(",", ":")))
        if n == 60:
            lines.append(json.dumps({**event, "U": "n/a"}, separators=(",", ":")))   # ids that are no numbers
        if n == 180:
            lines.append("# disconnect")
    return lines


def coinbase_book(rng: random.Random) -> list[str]:
    ladders = {"BTC-USD": Ladder(rng, 61250.00, 0.01), "ETH-USD": Ladder(rng, 3412.50, 0.01)}
    trade_ids = {"BTC-USD": 613_004_117, "ETH-USD": 498_221_870}
    when, lines = START, []
    for product, ladder in ladders.items():
        bids, asks = ladder.state()
        lines.append("# book " + json.dumps({"product_id": product, "bids": bids, "asks": asks}))
    for n in range(260):
        when += timedelta(microseconds=rng.randint(20_000, 150_000))
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        product = rng.choice(list(ladders))
        ladder = ladders[product]
        bids, asks = ladder.changes()
        changes = [["buy", p, q] for p, q in bids] + [["sell", p, q] for p, q in asks]
        lines.append(json.dumps({"type": "l2update", "product_id": product, "changes": changes, "time": stamp}))
        if n % 6 == 5:
            trade_ids[product] += 1
            buy = rng.random() < 0.5
            price = min(ladder.asks, key=float) if buy else max(ladder.bids, key=float)
            lines.append(json.dumps({"type": "match", "trade_id": trade_ids[product], "side": "sell" if buy else "buy",
                                     "size": f"{rng.lognormvariate(-4, 1.3):.8f}", "price": price,
                                     "product_id": product, "sequence": 78_112_004_551 + n, "time": stamp}))
        if n == 60:
            lines.append(json.dumps({"type": "l2update", "product_id": product, "changes": [["up", "1", "1"]],
                                     "time": stamp}))                          # a side that is neither
        if n == 180:
            lines.append("# disconnect")
    return lines


def main() -> None:
    (HERE / "coinbase_matches.jsonl").write_text("\n".join(coinbase(random.Random(16))) + "\n")
    (HERE / "binance_trades.jsonl").write_text("\n".join(binance(random.Random(61))) + "\n")
    (HERE / "coinbase_book.jsonl").write_text("\n".join(coinbase_book(random.Random(23))) + "\n")
    (HERE / "binance_book.jsonl").write_text("\n".join(binance_book(random.Random(32))) + "\n")


if __name__ == "__main__":
    main()
