"""Rule detectors and the per-trade detection pipeline.

    PRICE_SPIKE / PRICE_DROP   price more than `spike_pct` above / below the rolling average (HIGH)
    CIRCUIT_BREAKER            more than `circuit_pct` away (CRITICAL); per-symbol breaker
                               CLOSED → OPEN (on the move) → HALF_OPEN (after `cool_off_s` of event
                               time) → CLOSED (at the first normal price; another big move re-opens)
    VOLUME_SPIKE               a whale: quantity > `whale_factor` × the largest of the symbol's
                               previous 1,000 trades (real sizes are heavy-tailed: a trade 20× the
                               median is common, so no mean or log-normal σ) (MEDIUM); an alert only
                               when also beyond `whale_factor` × the largest of its past day, whales
                               left out (else the flag stays on the trade): a size that large comes
                               about once in `whale_factor`^α × n trades, α the sizes' tail exponent
                               and n those the reference spans, so over 1,000 trades whale alerts per
                               day grew with the trade count (5 a day at 1,600 trades an hour), over
                               a day they do not; on a symbol's first day, beyond `whale_factor` ×
                               what a whole day's largest would be (SpanMax.understatement: a
                               reference growing from a few hours raised 2–4 times a later day's);
                               an opening or closing auction print (AUCTION_CONDITIONS) only
                               against the symbol's earlier auction prints of its sale condition
    PRICE_ZSCORE               |rolling z-score of price| > `zscore_threshold` (MEDIUM)
    MOMENTUM_RUN               `run_length` same-direction moves in a row adding up to > `run_move_pct`
                               (MEDIUM)
    OUT_OF_RANGE               more than `range_widths` band widths beyond the band forecast for the
                               trade's minute at the close of the minute before (HIGH): a line that
                               follows the symbol's own volatility (tradewatch/detect/band.py)
    ISOLATION_FOREST           the model's score beyond its calibrated threshold (MEDIUM)
    PUMP_AND_DUMP              a burst of aggressive buying lifting the price, followed through its
                               phases pump (CRITICAL) → peak → dump (HIGH) → over (MEDIUM), one
                               alert per phase (tradewatch/detect/pump.py)

The price thresholds respect the instrument: a move counts only beyond `spike_pct`, `spike_ticks`
ticks (the symbol's tick, learned from its prices), `spike_sigmas` rolling standard deviations and
`spike_spreads` spreads (the symbol's usual spread, learned from its trades: SymbolState.learn),
whichever is largest — the σ grown by the pair's own walk over the time since the window's
trades (SymbolState.walk_at: the first trade after a quiet hour is judged against how far the price
walks in an hour); the circuit breaker at twice that (at least `circuit_pct`); a momentum run
must add up to `run_ticks` ticks per move and `spike_spreads` spreads; OUT_OF_RANGE's move from
the last close (a print, not the mid) `spike_ticks` ticks and twice `spike_spreads` spreads; the
z-score's σ (grown likewise) is at least half a spread. So a one-tick bounce on an illiquid pair,
where a tick is 1 % of the price, is never a "5 % move", nor a buy that crosses a spread of 6 %. While
a symbol's pump-and-dump event is open its other alerts are held back (their flags are kept): the
event is the story. A price move is one story too: its first trade's alerts go out, and while the
price stays away the later trades' price flags raise no alert unless more severe (RuleDetector._tell)
— a pair that trades 20 % lower after a quiet spell is one PRICE_DROP, not one per rule and minute
until the new level is accepted. So is a print: one at the price of a print told in the past day is
that print reported again (RuleDetector._once).

Rules stay silent until a symbol has `min_history` normal trades. Each firing carries its
evidence (tradewatch/detect/evidence.py): the threshold and how it was set, the baseline and the
trades it was computed over.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from tradewatch.detect.band import Band
from tradewatch.detect.evidence import Evidence, num, percent, trades_named
from tradewatch.detect.features import (AUCTION_PRINTS, PRICE_Z_MIN_STD, WHALE_DAY_MS, WHALE_WINDOW, SymbolState,
                                        TradeFeatures)
from tradewatch.detect.pump import PHASE_SEVERITY, burst_bar
from tradewatch.events import Trade, duration
from tradewatch.extremes import TAIL_EXPONENT
from tradewatch.volatility import UNTRAINED, Live, scaled

DETECTOR_VERSION = "rules-1"
SEVERITY_RANK = {"LOW": 0, "MEDIUM": 1, "HIGH": 2, "CRITICAL": 3}
MOVE_TYPES = frozenset({"PRICE_SPIKE", "PRICE_DROP", "PRICE_ZSCORE", "CIRCUIT_BREAKER", "MOMENTUM_RUN", "OUT_OF_RANGE"})
TYPE_SEVERITY = {"CIRCUIT_BREAKER": "CRITICAL", "PRICE_SPIKE": "HIGH", "PRICE_DROP": "HIGH",
                 "VOLUME_SPIKE": "MEDIUM", "PRICE_ZSCORE": "MEDIUM", "MOMENTUM_RUN": "MEDIUM",
                 "ISOLATION_FOREST": "MEDIUM", "PUMP_AND_DUMP": "CRITICAL", "OUT_OF_RANGE": "HIGH"}


@dataclass(frozen=True)
class DetectorConfig:
    price_window: int = 50
    volume_window: int = 200
    min_history: int = 20
    spike_pct: float = 0.05
    circuit_pct: float = 0.10
    cool_off_s: float = 300.0
    whale_factor: float = 2.8
    zscore_threshold: float = 8.0
    run_length: int = 5
    run_move_pct: float = 0.02
    spike_ticks: float = 6.0
    spike_sigmas: float = 5.0
    run_ticks: float = 2.0
    spike_spreads: float = 3.0      # an ordinary market order on a thin book prints up to ~2 spreads past the mid
    range_widths: float = 1.0       # OUT_OF_RANGE: band widths beyond the band's edge (1: 5.9 σ untrained)


@dataclass
class Detection:
    trade: Trade
    features: TradeFeatures
    types: list[str] = field(default_factory=list)
    score: float = 0.0          # strength: max over fired rules of observed / threshold (>= 1 when flagged)
    details: dict = field(default_factory=dict)
    evidence: dict[str, Evidence] = field(default_factory=dict)   # why each type fired
    event: dict | None = None   # the symbol's pump-and-dump event as of this trade (see pump.Event)
    phase: str | None = None    # the phase that event entered with this trade
    held: set[str] = field(default_factory=set)    # flags that raise no alert: told by their price move's
                                                   # first alert (RuleDetector._tell), a whale small for its day,
                                                   # a print reported again (RuleDetector._once)

    @property
    def quiet(self) -> bool:
        """Inside an open pump-and-dump event only its own phase alerts go out."""
        return self.event is not None

    @property
    def is_anomaly(self) -> bool:
        return bool(self.types)

    @property
    def severity(self) -> str | None:
        if not self.types:
            return None
        return max((self.severity_of(t) for t in self.types), key=SEVERITY_RANK.__getitem__)

    def severity_of(self, kind: str) -> str:
        return PHASE_SEVERITY[self.phase] if kind == "PUMP_AND_DUMP" and self.phase else TYPE_SEVERITY[kind]

    def flag(self, kind: str, strength: float, evidence: Evidence, **details: object) -> None:
        if kind not in self.types:
            self.types.append(kind)
        self.score = max(self.score, strength)
        self.evidence[kind] = evidence
        self.details.update(details)


@dataclass
class BreakerTransition:
    symbol: str
    state: str
    timestamp_ms: int


class CircuitBreaker:
    def __init__(self, symbol: str, cool_off_s: float, state: str = "CLOSED", since_ms: int = 0):
        self.symbol, self.cool_off_ms = symbol, int(cool_off_s * 1000)
        self.state, self.since_ms = state, since_ms

    def observe(self, ts: int, big_move: bool, normal: bool) -> BreakerTransition | None:
        if self.state == "OPEN" and ts - self.since_ms >= self.cool_off_ms:
            self._go("HALF_OPEN", ts)
        if big_move and self.state != "OPEN":
            return self._go("OPEN", ts)
        if self.state == "HALF_OPEN" and normal:
            return self._go("CLOSED", ts)
        return None

    def _go(self, state: str, ts: int) -> BreakerTransition:
        self.state, self.since_ms = state, ts
        return BreakerTransition(self.symbol, state, ts)


class RuleDetector:
    """Feeds trades one by one (per symbol in event order) and returns a Detection for each.
    `forecaster` makes OUT_OF_RANGE's band (the aggregator's for 1-minute windows); a trade with a
    sale condition in `excluded` is not judged by it (it sets no price in a candle); one in `auctions`
    (an opening or closing auction print) is a whale only against the symbol's earlier auction prints."""

    def __init__(self, config: DetectorConfig = DetectorConfig(), forecaster: Live = UNTRAINED,
                 excluded: frozenset[str] = frozenset(), auctions: frozenset[str] = frozenset()):
        self.config = config
        self.forecaster, self.excluded, self.auctions = forecaster, excluded, auctions
        self.symbols: dict[str, SymbolState] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self.transitions: list[BreakerTransition] = []

    def state_for(self, symbol: str) -> SymbolState:
        state = self.symbols.get(symbol)
        if state is None:
            state = self.symbols[symbol] = SymbolState(self.config.price_window, self.config.volume_window)
        return state

    def breaker_for(self, symbol: str) -> CircuitBreaker:
        breaker = self.breakers.get(symbol)
        if breaker is None:
            breaker = self.breakers[symbol] = CircuitBreaker(symbol, self.config.cool_off_s)
        return breaker

    def forget(self, symbols: set[str]) -> None:
        """Drop the rolling state and breakers of `symbols` (their partition went elsewhere)."""
        for symbol in symbols:
            self.symbols.pop(symbol, None)
            self.breakers.pop(symbol, None)

    def export(self, symbols: set[str]) -> dict[str, dict]:
        """The rolling state and breaker of `symbols`, to store beside the detector's position."""
        exported = {}
        for s in sorted(symbols):
            if s in self.symbols:
                exported[s] = self.symbols[s].to_dict()
                if s in self.breakers:
                    exported[s]["breaker"] = [self.breakers[s].state, self.breakers[s].since_ms]
        return exported

    def restore(self, states: dict[str, dict]) -> None:
        for symbol, data in states.items():
            self.symbols[symbol] = SymbolState.from_dict(data, self.config.price_window, self.config.volume_window)
            if "breaker" in data:
                state, since_ms = data["breaker"]
                self.breakers[symbol] = CircuitBreaker(symbol, self.config.cool_off_s, state, since_ms)

    def process(self, trade: Trade) -> Detection:
        """Detect on one trade and fold it into its symbol's state."""
        c = self.config
        state = self.state_for(trade.symbol)
        f = state.features(trade)
        d = Detection(trade, f)
        warm = f.history >= c.min_history
        priced = trade.condition not in self.excluded
        auction = trade.condition in self.auctions
        band = state.band.outside(trade.symbol, trade.timestamp_ms, trade.price if warm and priced else None,
                                  self.forecaster, c.range_widths)
        move = abs(f.deviation)
        tick = state.tick_share()
        mean = state.prices.mean
        spike = max(c.spike_pct, c.spike_ticks * tick, c.spike_sigmas * state.prices.std / mean if mean else 0.0)
        if warm and move > spike:           # the spread and the quiet time can only raise the line: looked up
            spike = max(spike, c.spike_spreads * state.spread() / mean,     # when it matters
                        c.spike_sigmas * state.walk_at(trade.timestamp_ms).sigma / mean)
        circuit = max(c.circuit_pct, 2 * spike)
        if warm:
            if move > circuit:
                d.flag("CIRCUIT_BREAKER", move / circuit,
                       self._move_evidence("CIRCUIT_BREAKER", trade, state, f, circuit, spike),
                       move_pct=round(f.deviation * 100, 3))
            if move > spike:
                kind = "PRICE_SPIKE" if f.deviation > 0 else "PRICE_DROP"
                d.flag(kind, move / spike, self._move_evidence(kind, trade, state, f, spike, spike),
                       move_pct=round(f.deviation * 100, 3))
            if auction:
                self._judge_auction(d, state)
            elif f.whale_ratio > c.whale_factor:
                day_ratio = state.whale_day_ratio(trade)
                day_bar = c.whale_factor * state.day_largest.understatement(trade.timestamp_ms)
                d.flag("VOLUME_SPIKE", f.whale_ratio / c.whale_factor,
                       self._whale_evidence(trade, state, f, day_ratio, day_bar),
                       times_recent_max=round(f.whale_ratio, 2), times_day_max=round(day_ratio, 2),
                       volume_ratio=round(f.volume_ratio, 2))
                if day_ratio <= day_bar:
                    d.held.add("VOLUME_SPIKE")      # not a whale for its day: the flag stays, no alert
            if abs(f.price_z) > c.zscore_threshold and abs(z := self._zscore(trade, state)) > c.zscore_threshold:
                d.flag("PRICE_ZSCORE", abs(z) / c.zscore_threshold, self._zscore_evidence(trade, state, z),
                       price_z=round(z, 2))
            run_needed = max(c.run_move_pct, c.run_ticks * f.run_length * tick)
            if f.run_length >= c.run_length and abs(f.run_move) > run_needed:
                run_needed = max(run_needed, c.spike_spreads * state.spread() / mean)
                if abs(f.run_move) > run_needed:
                    d.flag("MOMENTUM_RUN", abs(f.run_move) / run_needed,
                           self._run_evidence(trade, state, f, run_needed),
                           run_length=f.run_length, run_move_pct=round(f.run_move * 100, 3))
            if band is not None:
                self._judge_band(d, state, band)
            transition = self.breaker_for(trade.symbol).observe(trade.timestamp_ms, move > circuit, move <= spike)
            if transition:
                self.transitions.append(transition)
        phase, event = state.pump.observe(trade.symbol, trade.timestamp_ms, trade.price, trade.quantity, trade.side,
                                          state.tick, state.spread)
        if event is not None:
            d.event, d.phase = {**event.to_dict(), "gain_pct": round(event.gain_pct, 3)}, phase
            if phase:
                d.flag("PUMP_AND_DUMP", max(event.burst_trades / burst_bar(event.busiest_day), 1.0),
                       state.pump.evidence(phase, event, trade.trade_id, trade.timestamp_ms, trade.price, state.tick,
                                           state.spread()),
                       phase=phase, event_id=event.event_id, gain_pct=round(event.gain_pct, 2),
                       volume_multiple=event.volume_multiple)
        price_normal = not warm or move <= spike
        self._tell(d, state, f.deviation, spike, price_normal)
        self._once(d, state, f.deviation)
        volume_normal = "VOLUME_SPIKE" not in d.types
        state.learn(trade)
        state.update(trade, f, price_normal, volume_normal, auction)
        state.band.fold(trade.timestamp_ms, trade.price if price_normal and priced else None, trade.quantity)
        return d

    @staticmethod
    def _tell(d: Detection, state: SymbolState, deviation: float, spike: float, price_normal: bool) -> None:
        """One story per price move: a move's first alerts go out; while the price stays away (past
        the line, or on its far half on the same side) the later trades' price flags are held back
        unless they are more severe than what was told (a drop deepening into the breaker). Over
        when the price is back on the near half, moves the other way, or is accepted as the new
        level (SymbolState.update)."""
        side = (deviation > 0) - (deviation < 0)
        if state.episode_side and (side != state.episode_side or (price_normal and abs(deviation) <= spike / 2)):
            state.episode_side, state.episode_told = 0, None
        moves = [k for k in d.types if k in MOVE_TYPES]
        if not moves or not side:
            return
        told = state.episode_told if state.episode_side == side else None
        if told:
            d.held |= {k for k in moves if SEVERITY_RANK[d.severity_of(k)] <= SEVERITY_RANK[told]}
        top = max((d.severity_of(k) for k in moves), key=SEVERITY_RANK.__getitem__)
        state.episode_side = side
        state.episode_told = max(told or top, top, key=SEVERITY_RANK.__getitem__)

    @staticmethod
    def _once(d: Detection, state: SymbolState, deviation: float) -> None:
        """One story per print: a trade at the price of a print whose move the same way was told in
        the past day, or at its price and size when that print was a whale told, is that print
        reported again (an average-price print, a late report, a correction: the recorded SPY day
        printed a block at 168.90 at 17:07, then four times after hours, 1 % above the market, each
        a new OUT_OF_RANGE once the price between them had been back). Its flags stay on the trade,
        no alert; the evidence names the print told."""
        if d.quiet:
            return
        side = (deviation > 0) - (deviation < 0)
        moves = [k for k in d.types if k in MOVE_TYPES and k not in d.held] if side else []
        whale = "VOLUME_SPIKE" in d.types and "VOLUME_SPIKE" not in d.held
        if not moves and not whale:
            return
        t, told = d.trade, state.told_prints
        while told and t.timestamp_ms - told[0][0] > WHALE_DAY_MS:
            told.popleft()
        for ms, trade_id, price, quantity, told_side, told_whale in reversed(told):
            if not math.isclose(t.price, price, rel_tol=1e-9):
                continue
            same_size = whale and told_whale and math.isclose(t.quantity, quantity, rel_tol=1e-9)
            again = (moves if told_side == side else []) + (["VOLUME_SPIKE"] if same_size else [])
            what = "price and size" if same_size else "price"
            for kind in again:
                evidence = d.evidence[kind]
                d.evidence[kind] = replace(evidence, sentence=(
                    f"{evidence.sentence}; the same {what} as trade {trade_id}, told "
                    f"{duration(max(t.timestamp_ms - ms, 0))} before: that print reported again, recorded on the "
                    f"trade, no alert"), extra={**evidence.extra, "reported_again": trade_id})
            d.held.update(again)
            moves = [k for k in moves if k not in again]
            whale = whale and not same_size
        if moves or whale:
            told.append((t.timestamp_ms, t.trade_id, t.price, t.quantity, side if moves else 0, whale))

    def _judge_auction(self, d: Detection, state: SymbolState) -> None:
        """A whale among auction prints: an opening or closing auction gathers a session's orders
        into one print (the recorded SPY day's close, 3,166,418 shares, was 46× the largest of the
        1,000 trades before it, and is every day), so it is judged against the symbol's earlier
        auction prints of its sale condition: beyond `whale_factor` × the largest of them (the last
        AUCTION_PRINTS, a month of days). The first of its kind has none to be judged against."""
        c, trade = self.config, d.trade
        earlier = state.auctions.get(trade.condition)
        if not earlier:
            return
        biggest, biggest_id, _ = max(earlier)
        ratio = trade.quantity / biggest
        if ratio <= c.whale_factor:
            return
        what = f"auction prints of sale condition {trade.condition}"
        sentence = (f"an auction print (sale condition {trade.condition}): quantity {num(trade.quantity)} is "
                    f"{ratio:.2f}× the largest of the symbol's previous {len(earlier)} {what}, {num(biggest)} "
                    f"(trade {biggest_id}); threshold {c.whale_factor:g}×")
        d.flag("VOLUME_SPIKE", ratio / c.whale_factor,
               Evidence("VOLUME_SPIKE", {"whale_factor": c.whale_factor, "auction_prints": AUCTION_PRINTS},
                        "quantity", trade.quantity, biggest, f"the largest quantity of the previous {len(earlier)} "
                        f"{what}", ratio, c.whale_factor, f"{c.whale_factor:g} × that largest quantity", "x", sentence,
                        trades_named(trade.trade_id, [biggest_id], earlier[0][2], earlier[-1][2], len(earlier)),
                        level=c.whale_factor * biggest, extra={"auction": trade.condition}),
               times_recent_max=round(ratio, 2))

    def _judge_band(self, d: Detection, state: SymbolState, band: Band) -> None:
        """OUT_OF_RANGE: beyond the band's line (BandWatch.outside), and beyond the instrument's floor
        from the band's centre: `spike_ticks` ticks and twice `spike_spreads` spreads. The price
        rules measure from the rolling mean, an estimate of the mid; the centre here is a print (the
        last close), and the close and the trade may each lie up to `spike_spreads` spreads from the
        mid (a sweep before the close, one the other way now)."""
        c, price = self.config, d.trade.price
        move = math.log(price) - math.log(band.close)
        line = band.ratio * band.unit * (1 + 2 * c.range_widths)
        floor = max(c.spike_ticks * (state.tick or 0.0), 2 * c.spike_spreads * state.spread())
        if abs(price - band.close) <= floor:
            return                                  # (as the price rules measure ticks and spreads: in price)
        floor = math.log1p(floor / band.close)
        state.band.fired(band.start_ms)
        unit = band.unit
        d.flag("OUT_OF_RANGE", abs(move) / max(line, floor),
               self._band_evidence(d.trade, state, band, move / unit, max(line, floor) / unit, floor > line),
               band_sigmas=round(move / unit, 2))

    # The evidence of each rule: built only for a trade that fired, from the state it was judged on.

    def _window(self, trade: Trade, state: SymbolState) -> dict:
        """The trades of the rolling price window (the baseline of the price rules)."""
        window = [(t, ms) for t, ms in state.price_trades if t]     # none unknown (state from before ids were kept)
        return trades_named(trade.trade_id, [t for t, _ in window], window[0][1] if window else None,
                            window[-1][1] if window else trade.timestamp_ms)

    def _spreads_how(self, state: SymbolState) -> str:
        spread, mean = state.spread(), state.prices.mean
        return (f"{self.config.spike_spreads:g} spreads of {num(spread)} = "
                f"{percent(self.config.spike_spreads * spread / mean if mean else 0.0)}")

    def _spike_how(self, state: SymbolState, ts_ms: int) -> str:
        c, mean, tick = self.config, state.prices.mean, state.tick or 0.0
        sigma = state.walk_at(ts_ms).sigma
        return (f"the largest of {percent(c.spike_pct)}, {c.spike_ticks:g} ticks of {num(tick)} = "
                f"{percent(c.spike_ticks * state.tick_share())}, {c.spike_sigmas:g} σ of {num(state.prices.std)}"
                f"{self._walk_how(state, ts_ms)} = {percent(c.spike_sigmas * sigma / mean if mean else 0.0)} and "
                f"{self._spreads_how(state)}")

    @staticmethod
    def _walk_how(state: SymbolState, ts_ms: int) -> str:
        """How the window's σ grew with the time since its trades (SymbolState.walk_at), if it did."""
        w = state.walk_at(ts_ms)
        if w.sigma <= state.prices.std * 1.001:
            return ""
        age, fresh = duration(round(w.age_ms)), duration(round(w.fresh_ms))
        return (f" grown to {num(w.sigma)} by the pair's walk since the window's trades ({duration(w.quiet_ms)} "
                f"since its last; σ² = std² + walk²·(age / fresh − 1), the window's mean {age} old as a random "
                f"walk weighs its trades, {fresh} right after a window traded as this one; walk² its variance "
                f"beyond the bid-ask bounce)")

    def _move_evidence(self, kind: str, trade: Trade, state: SymbolState, f: TradeFeatures, line: float,
                       spike: float) -> Evidence:
        c, mean, n = self.config, state.prices.mean, len(state.prices.values)
        how = self._spike_how(state, trade.timestamp_ms)
        params = {"spike_pct": c.spike_pct, "spike_ticks": c.spike_ticks, "spike_sigmas": c.spike_sigmas,
                  "spike_spreads": c.spike_spreads, "price_window": c.price_window, "min_history": c.min_history}
        if kind == "CIRCUIT_BREAKER":
            how = f"the larger of {percent(c.circuit_pct)} and twice the spike threshold {percent(spike)}"
            params["circuit_pct"] = c.circuit_pct
        up = f.deviation > 0
        baseline_how = f"the mean of the previous {n} normal trades (anomalous prices left out)"
        sentence = (f"price {num(trade.price)} is {f.deviation * 100:+.2f} % {'over' if up else 'under'} the mean of "
                    f"the previous {n} normal trades, {num(mean)}; threshold {percent(line)} ({how})")
        return Evidence(kind, params, "price", trade.price, mean, baseline_how, f.deviation * 100, line * 100, how,
                        "%", sentence, self._window(trade, state), level=mean * (1 + line if up else 1 - line),
                        tick=state.tick, extra=self._sigma_extra(state, trade.timestamp_ms))

    @staticmethod
    def _sigma_extra(state: SymbolState, ts_ms: int) -> dict:
        w = state.walk_at(ts_ms)
        return {"sigma": w.sigma, "window_std": state.prices.std, "quiet_ms": w.quiet_ms, "age_ms": w.age_ms,
                "fresh_ms": w.fresh_ms, "spread": state.spread()}

    def _sigma(self, state: SymbolState, ts_ms: int) -> tuple[float, str]:
        """The z-score's σ: the window's, grown with the time since its trades (SymbolState.walk_at),
        never below 0.2 % of the mean, one tick, or half the spread (the σ of prices that only bounce
        between bid and ask)."""
        mean, spread, std = state.prices.mean, state.spread(), state.walk_at(ts_ms).sigma
        sigma = max(std, PRICE_Z_MIN_STD * mean, state.tick or 0.0, spread / 2)
        return sigma, (f"σ {num(sigma)}: the largest of the window's standard deviation {num(state.prices.std)}"
                       f"{self._walk_how(state, ts_ms)}, {PRICE_Z_MIN_STD * 100:g} % of the mean, one tick "
                       f"{num(state.tick or 0.0)} and half the spread {num(spread)}")

    def _zscore(self, trade: Trade, state: SymbolState) -> float:
        return (trade.price - state.prices.mean) / self._sigma(state, trade.timestamp_ms)[0]

    def _zscore_evidence(self, trade: Trade, state: SymbolState, z: float) -> Evidence:
        c, mean, n = self.config, state.prices.mean, len(state.prices.values)
        sigma, sigma_how = self._sigma(state, trade.timestamp_ms)
        up = z > 0
        sentence = (f"price {num(trade.price)} is {abs(z):.1f} σ {'above' if up else 'below'} the mean of the "
                    f"previous {n} normal trades, {num(mean)} ({sigma_how}); threshold {c.zscore_threshold:g} σ")
        return Evidence("PRICE_ZSCORE", {"zscore_threshold": c.zscore_threshold, "price_window": c.price_window,
                                         "min_history": c.min_history},
                        "price", trade.price, mean, f"the mean of the previous {n} normal trades", z,
                        c.zscore_threshold, f"{c.zscore_threshold:g} standard deviations ({sigma_how})", "sigma",
                        sentence, self._window(trade, state),
                        level=mean + (1 if up else -1) * c.zscore_threshold * sigma, tick=state.tick,
                        extra={**self._sigma_extra(state, trade.timestamp_ms), "sigma": sigma})

    def _whale_evidence(self, trade: Trade, state: SymbolState, f: TradeFeatures, day_ratio: float,
                        day_bar: float) -> Evidence:
        c, largest, ts = self.config, state.largest, trade.timestamp_ms
        n, biggest = largest.count, largest.max
        named = f" (trade {largest.max_id})" if largest.max_id else ""
        sentence = (f"quantity {num(trade.quantity)} is {f.whale_ratio:.2f}× the largest of the symbol's previous "
                    f"{n:,} trades, {num(biggest)}{named}; threshold {c.whale_factor:g}×")
        if day_ratio < f.whale_ratio:               # the past day traded a larger one (whales left out)
            day_ms, day_biggest, day_id = state.day_largest.first_at(ts)
            sentence += (f"; {day_ratio:.2f}× the largest of its past day but whales, {num(day_biggest)}"
                         f"{f' (trade {day_id})' if day_id else ''} {duration(max(ts - day_ms, 0))} before")
        if day_bar > c.whale_factor:                # the symbol's first day: a whole day's largest is larger
            seen = duration(state.day_largest.seen_ms(ts) or 0)
            sentence += (f"; only {seen} of its day seen so far: a whole day's largest would be about "
                         f"{day_bar / c.whale_factor:.2f}× that (√(24 h / {seen}), sizes' tail x^-{TAIL_EXPONENT:g}),"
                         f" so a whale for its day is {day_bar:.2f}× the largest so far")
        if day_ratio <= day_bar:
            sentence += ": recorded on the trade, no alert (not a whale for its day)"
        return Evidence("VOLUME_SPIKE", {"whale_factor": c.whale_factor, "whale_window": WHALE_WINDOW,
                                         "whale_day_ms": WHALE_DAY_MS, "tail_exponent": TAIL_EXPONENT},
                        "quantity", trade.quantity, biggest,
                        f"the largest quantity of the previous {n:,} trades (whales included)", f.whale_ratio,
                        c.whale_factor, f"{c.whale_factor:g} × that largest quantity", "x", sentence,
                        trades_named(trade.trade_id, [largest.max_id] if largest.max_id else [], None,
                                     state.last_ts or trade.timestamp_ms, n),
                        level=c.whale_factor * biggest)

    def _run_evidence(self, trade: Trade, state: SymbolState, f: TradeFeatures, needed: float) -> Evidence:
        c, start, start_price = self.config, state.run_start_trade, state.run_start_price
        up = f.run_move > 0
        how = (f"the largest of {percent(c.run_move_pct)}, {c.run_ticks:g} ticks of {num(state.tick or 0.0)} "
               f"per move × {f.run_length} moves = {percent(c.run_ticks * f.run_length * state.tick_share())} and "
               f"{self._spreads_how(state)}")
        sentence = (f"{f.run_length} {'rises' if up else 'falls'} in a row moved the price {f.run_move * 100:+.2f} % "
                    f"from {num(start_price)}{f' (trade {start[0]})' if start and start[0] else ''} to "
                    f"{num(trade.price)}; threshold {percent(needed)} ({how})")
        return Evidence("MOMENTUM_RUN", {"run_length": c.run_length, "run_move_pct": c.run_move_pct,
                                         "run_ticks": c.run_ticks, "spike_spreads": c.spike_spreads},
                        "run", trade.price, start_price,
                        f"the last normal price before the run of {f.run_length} same-direction moves",
                        f.run_move * 100, needed * 100, how, "%", sentence,
                        trades_named(trade.trade_id, [start[0]] if start and start[0] else [],
                                     start[1] if start else None, state.last_ts or trade.timestamp_ms),
                        level=start_price * (1 + needed if up else 1 - needed), tick=state.tick,
                        extra={"moves": f.run_length, "spread": state.spread()})

    def _band_evidence(self, trade: Trade, state: SymbolState, band: Band, sigmas: float, line: float,
                       by_floor: bool) -> Evidence:
        c, up = self.config, sigmas > 0
        minute = _hhmm(band.close_ms)
        widths = f"{c.range_widths:g} band width{'s' if c.range_widths != 1 else ''}"
        edge = f"the band's edge ±{band.ratio:g} σ plus {widths}"
        how = (f"{c.spike_ticks:g} ticks of {num(state.tick or 0.0)} and twice {c.spike_spreads:g} spreads of "
               f"{num(state.spread())}, whichever is larger: {percent(math.expm1(line * band.unit))}, more than {edge}"
               if by_floor else f"{edge} of {2 * band.ratio:g} σ")
        since = "" if band.horizon == 1 else f", per minute, × √{band.horizon} for the minutes since that close"
        sigma = (f"σ {percent(band.unit)}: the larger of the band's {percent(band.sigma)} and the step between "
                 f"minutes' closes, {percent(band.step_sigma)}{since}")
        sentence = (f"price {num(trade.price)} is {abs(sigmas):.1f} σ {'above' if up else 'below'} the {minute} UTC "
                    f"close {num(band.close)}; the band forecast for this minute by {band.forecaster} was "
                    f"{num(band.low)}–{num(band.high)} ({sigma}); threshold {line:.1f} σ ({how})")
        return Evidence("OUT_OF_RANGE", {"range_widths": c.range_widths, "spike_spreads": c.spike_spreads,
                                         "spike_ticks": c.spike_ticks, "window_s": band.size_ms // 1000,
                                         "band_ratio": band.ratio},
                        "price", trade.price, band.close,
                        f"the close of the {minute} UTC window, the centre of the band forecast at that close",
                        sigmas, line, how, "sigma", sentence,
                        trades_named(trade.trade_id, [], band.close_ms, band.close_ms + band.size_ms - 1,
                                     band.trades),
                        level=scaled(band.close, (1 if up else -1) * line * band.unit), tick=state.tick,
                        extra={"sigma": band.unit, "band_sigma": band.sigma, "step_sigma": band.step_sigma,
                               "forecaster": band.forecaster, "band_low": band.low, "band_high": band.high,
                               "horizon_windows": band.horizon, "window_start_ms": band.start_ms,
                               "spread": state.spread()})

    def take_transitions(self) -> list[BreakerTransition]:
        done, self.transitions = self.transitions, []
        return done


def _hhmm(ms: int) -> str:
    return f"{ms // 3_600_000 % 24:02d}:{ms // 60_000 % 60:02d}"
