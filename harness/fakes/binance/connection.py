"""One client connection of the fake exchange: its subscriptions, its frame scheduler and its part of the record.

All of it runs on the server's loop. The server owns the shared counters and the clock offset; a connection
updates them as it sends, so a record taken on the loop is consistent across connections.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import random
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from harness.fakes.binance.market import BOOK_TICKER, MARK_PERIOD_MS, REALTIME_WEIGHTS, Stream, parse_stream_name
from harness.fakes.binance.protocol import Outcome, error_reply, json_error_message, result_reply, validate_request
from harness.fakes.binance.records import ConnectionRecord, Delays, RequestLog

if TYPE_CHECKING:
    from harness.fakes.binance.server import FakeBinance

__all__ = ["HUGE_FRAME_BYTES", "MALFORMED_KINDS", "RECENT_KEPT", "Connection", "malformed_text", "parse_path"]

# One logger for the whole fake, named after the package as it was before the split into modules.
_log = logging.getLogger(__package__ or __name__)

#: What `send_malformed` can send: text that is not JSON, JSON without stream/data, a payload with wrong types,
#: and a frame of HUGE_FRAME_BYTES (an envelope whose payload is padding, no usable event).
MALFORMED_KINDS = ("non_json", "no_envelope", "wrong_types", "huge")
#: Size of a `huge` malformed frame: thousands of times a real one, under common client limits (ws: 100 MiB).
HUGE_FRAME_BYTES = 4 * 2**20

RECENT_KEPT = 1000  # stream frames per connection that resend_recent can send again
_FUNDING_INTERVAL_MS = 8 * 3600 * 1000
# A batch is capped so one connection far behind cannot hold the loop for long.
_MAX_BATCH = 2000
_REQUESTS_KEPT = 200


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

    def __init__(self, stream: Stream, now_ms: int) -> None:
        self.stream = stream
        self.period_ms = MARK_PERIOD_MS[stream.kind]
        self.next_ms = (now_ms // self.period_ms + 1) * self.period_ms


class Connection:
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
        self.recent: collections.deque[tuple[str, str]] = collections.deque(maxlen=RECENT_KEPT)
        self.requests: collections.deque[RequestLog] = collections.deque(maxlen=_REQUESTS_KEPT)
        self.delays = Delays()
        loop = server._loop_or_fail()
        self.loop = loop
        self.waker = _Waker(loop)
        self.cycle: list[Stream] = []
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
        realtime = [s for s in streams if s.kind in REALTIME_WEIGHTS]
        cycle = [s for rnd in range(max(REALTIME_WEIGHTS.values())) for s in realtime
                 if REALTIME_WEIGHTS[s.kind] > rnd]
        if cycle and not self.cycle:
            self.rebase(self.loop.time())  # otherwise the time without streams would come out as a flood
        self.cycle = cycle
        self.cycle_pos = 0
        now_ms = self.server._wall_ms(self.loop.time())
        kept = {m.stream.name: m for m in self.marks}
        self.marks = [kept.get(s.name) or _Mark(s, now_ms) for s in streams if s.kind in MARK_PERIOD_MS]
        self.waker.wake()

    def rebase(self, now: float) -> None:
        self.base = now
        self.k = 0
        now_ms = self.server._wall_ms(now)
        for mark in self.marks:
            mark.next_ms = (now_ms // mark.period_ms + 1) * mark.period_ms

    # -- requests

    def handle_request(self, message: str | bytes) -> Outcome:
        if isinstance(message, bytes):
            try:
                message = message.decode()
            except UnicodeDecodeError:
                return Outcome(error_reply(3, "Invalid JSON: expected value at line 1 column 1"), close=True)
        try:
            obj = json.loads(message)
        except json.JSONDecodeError as exc:
            return Outcome(error_reply(3, f"Invalid JSON: {json_error_message(exc)}"), close=True)
        invalid = validate_request(message, obj)
        if invalid is not None:
            return Outcome(invalid)
        method, request_id, params = obj["method"], obj["id"], obj.get("params")
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            return Outcome(self._change_subscriptions(method, params, request_id))
        if method == "LIST_SUBSCRIPTIONS":
            return Outcome(result_reply(list(self.subscriptions), request_id))
        return Outcome(self._property(method, params, request_id))

    def _change_subscriptions(self, method: str, params: Any, request_id: int) -> str:
        if not isinstance(params, list) or not all(isinstance(p, str) and parse_stream_name(p) for p in params):
            return error_reply(2, "Invalid request: invalid stream", request_id)
        if method == "SUBSCRIBE":
            self._subscribe(params)
        else:
            self._unsubscribe(params)
        return result_reply(None, request_id)

    def _property(self, method: str, params: Any, request_id: int) -> str:
        params = params if isinstance(params, list) else []
        if len(params) > (2 if method == "SET_PROPERTY" else 1):
            return error_reply(2, "Invalid request: too many parameters", request_id)
        if not params or not isinstance(params[0], str):
            return error_reply(2, "Invalid request: property name must be a string", request_id)
        if params[0] != "combined":
            return error_reply(0, "Unknown property", request_id)
        if method == "GET_PROPERTY":
            return result_reply(self.combined, request_id)
        if len(params) < 2 or not isinstance(params[1], bool):
            return error_reply(1, "Invalid value type: expected Boolean", request_id)
        self.combined = params[1]
        return result_reply(None, request_id)

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

    def _stamp(self, stream: Stream, sched_ms: int) -> tuple[int, int]:
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

    def _frame(self, stream: Stream, sched_ms: int, stamp: tuple[int, int] | None = None) -> str:
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
                    self.account(texts, names, scheds, loop.time())
                if len(texts) >= _MAX_BATCH:
                    await asyncio.sleep(0)
                    continue
                await self.waker.sleep_until(self._next_due())
        except ConnectionClosed:
            return
        except Exception:  # a bug here must show, not silently end the stream
            _log.exception("fake Binance sender of connection %s failed", self.id)
            raise

    def account(self, texts: list[str], names: list[str], scheds: list[float | None], sent: float) -> None:
        """Counts frames once written, here and on the server; a `sched` of None (a repeat) adds no delay sample."""
        server = self.server
        by_stream, totals = self.frames_by_stream, server._frames_by_stream
        last_frames, delays, all_delays = server._last_frames, self.delays, server._delays
        sent_wall = sent + server._epoch
        conn_id = self.id
        recent = self.recent
        for text, name, sched in zip(texts, names, scheds, strict=True):
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
                    if s is not None and s.kind in REALTIME_WEIGHTS]
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


def parse_path(raw_path: str) -> tuple[str, bool, list[str]] | None:
    """(path, combined, streams) for `/stream?streams=a/b` and `/ws/a/b`; None for any other path."""
    parts = urlsplit(raw_path)
    path = parts.path
    if path in ("/stream", "/stream/"):
        value = parse_qs(parts.query).get("streams", [""])[0]
        return path, True, [s for s in value.split("/") if s]
    if path == "/ws" or path.startswith("/ws/"):
        return path, False, [unquote(s) for s in path[len("/ws"):].split("/") if s]
    return None


def malformed_text(kind: str, conn: Connection, now_ms: int) -> str:
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
    elif stream is not None and stream.kind in MARK_PERIOD_MS:
        wrong = {"e": "markPriceUpdate", "E": str(now_ms), "s": symbol, "p": 65000.1, "i": None,
                 "P": False, "r": 0.0001, "T": "soon"}
    payload = json.dumps(wrong, separators=(",", ":"))
    return f'{{"stream":"{name}","data":{payload}}}' if conn.combined else payload
