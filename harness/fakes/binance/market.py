"""The market model of the fake exchange: stream names, symbol specs and the deterministic per-symbol walks.

Nothing here knows about sockets or clocks: a `SymbolMarket` hands out the next book, trade or mark values, and the
connection turns them into frames with event times.
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "AGG_TRADE",
    "BOOK_TICKER",
    "MARK_PERIOD_MS",
    "MARK_PRICE",
    "MARK_PRICE_1S",
    "REALTIME_WEIGHTS",
    "Stream",
    "SymbolMarket",
    "parse_stream_name",
    "streams_for",
]

BOOK_TICKER = "bookTicker"
AGG_TRADE = "aggTrade"
MARK_PRICE = "markPrice"
MARK_PRICE_1S = "markPrice@1s"

MARK_PERIOD_MS = {MARK_PRICE: 3000, MARK_PRICE_1S: 1000}
# bookTicker updates far outnumber aggregated trades on a real book; the cycle keeps that mix.
REALTIME_WEIGHTS = {BOOK_TICKER: 3, AGG_TRADE: 1}
_MARK_DECIMALS = 8
_STREAM_RE = re.compile(r"^([a-z0-9_]+)@([A-Za-z0-9_@]+)$")


@dataclass(frozen=True)
class _SymbolSpec:
    price_decimals: int
    tick: int  # in units of 10**-price_decimals
    qty_decimals: int
    start_price: float
    max_qty: int  # in units of 10**-qty_decimals


_KNOWN_SYMBOLS = {
    "BTCUSDT": _SymbolSpec(2, 10, 3, 65000.0, 5_000),
    "ETHUSDT": _SymbolSpec(2, 1, 3, 3200.0, 50_000),
    "BNBUSDT": _SymbolSpec(2, 1, 2, 600.0, 10_000),
    "SOLUSDT": _SymbolSpec(3, 10, 0, 150.0, 500),
    "XRPUSDT": _SymbolSpec(4, 1, 1, 2.2, 200_000),
}


def _fixed(units: int, decimals: int) -> str:
    """`units` * 10**-decimals with exactly `decimals` digits, the way Binance prints prices and quantities."""
    if not decimals:
        return str(units)
    sign = "-" if units < 0 else ""
    whole, frac = divmod(-units if units < 0 else units, 10**decimals)
    return f"{sign}{whole}.{frac:0{decimals}d}"


class SymbolMarket:
    """Top of book, trades and mark price of one symbol, walked by `random.Random(f"{seed}{symbol}")`."""

    def __init__(self, symbol: str, seed: int | str) -> None:
        self.symbol = symbol
        rng = random.Random(f"{seed}{symbol}")
        self._rng = rng
        # Mark-price draws come from their own generator: markPrice frames are timed by the wall clock, and must
        # not shift the walk that the rate-driven bookTicker/aggTrade frames see.
        self._mark_rng = random.Random(f"{seed}{symbol}@markPrice")
        spec = _KNOWN_SYMBOLS.get(symbol) or _SymbolSpec(4, 1, 1, rng.uniform(1.0, 100.0), 100_000)
        self._pd, self._tick, self._qd, self._max_qty = spec.price_decimals, spec.tick, spec.qty_decimals, spec.max_qty
        start = spec.start_price * (1 + rng.uniform(-0.01, 0.01)) * 10**self._pd
        self._bid = max(self._tick, int(start) // self._tick * self._tick)
        self._ask = self._bid + self._tick
        self._bid_qty = rng.randint(1, self._max_qty)
        self._ask_qty = rng.randint(1, self._max_qty)
        self._update_id = rng.randrange(10**12, 9 * 10**12)
        self._agg_id = rng.randrange(10**9, 5 * 10**9)
        self._trade_id = rng.randrange(5 * 10**9, 9 * 10**9)
        self._funding = rng.randrange(-2_000, 12_000)  # in 1e-8: 0.00010000 is 10_000
        self._to_mark = 10 ** (_MARK_DECIMALS - self._pd)

    def book(self) -> tuple[int, str, str, str, str]:
        """The next bookTicker update: (u, b, B, a, A)."""
        rng, tick = self._rng, self._tick
        r = rng.random()
        if r < 0.15 and self._bid > tick:
            self._bid -= tick
        elif r < 0.30:
            self._bid += tick
        self._ask = self._bid + (tick if rng.random() < 0.8 else 2 * tick)
        self._bid_qty = rng.randint(1, self._max_qty)
        self._ask_qty = rng.randint(1, self._max_qty)
        self._update_id += rng.randint(1, 40)
        pd, qd = self._pd, self._qd
        return (
            self._update_id,
            _fixed(self._bid, pd),
            _fixed(self._bid_qty, qd),
            _fixed(self._ask, pd),
            _fixed(self._ask_qty, qd),
        )

    def trade(self) -> tuple[int, str, str, int, int, bool]:
        """The next aggregated trade: (a, p, q, f, l, m). A seller-initiated trade (m true) hits the bid."""
        rng = self._rng
        maker_is_buyer = rng.random() < 0.5
        price = self._bid if maker_is_buyer else self._ask
        qty = rng.randint(1, max(1, self._max_qty // 4))
        self._agg_id += 1
        first = self._trade_id + 1
        last = first + (rng.randint(1, 4) if rng.random() < 0.3 else 0)
        self._trade_id = last
        return self._agg_id, _fixed(price, self._pd), _fixed(qty, self._qd), first, last, maker_is_buyer

    def mark(self) -> tuple[str, str, str, str]:
        """The next mark price update: (p mark, i index, P estimated settle, r funding rate), 8 decimals each."""
        rng = self._mark_rng
        mid = (self._bid + self._ask) * self._to_mark // 2
        spread = max(1, mid // 50_000)
        mark = mid + rng.randint(-spread, spread)
        index = mark - rng.randint(0, spread)
        settle = index + rng.randint(-spread, spread)
        self._funding = max(-75_000, min(75_000, self._funding + rng.randint(-40, 40)))
        d = _MARK_DECIMALS
        return _fixed(mark, d), _fixed(index, d), _fixed(settle, d), _fixed(self._funding, d)


def parse_stream_name(name: str) -> tuple[str, str] | None:
    """(SYMBOL, kind) for a well-formed stream name like `btcusdt@markPrice@1s`; None when malformed."""
    match = _STREAM_RE.match(name)
    if not match:
        return None
    return match.group(1).upper(), match.group(2)


def streams_for(symbols: Iterable[str], kinds: Sequence[str] = (BOOK_TICKER, AGG_TRADE, MARK_PRICE_1S)) -> list[str]:
    """Stream names per symbol, lower-cased, in QuantLab's order by default (bookTicker, aggTrade, markPrice@1s)."""
    return [f"{symbol.lower()}@{kind}" for symbol in symbols for kind in kinds]


@dataclass(eq=False)
class Stream:
    name: str
    kind: str
    market: SymbolMarket
    prefix: str  # the combined-stream envelope up to the payload

