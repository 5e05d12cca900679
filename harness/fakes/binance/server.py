"""The fake exchange's server: a websockets server on its own loop and thread, with thread-safe fault controls.

Every public method marshals onto the server's loop and waits for the result there, so the state needs no locks;
the per-connection work (scheduling, framing, requests) lives in `connection.py`.
"""
from __future__ import annotations

import asyncio
import collections
import http
import logging
import math
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from harness.fakes.binance.connection import MALFORMED_KINDS, RECENT_KEPT, Connection, malformed_text, parse_path
from harness.fakes.binance.market import MARK_PERIOD_MS, REALTIME_WEIGHTS, Stream, SymbolMarket, parse_stream_name
from harness.fakes.binance.records import ConnectionRecord, Delays, FaultEvent, Record, SentFrame
from quantlab_chaos.errors import ConfigError, UnreachableError
from quantlab_chaos.waiting import wait_until

__all__ = ["DEFAULT_PING_INTERVAL", "DEFAULT_PING_TIMEOUT", "DEFAULT_RATE", "FakeBinance"]

T = TypeVar("T")
# One logger for the whole fake, named after the package as it was before the split into modules.
_log = logging.getLogger(__package__ or __name__)

DEFAULT_RATE = 20.0
# Binance futures: a ping frame every 3 minutes, disconnect after 10 minutes without a pong.
DEFAULT_PING_INTERVAL = 180.0
DEFAULT_PING_TIMEOUT = 600.0

_CLOSED_KEPT = 1000
_FAULTS_KEPT = 1000
_VALID_CLOSE_CODES = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))


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
        self._markets: dict[str, SymbolMarket] = {}
        self._streams: dict[str, Stream | None] = {}
        self._open: dict[int, Connection] = {}
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
        self._delays = Delays()
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
        except BaseException as exc:  # noqa: BLE001 - reported to start() in the caller's thread, which raises it
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
                text = malformed_text(kind, conn, self._wall_ms(now))
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
        if count > RECENT_KEPT:
            raise ConfigError(f"count is {count}; the fake keeps the last {RECENT_KEPT} frames of a connection.")

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
                          make: Callable[[Connection], tuple[list[str], list[str]]]) -> int:
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
            conn.account(texts, names, [None] * len(texts), self._loop_or_fail().time())
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
        """Polls the record until `condition(record)` is truthy and returns that record (a condition that raises,
        e.g. on a connection not made yet, is "not yet")."""
        latest = [self.record()]

        def met() -> bool:
            latest[0] = self.record()
            return bool(condition(latest[0]))

        try:
            wait_until(met, timeout=timeout, interval=interval, what=what)
        except TimeoutError as exc:
            record = latest[0]
            raise TimeoutError(f"{exc} on the fake Binance server ({len(record.open_connections)} open connections, "
                               f"{record.frames_sent} frames sent)") from None
        return latest[0]

    # -- loop-side internals

    def _wall_ms(self, loop_time: float) -> int:
        return int((loop_time + self._epoch) * 1000)

    def _stream(self, name: str) -> Stream | None:
        """The generator for a supported stream name; None for names that are accepted but stay silent."""
        if name in self._streams:
            return self._streams[name]
        parsed = parse_stream_name(name)
        stream = None
        if parsed is not None and (parsed[1] in REALTIME_WEIGHTS or parsed[1] in MARK_PERIOD_MS):
            symbol, kind = parsed
            market = self._markets.get(symbol)
            if market is None:
                market = self._markets[symbol] = SymbolMarket(symbol, self.seed)
            stream = Stream(name, kind, market, f'{{"stream":"{name}","data":')
        if len(self._streams) < 100_000:  # names come from clients; keep the cache bounded
            self._streams[name] = stream
        return stream

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        now = self._loop_or_fail().time()
        if now < self._refuse_until:
            self._refused += 1
            return connection.respond(self._refuse_status, "The fake exchange is refusing connections.\n")
        if parse_path(request.path) is None:
            return connection.respond(http.HTTPStatus.NOT_FOUND,
                                      "Use /stream?streams=<a>/<b> or /ws/<streamName>.\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        parsed = parse_path(ws.request.path)
        assert parsed is not None  # _process_request rejected other paths
        path, combined, streams = parsed
        conn = Connection(self, ws, self._next_id, path, combined, streams)
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
