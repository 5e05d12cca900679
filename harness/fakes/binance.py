"""Fake Binance USDⓈ-M futures market streams: a real websockets server with fault controls.

    with FakeBinance(rate=200, seed=7) as fb:
        url = fb.combined_url(["btcusdt@bookTicker", "btcusdt@aggTrade", "btcusdt@markPrice@1s"])
        ...                      # connect QuantLab (or any client) to `url`
        fb.drop_connections()    # abrupt TCP close, no close frame
        fb.wait_for(lambda r: len(r.open_connections) == 1, timeout=10)

What it serves, as Binance documents it:
- combined streams at `/stream?streams=a/b/c` (frames `{"stream":NAME,"data":PAYLOAD}`) and raw streams at
  `/ws/<name>` or `/ws/<a>/<b>` (frames are the bare payload); any other path gets HTTP 404;
- `SUBSCRIBE`, `UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`, `SET_PROPERTY` / `GET_PROPERTY` (`combined`) with Binance's
  reply and error shapes (codes 0 unknown property, 1 invalid value type, 2 invalid request, 3 invalid JSON);
- payloads for `<symbol>@bookTicker`, `@aggTrade`, `@markPrice` (every 3 s) and `@markPrice@1s`, from a
  deterministic per-symbol price walk; other well-formed stream names are accepted and stay silent, as on Binance.

Event times are realistic by default: non-decreasing within a stream, but several frames share a millisecond and
frames of different streams arrive out of event-time order. `ideal=True` stamps strictly increasing times across
every frame of the server instead (for debugging a consumer's ordering logic).

Hostile faults beyond outages: `send_malformed` (cut JSON, no envelope, wrong types, multi-megabyte frames),
`duplicate_next` (each frame sent twice in a row), `resend_recent` (frames already sent, sent again later) and
`send_out_of_order` (a new event older than the last of its stream). The record counts what a consumer should
count: distinct valid events are `frames_by_stream` minus `duplicates_by_stream`; malformed frames are in neither.

The server runs its own asyncio loop in a background thread. All state lives on that loop; the public methods
marshal onto it, so they are safe to call from any other thread (not from the loop's own thread).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import http
import json
import logging
import math
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from quantlab_chaos.errors import ConfigError, UnreachableError

__all__ = [
    "AGG_TRADE",
    "BOOK_TICKER",
    "MALFORMED_KINDS",
    "MARK_PRICE",
    "MARK_PRICE_1S",
    "ConnectionRecord",
    "DelayStats",
    "FakeBinance",
    "FaultEvent",
    "HUGE_FRAME_BYTES",
    "Record",
    "RequestLog",
    "SentFrame",
    "main",
    "parse_stream_name",
    "streams_for",
]

T = TypeVar("T")
_log = logging.getLogger(__name__)

BOOK_TICKER = "bookTicker"
AGG_TRADE = "aggTrade"
MARK_PRICE = "markPrice"
MARK_PRICE_1S = "markPrice@1s"
#: What `send_malformed` can send: text that is not JSON, JSON without stream/data, a payload with wrong types,
#: and a frame of HUGE_FRAME_BYTES (an envelope whose payload is padding, no usable event).
MALFORMED_KINDS = ("non_json", "no_envelope", "wrong_types", "huge")
#: Size of a `huge` malformed frame: thousands of times a real one, under common client limits (ws: 100 MiB).
HUGE_FRAME_BYTES = 4 * 2**20

DEFAULT_RATE = 20.0
# Binance futures: a ping frame every 3 minutes, disconnect after 10 minutes without a pong.
DEFAULT_PING_INTERVAL = 180.0
DEFAULT_PING_TIMEOUT = 600.0

_MARK_PERIOD_MS = {MARK_PRICE: 3000, MARK_PRICE_1S: 1000}
# bookTicker updates far outnumber aggregated trades on a real book; the cycle keeps that mix.
_REALTIME_WEIGHTS = {BOOK_TICKER: 3, AGG_TRADE: 1}
_FUNDING_INTERVAL_MS = 8 * 3600 * 1000
_MARK_DECIMALS = 8
_METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
_MAX_U64 = 2**64 - 1
_STREAM_RE = re.compile(r"^([a-z0-9_]+)@([A-Za-z0-9_@]+)$")
_METHOD_VALUE_RE = re.compile(r'"method"\s*:\s*("(?:[^"\\]|\\.)*"|[^,}\s]+)')
# A batch is capped so one connection far behind cannot hold the loop for long.
_MAX_BATCH = 2000
_DELAY_SAMPLES = 10_000
_CLOSED_KEPT = 1000
_REQUESTS_KEPT = 200
_FAULTS_KEPT = 1000
_RECENT_KEPT = 1000  # stream frames per connection that resend_recent can send again
_VALID_CLOSE_CODES = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))


# --------------------------------------------------------------------------------------------- record types


@dataclass(frozen=True)
class DelayStats:
    """Scheduled-to-sent delay of frames (rate, markPrice and burst frames; not duplicates or malformed)."""

    count: int = 0
    mean_ms: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0


@dataclass(frozen=True)
class SentFrame:
    connection_id: int
    stream: str  # "<malformed:KIND>" for injected frames
    text: str
    sent_at: float  # wall clock, seconds


@dataclass(frozen=True)
class RequestLog:
    at: float
    text: str  # the request as received (truncated to 500 characters)
    reply: str | None


@dataclass(frozen=True)
class FaultEvent:
    at: float
    action: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class ConnectionRecord:
    id: int
    path: str
    combined: bool  # the current framing (SET_PROPERTY can change it)
    requested_streams: tuple[str, ...]  # from the URL
    subscriptions: tuple[str, ...]  # current, in subscription order
    opened_at: float
    closed_at: float | None
    close_code: int | None  # as seen by the server; 1006 when the TCP connection ended without a close frame
    close_reason: str | None
    closed_by: str | None  # "client", "server", "drop", "shutdown"
    frames_sent: int
    frames_by_stream: dict[str, int]
    duplicates_sent: int
    malformed_sent: int
    requests: tuple[RequestLog, ...]
    delay: DelayStats
    ping_latency_ms: float  # round trip of the last server ping; 0 until a pong came back
    # Added with the hostile faults (defaults keep older constructions valid):
    duplicates_by_stream: dict[str, int] = field(default_factory=dict)  # frames sent again, in frames_by_stream too
    out_of_order_sent: int = 0  # send_out_of_order frames (valid, distinct events; in frames_by_stream)

    @property
    def is_open(self) -> bool:
        return self.closed_at is None


@dataclass(frozen=True)
class Record:
    """A snapshot of everything the server did, for assertions."""

    connections: tuple[ConnectionRecord, ...]
    refused: int
    frames_sent: int
    frames_by_stream: dict[str, int]
    last_frames: tuple[SentFrame, ...]
    delay: DelayStats
    faults: tuple[FaultEvent, ...]
    duplicates_by_stream: dict[str, int] = field(default_factory=dict)
    malformed_sent: int = 0
    out_of_order_sent: int = 0

    @property
    def distinct_frames_by_stream(self) -> dict[str, int]:
        """Frames per stream that a consumer should count once: every valid frame sent, less the repeats."""
        return {name: count - self.duplicates_by_stream.get(name, 0) for name, count in self.frames_by_stream.items()}

    @property
    def open_connections(self) -> tuple[ConnectionRecord, ...]:
        return tuple(c for c in self.connections if c.is_open)

    def connection(self, connection_id: int) -> ConnectionRecord:
        for conn in self.connections:
            if conn.id == connection_id:
                return conn
        raise KeyError(f"no connection {connection_id} in the record")


class _Delays:
    """Running delay statistics with a bounded window of samples, so memory stays flat at any rate."""

    __slots__ = ("count", "total", "max", "samples")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.samples: collections.deque[float] = collections.deque(maxlen=_DELAY_SAMPLES)

    def add(self, delay: float) -> None:
        self.count += 1
        self.total += delay
        if delay > self.max:
            self.max = delay
        self.samples.append(delay)

    def stats(self) -> DelayStats:
        if not self.count:
            return DelayStats()
        ordered = sorted(self.samples)
        last = len(ordered) - 1
        return DelayStats(
            count=self.count,
            mean_ms=self.total / self.count * 1000,
            p50_ms=ordered[last // 2] * 1000,
            p99_ms=ordered[min(last, math.ceil(0.99 * last))] * 1000,
            max_ms=self.max * 1000,
        )


# ------------------------------------------------------------------------------------------ market model


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


class _SymbolMarket:
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
class _Stream:
    name: str
    kind: str
    market: _SymbolMarket
    prefix: str  # the combined-stream envelope up to the payload


# ----------------------------------------------------------------------------------------------- requests


_NO_ID = object()


def _reply(result: Any, request_id: Any) -> str:
    return json.dumps({"result": result, "id": request_id}, separators=(",", ":"))


def _error(code: int, msg: str, request_id: Any = _NO_ID) -> str:
    body: dict[str, Any] = {"error": {"code": code, "msg": msg}}
    if request_id is not _NO_ID:
        body["id"] = request_id
    return json.dumps(body, separators=(",", ":"))


def _end_position(text: str) -> tuple[int, int]:
    """Line and column of the last character, the position serde reports for errors found at the end."""
    return text.count("\n") + 1, len(text) - (text.rfind("\n") + 1)


def _json_error_message(exc: json.JSONDecodeError) -> str:
    """Python's JSON error in the words of Binance's parser (serde_json), e.g. `expected value at line 1 column 1`."""
    text = exc.doc
    if exc.msg.startswith("Unterminated string"):
        line, col = _end_position(text)
        return f"EOF while parsing a string at line {line} column {col}"
    if exc.pos >= len(text.rstrip()):
        line, col = _end_position(text)
        return f"EOF while parsing a value at line {line} column {col}"
    words = {
        "Expecting value": "expected value",
        "Expecting property name": "key must be a string",
        "Expecting ',' delimiter": "expected `,` or `}`",
        "Expecting ':' delimiter": "expected `:`",
        "Extra data": "trailing characters",
    }
    what = next((w for prefix, w in words.items() if exc.msg.startswith(prefix)), "expected value")
    return f"{what} at line {exc.lineno} column {exc.colno}"


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean `{json.dumps(value)}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if value is None:
        return "null"
    return {list: "sequence", dict: "map"}.get(type(value), "value")


@dataclass
class _Outcome:
    reply: str | None
    close: bool = False  # Binance futures disconnects after invalid JSON (changelog 2023-06-22)


def _is_request_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_U64


def _validate_request(text: str, obj: Any) -> str | None:
    """The error reply for a request that does not deserialize (these carry `"id":null`), else None."""
    if not isinstance(obj, dict):
        line, col = _end_position(text)
        return _error(2, f"Invalid request: invalid type: {_json_kind(obj)}, expected struct Request "
                         f"at line {line} column {col}", None)
    if "method" not in obj:
        line, col = _end_position(text)
        return _error(2, f"Invalid request: missing field `method` at line {line} column {col}", None)
    method = obj["method"]
    if method not in _METHODS:
        found = _METHOD_VALUE_RE.search(text)
        end = found.end() if found else len(text)
        line, col = text.count("\n", 0, end) + 1, end - (text.rfind("\n", 0, end) + 1)
        expected = ", ".join(f"`{m}`" for m in _METHODS)
        if isinstance(method, str):
            return _error(2, f"Invalid request: unknown variant `{method}`, expected one of {expected} "
                             f"at line {line} column {col}", None)
        return _error(2, f"Invalid request: invalid type: {_json_kind(method)}, expected variant identifier "
                         f"at line {line} column {col}", None)
    if not _is_request_id(obj.get("id")):
        return _error(2, "Invalid request: request ID must be an unsigned integer", None)
    return None


# ------------------------------------------------------------------------------------------- connections


class _Waker:
    """Sleep until a loop-clock deadline, or until woken; cheaper than wait_for on every scheduler tick."""

    __slots__ = ("_loop", "_future")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[None] | None = None

    async def sleep_until(self, when: float) -> None:
        loop = self._loop
        if when <= loop.time():
            await asyncio.sleep(0)
            return
        future = loop.create_future()
        self._future = future
        handle = None if when == math.inf else loop.call_at(when, _resolve, future)
        try:
            await future
        finally:
            if handle is not None:
                handle.cancel()
            self._future = None

    def wake(self) -> None:
        if self._future is not None:
            _resolve(self._future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Mark:
    __slots__ = ("stream", "period_ms", "next_ms")

    def __init__(self, stream: _Stream, now_ms: int) -> None:
        self.stream = stream
        self.period_ms = _MARK_PERIOD_MS[stream.kind]
        self.next_ms = (now_ms // self.period_ms + 1) * self.period_ms


class _Connection:
    """One client connection: its subscriptions, its scheduler, and its part of the record."""

    def __init__(self, server: FakeBinance, ws: ServerConnection, conn_id: int, path: str, combined: bool,
                 streams: list[str]) -> None:
        self.server = server
        self.ws = ws
        self.id = conn_id
        self.path = path
        self.combined = combined
        self.requested = tuple(streams)
        self.subscriptions: list[str] = []
        self.opened_at = time.time()
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed_by: str | None = None
        self.frames_sent = 0
        self.frames_by_stream: dict[str, int] = {}
        self.duplicates_sent = 0
        self.duplicates_by_stream: dict[str, int] = {}
        self.malformed_sent = 0
        self.out_of_order_sent = 0
        self.recent: collections.deque[tuple[str, str]] = collections.deque(maxlen=_RECENT_KEPT)
        self.requests: collections.deque[RequestLog] = collections.deque(maxlen=_REQUESTS_KEPT)
        self.delays = _Delays()
        loop = server._loop_or_fail()
        self.loop = loop
        self.waker = _Waker(loop)
        self.cycle: list[_Stream] = []
        self.cycle_pos = 0
        self.marks: list[_Mark] = []
        self.base = loop.time()
        self.k = 0  # rate events sent since `base`
        self.duplicate_remaining = 0
        self.burst_pending = 0
        self.burst_at = 0.0
        # Per-stream (E, T) of the last frame, so each stream's times never go backwards.
        self.stamps: dict[str, list[int]] = {}
        self.jitter = random.Random(f"{server.seed}:{conn_id}:clock")
        self._subscribe(streams)

    # -- subscriptions

    def _subscribe(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.subscriptions:
                self.subscriptions.append(name)
        self._rebuild()

    def _unsubscribe(self, names: Iterable[str]) -> None:
        gone = set(names)
        self.subscriptions = [n for n in self.subscriptions if n not in gone]
        self._rebuild()

    def _rebuild(self) -> None:
        streams = [s for s in (self.server._stream(n) for n in self.subscriptions) if s is not None]
        realtime = [s for s in streams if s.kind in _REALTIME_WEIGHTS]
        cycle = [s for rnd in range(max(_REALTIME_WEIGHTS.values())) for s in realtime
                 if _REALTIME_WEIGHTS[s.kind] > rnd]
        if cycle and not self.cycle:
            self.rebase(self.loop.time())  # otherwise the time without streams would come out as a flood
        self.cycle = cycle
        self.cycle_pos = 0
        now_ms = self.server._wall_ms(self.loop.time())
        kept = {m.stream.name: m for m in self.marks}
        self.marks = [kept.get(s.name) or _Mark(s, now_ms) for s in streams if s.kind in _MARK_PERIOD_MS]
        self.waker.wake()

    def rebase(self, now: float) -> None:
        self.base = now
        self.k = 0
        now_ms = self.server._wall_ms(now)
        for mark in self.marks:
            mark.next_ms = (now_ms // mark.period_ms + 1) * mark.period_ms

    # -- requests

    def handle_request(self, message: str | bytes) -> _Outcome:
        if isinstance(message, bytes):
            try:
                message = message.decode()
            except UnicodeDecodeError:
                return _Outcome(_error(3, "Invalid JSON: expected value at line 1 column 1"), close=True)
        try:
            obj = json.loads(message)
        except json.JSONDecodeError as exc:
            return _Outcome(_error(3, f"Invalid JSON: {_json_error_message(exc)}"), close=True)
        invalid = _validate_request(message, obj)
        if invalid is not None:
            return _Outcome(invalid)
        method, request_id, params = obj["method"], obj["id"], obj.get("params")
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            return _Outcome(self._change_subscriptions(method, params, request_id))
        if method == "LIST_SUBSCRIPTIONS":
            return _Outcome(_reply(list(self.subscriptions), request_id))
        return _Outcome(self._property(method, params, request_id))

    def _change_subscriptions(self, method: str, params: Any, request_id: int) -> str:
        if not isinstance(params, list) or not all(isinstance(p, str) and parse_stream_name(p) for p in params):
            return _error(2, "Invalid request: invalid stream", request_id)
        if method == "SUBSCRIBE":
            self._subscribe(params)
        else:
            self._unsubscribe(params)
        return _reply(None, request_id)

    def _property(self, method: str, params: Any, request_id: int) -> str:
        params = params if isinstance(params, list) else []
        if len(params) > (2 if method == "SET_PROPERTY" else 1):
            return _error(2, "Invalid request: too many parameters", request_id)
        if not params or not isinstance(params[0], str):
            return _error(2, "Invalid request: property name must be a string", request_id)
        if params[0] != "combined":
            return _error(0, "Unknown property", request_id)
        if method == "GET_PROPERTY":
            return _reply(self.combined, request_id)
        if len(params) < 2 or not isinstance(params[1], bool):
            return _error(1, "Invalid value type: expected Boolean", request_id)
        self.combined = params[1]
        return _reply(None, request_id)

    async def run_reader(self) -> None:
        ws = self.ws
        try:
            async for message in ws:
                outcome = self.handle_request(message)
                text = message if isinstance(message, str) else repr(message)
                self.requests.append(RequestLog(time.time(), text[:500], outcome.reply))
                if outcome.reply is not None:
                    await ws.send(outcome.reply)
                if outcome.close:
                    self.closed_by = "server"
                    await ws.close(1008, "invalid JSON")
                    return
        except ConnectionClosed:
            return

    # -- frames

    def _stamp(self, stream: _Stream, sched_ms: int) -> tuple[int, int]:
        """(E, T) for a bookTicker or aggTrade frame scheduled at `sched_ms`."""
        server = self.server
        if server.ideal:
            event = server._ideal_ms = max(sched_ms, server._ideal_ms + 1)
            return event, event
        jitter = self.jitter
        r1, r2 = jitter.random(), jitter.random()
        if stream.kind == BOOK_TICKER:
            lag = 0 if r1 < 0.7 else (1 if r1 < 0.9 else 2)
            trade_lag = 0 if r2 < 0.6 else 1
        else:
            # aggTrade is published after its 100 ms aggregation window: stamped a few ms (now and then tens of
            # ms) before frames of other streams that leave at the same moment.
            lag = int(r1 * 7) + (10 + int(r2 * 30) if r1 > 0.97 else 0)
            trade_lag = int(r2 * 20)
        last = self.stamps.get(stream.name)
        if last is None:
            last = self.stamps[stream.name] = [0, 0]
        event = max(sched_ms - lag, last[0])
        trade = min(event, max(event - trade_lag, last[1]))
        last[0], last[1] = event, trade
        return event, trade

    def _frame(self, stream: _Stream, sched_ms: int, stamp: tuple[int, int] | None = None) -> str:
        """The next frame of `stream`; `stamp` forces its (E, T) instead of the stream's clock."""
        market = stream.market
        if stream.kind == BOOK_TICKER:
            u, b, bq, a, aq = market.book()
            event, trade = stamp or self._stamp(stream, sched_ms)
            payload = (f'{{"e":"bookTicker","u":{u},"E":{event},"T":{trade},"s":"{market.symbol}",'
                       f'"b":"{b}","B":"{bq}","a":"{a}","A":"{aq}"}}')
        else:
            agg, p, q, first, last, maker = market.trade()
            event, trade = stamp or self._stamp(stream, sched_ms)
            payload = (f'{{"e":"aggTrade","E":{event},"a":{agg},"s":"{market.symbol}","p":"{p}","q":"{q}",'
                       f'"f":{first},"l":{last},"T":{trade},"m":{"true" if maker else "false"}}}')
        return f"{stream.prefix}{payload}}}" if self.combined else payload

    def _mark_frame(self, mark: _Mark) -> str:
        server, stream = self.server, mark.stream
        event = mark.next_ms
        if server.ideal:
            event = server._ideal_ms = max(event, server._ideal_ms + 1)
        p, i, settle, r = stream.market.mark()
        # T of markPriceUpdate is the next funding time, not a transaction time.
        funding = (event // _FUNDING_INTERVAL_MS + 1) * _FUNDING_INTERVAL_MS
        payload = (f'{{"e":"markPriceUpdate","E":{event},"s":"{stream.market.symbol}","p":"{p}","i":"{i}",'
                   f'"P":"{settle}","r":"{r}","T":{funding}}}')
        return f"{stream.prefix}{payload}}}" if self.combined else payload

    def _collect(self, now: float) -> tuple[list[str], list[str], list[float | None]]:
        """Frames due at `now`: (texts, stream names, scheduled loop times; None for duplicates)."""
        texts: list[str] = []
        names: list[str] = []
        scheds: list[float | None] = []
        server = self.server
        epoch_ms = server._epoch * 1000

        def add(stream_name: str, text: str, sched: float) -> None:
            texts.append(text)
            names.append(stream_name)
            scheds.append(sched)
            if self.duplicate_remaining > 0:
                self.duplicate_remaining -= 1
                self.duplicates_sent += 1
                self.duplicates_by_stream[stream_name] = self.duplicates_by_stream.get(stream_name, 0) + 1
                server._duplicates_by_stream[stream_name] = server._duplicates_by_stream.get(stream_name, 0) + 1
                texts.append(text)
                names.append(stream_name)
                scheds.append(None)

        cycle = self.cycle
        if cycle and self.burst_pending:
            count, self.burst_pending = min(self.burst_pending, _MAX_BATCH), max(0, self.burst_pending - _MAX_BATCH)
            sched_ms = int(self.burst_at * 1000 + epoch_ms)
            for _ in range(count):
                stream = cycle[self.cycle_pos]
                self.cycle_pos = (self.cycle_pos + 1) % len(cycle)
                add(stream.name, self._frame(stream, sched_ms), self.burst_at)
        rate = server.rate
        if cycle and rate > 0:
            # The epsilon keeps a wake-up at exactly base + k/rate from rounding down to "not yet due".
            due = int((now - self.base) * rate + 1e-9) + 1 - self.k
            for _ in range(min(due, _MAX_BATCH - len(texts))):
                sched = self.base + self.k / rate
                self.k += 1
                stream = cycle[self.cycle_pos]
                self.cycle_pos = (self.cycle_pos + 1) % len(cycle)
                add(stream.name, self._frame(stream, int(sched * 1000 + epoch_ms)), sched)
        if self.marks:
            now_ms = server._wall_ms(now)
            for mark in self.marks:
                due_at = mark.next_ms / 1000 - server._epoch
                if due_at <= now + 1e-9:
                    add(mark.stream.name, self._mark_frame(mark), due_at)
                    # Boundaries missed while behind are skipped: a mark price is a sample, not a backlog.
                    mark.next_ms = max(mark.next_ms + mark.period_ms, (now_ms // mark.period_ms + 1) * mark.period_ms)
        return texts, names, scheds

    def _next_due(self) -> float:
        candidates = [math.inf]
        rate = self.server.rate
        if self.cycle and rate > 0:
            candidates.append(self.base + self.k / rate)
        if self.cycle and self.burst_pending:
            candidates.append(0.0)
        for mark in self.marks:
            candidates.append(mark.next_ms / 1000 - self.server._epoch)
        return min(candidates)

    async def write(self, texts: list[str]) -> None:
        """All texts in one socket write; still through the protocol, so framing and extensions stay correct."""
        ws = self.ws
        async with ws.send_context():
            protocol = ws.protocol
            for text in texts:
                protocol.send_text(text.encode())
            ws.transport.writelines([data for data in protocol.data_to_send() if data])

    async def run_sender(self) -> None:
        server, loop = self.server, self.loop
        try:
            while True:
                now = loop.time()
                if server._stall_until > now:
                    await self.waker.sleep_until(server._stall_until)
                    if server._stall_until <= loop.time():
                        self.rebase(loop.time())  # a stall skips what was due; it does not flood afterwards
                    continue
                texts, names, scheds = self._collect(now)
                if texts:
                    await self.write(texts)
                    self._account(texts, names, scheds, loop.time())
                if len(texts) >= _MAX_BATCH:
                    await asyncio.sleep(0)
                    continue
                await self.waker.sleep_until(self._next_due())
        except ConnectionClosed:
            return
        except Exception:  # a bug here must show, not silently end the stream
            _log.exception("fake Binance sender of connection %s failed", self.id)
            raise

    def _account(self, texts: list[str], names: list[str], scheds: list[float | None], sent: float) -> None:
        server = self.server
        by_stream, totals = self.frames_by_stream, server._frames_by_stream
        last_frames, delays, all_delays = server._last_frames, self.delays, server._delays
        sent_wall = sent + server._epoch
        conn_id = self.id
        recent = self.recent
        for text, name, sched in zip(texts, names, scheds):
            by_stream[name] = by_stream.get(name, 0) + 1
            totals[name] = totals.get(name, 0) + 1
            last_frames.append((conn_id, name, text, sent_wall))
            recent.append((name, text))
            if sched is not None:
                delay = sent - sched if sent > sched else 0.0
                delays.add(delay)
                all_delays.add(delay)
        self.frames_sent += len(texts)
        server._frames_sent += len(texts)

    def snapshot(self) -> ConnectionRecord:
        return ConnectionRecord(
            id=self.id, path=self.path, combined=self.combined, requested_streams=self.requested,
            subscriptions=tuple(self.subscriptions), opened_at=self.opened_at, closed_at=self.closed_at,
            close_code=self.close_code, close_reason=self.close_reason, closed_by=self.closed_by,
            frames_sent=self.frames_sent, frames_by_stream=dict(self.frames_by_stream),
            duplicates_sent=self.duplicates_sent, malformed_sent=self.malformed_sent,
            requests=tuple(self.requests), delay=self.delays.stats(), ping_latency_ms=self.ws.latency * 1000,
            duplicates_by_stream=dict(self.duplicates_by_stream), out_of_order_sent=self.out_of_order_sent,
        )

    # -- hostile frames (loop side)

    def out_of_order_frames(self, count: int, age_ms: int, stream_name: str | None) -> tuple[list[str], list[str]]:
        """`count` new events of one bookTicker/aggTrade stream, stamped `age_ms` before the stream's last event;
        the stream's clock is left alone, so the frames after them are in order again. ([], []) without such a
        stream."""
        realtime = [s for s in (self.server._stream(n) for n in self.subscriptions)
                    if s is not None and s.kind in _REALTIME_WEIGHTS]
        stream = next((s for s in realtime if stream_name in (None, s.name)), None)
        if stream is None:
            return [], []
        last = self.stamps.get(stream.name)
        newest = last[0] if last else self.server._wall_ms(self.loop.time())
        texts = []
        for i in range(count):
            # Each one older than the one before: every frame is out of order, not just the first.
            when = newest - age_ms - i
            texts.append(self._frame(stream, when, stamp=(when, when)))
        return texts, [stream.name] * count

    def resend_frames(self, count: int) -> tuple[list[str], list[str]]:
        """The last `count` stream frames this connection sent (in their order), to be sent again."""
        again = list(self.recent)[-count:] if count else []
        return [text for _, text in again], [name for name, _ in again]

    def note_extra(self, kind: str, names: list[str]) -> None:
        """Counts frames sent outside the schedule once they are written: repeats, or out-of-order events."""
        server = self.server
        if kind == "duplicate":
            for name in names:
                self.duplicates_by_stream[name] = self.duplicates_by_stream.get(name, 0) + 1
                server._duplicates_by_stream[name] = server._duplicates_by_stream.get(name, 0) + 1
            self.duplicates_sent += len(names)
        else:
            self.out_of_order_sent += len(names)
            server._out_of_order_sent += len(names)


def _parse_path(raw_path: str) -> tuple[str, bool, list[str]] | None:
    """(path, combined, streams) for `/stream?streams=a/b` and `/ws/a/b`; None for any other path."""
    parts = urlsplit(raw_path)
    path = parts.path
    if path in ("/stream", "/stream/"):
        value = parse_qs(parts.query).get("streams", [""])[0]
        return path, True, [s for s in value.split("/") if s]
    if path == "/ws" or path.startswith("/ws/"):
        return path, False, [unquote(s) for s in path[len("/ws"):].split("/") if s]
    return None


def _malformed_text(kind: str, conn: _Connection, now_ms: int) -> str:
    stream = next((s for s in (conn.server._stream(n) for n in conn.subscriptions) if s is not None), None)
    name = stream.name if stream else "btcusdt@bookTicker"
    symbol = stream.market.symbol if stream else "BTCUSDT"
    if kind == "non_json":
        return f'{{"stream":"{name}","data":{{"e":"bookTicker","u":'  # a frame cut short
    if kind == "huge":
        # A real envelope whose payload is padding: no prices, no ids, nothing a consumer may count.
        kind_name = stream.kind if stream else BOOK_TICKER
        head = f'{{"stream":"{name}","data":{{"e":"{kind_name}","s":"{symbol}","E":{now_ms},"pad":"'
        return head + "x" * max(0, HUGE_FRAME_BYTES - len(head) - 3) + '"}}'
    if kind == "no_envelope":
        return json.dumps({"unexpected": "frame without stream or data", "E": now_ms}, separators=(",", ":"))
    wrong = {"e": "aggTrade", "E": str(now_ms), "a": "1", "s": symbol, "p": 65000.1, "q": 1, "f": None,
             "l": [], "T": str(now_ms), "m": "true"}
    if stream is not None and stream.kind == BOOK_TICKER:
        wrong = {"e": "bookTicker", "u": "1", "E": str(now_ms), "T": None, "s": symbol, "b": 65000.1,
                 "B": True, "a": [65000.2], "A": {}}
    elif stream is not None and stream.kind in _MARK_PERIOD_MS:
        wrong = {"e": "markPriceUpdate", "E": str(now_ms), "s": symbol, "p": 65000.1, "i": None,
                 "P": False, "r": 0.0001, "T": "soon"}
    payload = json.dumps(wrong, separators=(",", ":"))
    return f'{{"stream":"{name}","data":{payload}}}' if conn.combined else payload


# ------------------------------------------------------------------------------------------------ server


class FakeBinance:
    """A fake Binance USDⓈ-M futures market-stream server in a background thread.

    `rate` is events per second per connection across its bookTicker/aggTrade streams; markPrice streams
    follow their own 3 s / 1 s cadence on whole seconds. `seed` drives the per-symbol price walks.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate: float = DEFAULT_RATE,
        seed: int | str = 0,
        ideal: bool = False,
        ping_interval: float | None = DEFAULT_PING_INTERVAL,
        ping_timeout: float | None = DEFAULT_PING_TIMEOUT,
        keep_frames: int = 1000,
        compression: str | None = None,
        start_timeout: float = 10.0,
        call_timeout: float = 10.0,
    ) -> None:
        _check_rate(rate)
        if keep_frames < 0:
            raise ConfigError(f"keep_frames is {keep_frames}; pass 0 or a positive number of frames to keep.")
        self.host = host
        self.seed = seed
        self.ideal = ideal
        self.rate = float(rate)
        self._requested_port = port
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._compression = compression
        self._start_timeout = start_timeout
        self._call_timeout = call_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Server | None = None
        self._stopping: asyncio.Event | None = None
        self._port: int | None = None
        self._markets: dict[str, _SymbolMarket] = {}
        self._streams: dict[str, _Stream | None] = {}
        self._open: dict[int, _Connection] = {}
        self._closed: collections.deque[ConnectionRecord] = collections.deque(maxlen=_CLOSED_KEPT)
        self._next_id = 1
        self._epoch = 0.0  # wall clock minus loop clock
        self._ideal_ms = 0
        self._stall_until = -math.inf
        self._refuse_until = -math.inf
        self._refuse_status = 503
        self._refused = 0
        self._frames_sent = 0
        self._frames_by_stream: dict[str, int] = {}
        self._duplicates_by_stream: dict[str, int] = {}
        self._malformed_sent = 0
        self._out_of_order_sent = 0
        self._last_frames: collections.deque[tuple[int, str, str, float]] = collections.deque(maxlen=keep_frames)
        self._delays = _Delays()
        self._faults: collections.deque[FaultEvent] = collections.deque(maxlen=_FAULTS_KEPT)
        self._background: set[asyncio.Task[Any]] = set()

    # -- lifecycle

    def __enter__(self) -> FakeBinance:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> FakeBinance:
        """Starts the server thread and returns once the port accepts connections."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failure), name="fake-binance", daemon=True)
        self._thread.start()
        if not ready.wait(self._start_timeout):
            self.stop()
            raise UnreachableError(f"The fake Binance server did not start within {self._start_timeout:.0f} s; "
                                   "check that the machine is not overloaded and try again.")
        if failure:
            self._thread.join(self._start_timeout)
            self._thread = None
            exc = failure[0]
            if isinstance(exc, OSError):
                raise UnreachableError(f"The fake Binance server could not listen on {self.host}:"
                                       f"{self._requested_port} ({exc.strerror or exc}); choose another port, "
                                       "or port 0 to let the OS pick one.") from exc
            raise exc
        return self

    def stop(self) -> None:
        """Closes every connection (1001 going away) and the listening socket, then ends the thread."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and self._stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._stopping.set)
        thread.join(self._start_timeout + 10)
        self._thread = None

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready, failure))
        finally:
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            ready.set()

    async def _serve(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.get_running_loop()
        self._epoch = time.time() - loop.time()
        self._stopping = asyncio.Event()
        try:
            self._server = await serve(
                self._handle, self.host, self._requested_port,
                process_request=self._process_request, compression=self._compression,
                ping_interval=self._ping_interval, ping_timeout=self._ping_timeout,
                # A client that stops reading must not hold a close (or stop()) for long.
                close_timeout=2, write_limit=2**20, logger=_log,
            )
        except BaseException as exc:  # reported to start() in the caller's thread
            failure.append(exc)
            ready.set()
            return
        self._port = self._server.sockets[0].getsockname()[1]
        ready.set()
        await self._stopping.wait()
        for conn in self._open.values():
            conn.closed_by = conn.closed_by or "shutdown"
        self._server.close()
        try:
            await asyncio.wait_for(self._server.wait_closed(), timeout=10)
        except TimeoutError:
            for conn in list(self._open.values()):
                conn.ws.transport.abort()

    # -- addresses

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("The fake Binance server is not running; call start() or use it in a with block.")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ws://127.0.0.1:PORT (append /stream?streams=... or /ws/<name>)."""
        return f"ws://{self.host}:{self.port}"

    def combined_url(self, streams: Iterable[str] = ()) -> str:
        return f"{self.url}/stream?streams={'/'.join(streams)}"

    def raw_url(self, streams: Iterable[str] = ()) -> str:
        return f"{self.url}/ws/{'/'.join(streams)}".rstrip("/")

    # -- calls from other threads

    def _loop_or_fail(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._thread is None:
            raise RuntimeError("The fake Binance server is not running; call start() or use it in a with block.")
        return self._loop

    def _call(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        loop = self._loop_or_fail()
        if self._thread is threading.current_thread():
            raise RuntimeError("FakeBinance methods block on the server's own loop; call them from another thread.")
        return asyncio.run_coroutine_threadsafe(make(), loop).result(self._call_timeout)

    def _note(self, action: str, **detail: Any) -> None:
        self._faults.append(FaultEvent(time.time(), action, detail))

    # -- controls (thread-safe)

    def set_rate(self, rate: float) -> None:
        """Changes events per second per connection; schedules restart from now, so nothing floods."""
        _check_rate(rate)

        async def apply() -> None:
            self.rate = float(rate)
            now = self._loop_or_fail().time()
            for conn in self._open.values():
                conn.rebase(now)
                conn.waker.wake()
            self._note("set_rate", rate=rate)

        self._call(apply)

    def drop_connections(self) -> int:
        """Aborts every open connection's TCP socket without a close frame; returns how many."""

        async def apply() -> int:
            conns = list(self._open.values())
            for conn in conns:
                conn.closed_by = "drop"
                conn.ws.transport.abort()
            self._note("drop_connections", connections=len(conns))
            return len(conns)

        return self._call(apply)

    def close_connections(self, code: int = 1000, reason: str = "") -> int:
        """Closes every open connection with a close frame carrying `code` and `reason`; returns how many."""
        if code not in _VALID_CLOSE_CODES:
            raise ConfigError(f"Close code {code} cannot be sent in a close frame; use 1000-1003, 1007-1014 "
                              "or 3000-4999.")
        if len(reason.encode()) > 123:
            raise ConfigError("A close reason must fit in 123 bytes of UTF-8; shorten it.")

        async def apply() -> int:
            conns = list(self._open.values())
            loop = self._loop_or_fail()
            for conn in conns:
                conn.closed_by = "server"
                # Not awaited: the closing handshake waits for the client, which may be slow or gone.
                task = loop.create_task(conn.ws.close(code, reason))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            self._note("close_connections", connections=len(conns), code=code, reason=reason)
            return len(conns)

        return self._call(apply)

    def stall(self, seconds: float | None = None) -> None:
        """Stops sending stream frames on every connection for `seconds`, or until resume(); sockets stay open
        and requests are still answered. Events due during the stall are skipped, not sent late."""
        if seconds is not None and seconds < 0:
            raise ConfigError(f"A stall of {seconds} s is negative; pass a positive duration or None.")

        async def apply() -> None:
            now = self._loop_or_fail().time()
            self._stall_until = math.inf if seconds is None else now + seconds
            for conn in self._open.values():
                conn.waker.wake()
            self._note("stall", seconds=seconds)

        self._call(apply)

    def resume(self) -> None:
        """Ends a stall now."""

        async def apply() -> None:
            self._stall_until = -math.inf
            for conn in self._open.values():
                conn.waker.wake()
            self._note("resume")

        self._call(apply)

    def send_malformed(self, kind: str = "non_json", count: int = 1) -> int:
        """Sends `count` malformed frames of `kind` (see MALFORMED_KINDS) to every open connection, even while
        stalled; returns the number of frames sent."""
        if kind not in MALFORMED_KINDS:
            raise ConfigError(f"Unknown malformed frame kind {kind!r}; use one of {', '.join(MALFORMED_KINDS)}.")
        if count < 1:
            raise ConfigError(f"count is {count}; send at least one malformed frame.")

        async def apply() -> int:
            sent = 0
            now = self._loop_or_fail().time()
            for conn in list(self._open.values()):
                text = _malformed_text(kind, conn, self._wall_ms(now))
                try:
                    await conn.write([text] * count)
                except ConnectionClosed:
                    continue
                conn.malformed_sent += count
                self._malformed_sent += count
                sent += count
                for _ in range(count):
                    self._last_frames.append((conn.id, f"<malformed:{kind}>", text, time.time()))
            self._note("send_malformed", kind=kind, count=count, frames=sent)
            return sent

        return self._call(apply)

    def duplicate_next(self, count: int) -> int:
        """Sends each of the next `count` stream frames of every open connection twice; returns connections."""
        if count < 1:
            raise ConfigError(f"count is {count}; duplicate at least one frame.")

        async def apply() -> int:
            for conn in self._open.values():
                conn.duplicate_remaining += count
            self._note("duplicate_next", count=count, connections=len(self._open))
            return len(self._open)

        return self._call(apply)

    def burst(self, count: int) -> int:
        """Sends `count` extra bookTicker/aggTrade events at once on every open connection, on top of the rate;
        they share one event time. Returns the number of connections that had such streams."""
        if count < 1:
            raise ConfigError(f"count is {count}; a burst needs at least one event.")

        async def apply() -> int:
            now = self._loop_or_fail().time()
            hit = 0
            for conn in self._open.values():
                if conn.cycle:
                    conn.burst_pending += count
                    conn.burst_at = now
                    conn.waker.wake()
                    hit += 1
            self._note("burst", count=count, connections=hit)
            return hit

        return self._call(apply)

    def resend_recent(self, count: int) -> int:
        """Sends again, on every open connection, the last `count` stream frames it already sent (same ids, older
        times: duplicates that are not adjacent), even while stalled. Returns the number of frames sent."""
        if count < 1:
            raise ConfigError(f"count is {count}; resend at least one frame.")
        if count > _RECENT_KEPT:
            raise ConfigError(f"count is {count}; the fake keeps the last {_RECENT_KEPT} frames of a connection.")

        async def apply() -> int:
            return await self._send_extra("resend_recent", {"count": count}, "duplicate",
                                          lambda conn: conn.resend_frames(count))

        return self._call(apply)

    def send_out_of_order(self, count: int = 1, age_ms: int = 1000, stream: str | None = None) -> int:
        """Sends, on every open connection, `count` new valid bookTicker/aggTrade events (fresh ids) stamped `age_ms`
        before the last event of their stream: `stream` (a subscribed name such as `btcusdt@aggTrade`), by default
        the connection's first such stream. Sent even while stalled. Returns the number of frames sent."""
        if count < 1:
            raise ConfigError(f"count is {count}; send at least one out-of-order event.")
        if not isinstance(age_ms, int) or age_ms < 1:
            raise ConfigError(f"age_ms is {age_ms!r}; pass a whole number of milliseconds >= 1.")
        if stream is not None and parse_stream_name(stream) is None:
            raise ConfigError(f"{stream!r} is not a stream name; pass one like 'btcusdt@aggTrade', or None.")

        async def apply() -> int:
            return await self._send_extra("send_out_of_order", {"count": count, "age_ms": age_ms, "stream": stream},
                                          "out_of_order", lambda conn: conn.out_of_order_frames(count, age_ms, stream))

        return self._call(apply)

    async def _send_extra(self, action: str, detail: dict[str, Any], kind: str,
                          make: Callable[[_Connection], tuple[list[str], list[str]]]) -> int:
        """Writes frames made per open connection outside its schedule and records them as `kind` ("duplicate"
        or "out_of_order"), with no delay samples."""
        sent = 0
        for conn in list(self._open.values()):
            texts, names = make(conn)
            if not texts:
                continue
            try:
                await conn.write(texts)
            except ConnectionClosed:
                continue
            conn._account(texts, names, [None] * len(texts), self._loop_or_fail().time())
            conn.note_extra(kind, names)
            sent += len(texts)
        self._note(action, **detail, frames=sent)
        return sent

    def refuse_connections(self, seconds: float | None = None, status: int = 503) -> None:
        """Answers new WebSocket handshakes with HTTP `status` for `seconds` (or until accept_connections());
        open connections are not touched."""
        if not 400 <= status <= 599:
            raise ConfigError(f"HTTP status {status} would not refuse a handshake; use a 4xx or 5xx status.")

        async def apply() -> None:
            now = self._loop_or_fail().time()
            self._refuse_until = math.inf if seconds is None else now + seconds
            self._refuse_status = status
            self._note("refuse_connections", seconds=seconds, status=status)

        self._call(apply)

    def accept_connections(self) -> None:
        """Ends a refusal now."""

        async def apply() -> None:
            self._refuse_until = -math.inf
            self._note("accept_connections")

        self._call(apply)

    # -- the record

    def record(self) -> Record:
        """A consistent snapshot of connections, frames and faults so far."""

        async def take() -> Record:
            conns = list(self._closed) + [c.snapshot() for c in self._open.values()]
            conns.sort(key=lambda c: c.id)
            return Record(
                connections=tuple(conns),
                refused=self._refused,
                frames_sent=self._frames_sent,
                frames_by_stream=dict(self._frames_by_stream),
                last_frames=tuple(SentFrame(*f) for f in self._last_frames),
                delay=self._delays.stats(),
                faults=tuple(self._faults),
                duplicates_by_stream=dict(self._duplicates_by_stream),
                malformed_sent=self._malformed_sent,
                out_of_order_sent=self._out_of_order_sent,
            )

        return self._call(take)

    def wait_for(self, condition: Callable[[Record], Any], *, timeout: float = 10.0, interval: float = 0.02,
                 what: str = "condition") -> Record:
        """Polls the record until `condition(record)` is truthy and returns that record."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.record()
            if condition(record):
                return record
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what} not met within {timeout:.1f} s on the fake Binance server "
                                   f"({len(record.open_connections)} open connections, "
                                   f"{record.frames_sent} frames sent)")
            time.sleep(interval)

    # -- loop-side internals

    def _wall_ms(self, loop_time: float) -> int:
        return int((loop_time + self._epoch) * 1000)

    def _stream(self, name: str) -> _Stream | None:
        """The generator for a supported stream name; None for names that are accepted but stay silent."""
        if name in self._streams:
            return self._streams[name]
        parsed = parse_stream_name(name)
        stream = None
        if parsed is not None and (parsed[1] in _REALTIME_WEIGHTS or parsed[1] in _MARK_PERIOD_MS):
            symbol, kind = parsed
            market = self._markets.get(symbol)
            if market is None:
                market = self._markets[symbol] = _SymbolMarket(symbol, self.seed)
            stream = _Stream(name, kind, market, f'{{"stream":"{name}","data":')
        if len(self._streams) < 100_000:  # names come from clients; keep the cache bounded
            self._streams[name] = stream
        return stream

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        now = self._loop_or_fail().time()
        if now < self._refuse_until:
            self._refused += 1
            return connection.respond(self._refuse_status, "The fake exchange is refusing connections.\n")
        if _parse_path(request.path) is None:
            return connection.respond(http.HTTPStatus.NOT_FOUND,
                                      "Use /stream?streams=<a>/<b> or /ws/<streamName>.\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        parsed = _parse_path(ws.request.path)
        assert parsed is not None  # _process_request rejected other paths
        path, combined, streams = parsed
        conn = _Connection(self, ws, self._next_id, path, combined, streams)
        self._next_id += 1
        self._open[conn.id] = conn
        sender = asyncio.get_running_loop().create_task(conn.run_sender())
        try:
            await conn.run_reader()
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            try:
                await asyncio.wait_for(ws.wait_closed(), timeout=15)
            except TimeoutError:
                ws.transport.abort()
            conn.closed_at = time.time()
            conn.close_code = ws.close_code
            conn.close_reason = ws.close_reason
            conn.closed_by = conn.closed_by or "client"
            del self._open[conn.id]
            self._closed.append(conn.snapshot())


def _check_rate(rate: float) -> None:
    if not isinstance(rate, (int, float)) or rate < 0 or math.isnan(rate) or math.isinf(rate):
        raise ConfigError(f"rate is {rate!r}; pass events per second per connection as a number >= 0.")


# ---------------------------------------------------------------------------------------------- standalone


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantlab-chaos fake-binance",
        description="Serve fake Binance USDⓈ-M futures market streams until Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 lets the OS pick one (default 0)")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help=f"bookTicker/aggTrade events per second per connection (default {DEFAULT_RATE:g})")
    parser.add_argument("--seed", default="0", help="seed of the per-symbol price walks (default 0)")
    parser.add_argument("--ideal", action="store_true",
                        help="strictly increasing event times across all frames, for debugging")
    parser.add_argument("--ping-interval", type=float, default=DEFAULT_PING_INTERVAL,
                        help=f"seconds between server pings (default {DEFAULT_PING_INTERVAL:g})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Serves until SIGINT/SIGTERM; prints one JSON line with the URL once listening."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.rate < 0 or not math.isfinite(args.rate):
        parser.error("--rate must be a number >= 0")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    seed: int | str = int(args.seed) if re.fullmatch(r"-?\d+", args.seed) else args.seed
    stop = threading.Event()
    restore = _install_stop_handlers(stop)
    try:
        fake = FakeBinance(host=args.host, port=args.port, rate=args.rate, seed=seed, ideal=args.ideal,
                           ping_interval=args.ping_interval or None)
        try:
            fake.start()
        except UnreachableError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        try:
            print(json.dumps({"event": "fake_binance", "status": "listening", "url": fake.url, "host": args.host,
                              "port": fake.port, "rate": args.rate, "seed": seed, "ideal": args.ideal}),
                  flush=True)
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            fake.stop()
    finally:
        restore()
    return 0


def _install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM set `stop`; returns a function restoring the previous handlers (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


if __name__ == "__main__":
    raise SystemExit(main())
