"""Writes the two venue samples next to this file (run it again only to change them):

    coinbase_matches.jsonl   Coinbase Exchange `matches` channel: last_match, match, heartbeat
    binance_trades.jsonl     Binance Spot `<symbol>@trade` events

Each line is one WebSocket text frame in the shape of the venue's public documentation (these
machines have no internet: nothing here was recorded from a venue). Each sample has two symbols,
~300 frames, and on purpose: one jump in one symbol's trade ids (3 trades never sent), one frame
that is not JSON (cut off), one trade whose id is not a number, and a `# disconnect` line where the
replay server (tradewatch/market/replay_server.py) drops the connection.
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


def main() -> None:
    (HERE / "coinbase_matches.jsonl").write_text("\n".join(coinbase(random.Random(16))) + "\n")
    (HERE / "binance_trades.jsonl").write_text("\n".join(binance(random.Random(61))) + "\n")


if __name__ == "__main__":
    main()
