"""The fake Binance USDⓈ-M market-stream server, driven by a real websockets client on 127.0.0.1."""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from harness.fakes.binance import FakeBinance, parse_stream_name, streams_for
from quantlab_chaos.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
BTC = streams_for(["BTCUSDT"], ("bookTicker", "aggTrade"))
BTC_ETH = streams_for(["BTCUSDT", "ETHUSDT"], ("bookTicker", "aggTrade"))
PRICE_2DP = re.compile(r"^\d+\.\d{2}$")  # BTCUSDT/ETHUSDT futures prices
QTY_3DP = re.compile(r"^\d+\.\d{3}$")
MARK_8DP = re.compile(r"^-?\d+\.\d{8}$")
FUNDING_INTERVAL_MS = 8 * 3600 * 1000


@pytest.fixture
def fake() -> Iterator[FakeBinance]:
    with FakeBinance(rate=200, seed=7) as server:
        yield server


def open_ws(url: str) -> ClientConnection:
    return connect(url, open_timeout=5, close_timeout=2)


def recv_n(ws: ClientConnection, n: int, timeout: float = 5.0) -> list[str]:
    return [ws.recv(timeout=timeout, decode=True) for _ in range(n)]


def recv_for(ws: ClientConnection, seconds: float) -> list[tuple[float, str]]:
    """(arrival time, text) of every frame received during `seconds`."""
    frames: list[tuple[float, str]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            frames.append((time.monotonic(), ws.recv(timeout=left, decode=True)))
        except TimeoutError:
            break
    return frames


def recv_until(ws: ClientConnection, done: Callable[[list[str]], bool], timeout: float = 5.0) -> list[str]:
    frames: list[str] = []
    deadline = time.monotonic() + timeout
    while not done(frames):
        left = deadline - time.monotonic()
        assert left > 0, f"condition not met within {timeout} s after {len(frames)} frames"
        frames.append(ws.recv(timeout=left, decode=True))
    return frames


def request(ws: ClientConnection, body: Any) -> dict[str, Any]:
    """Sends a request and returns the first reply, skipping stream frames that arrive meanwhile."""
    ws.send(body if isinstance(body, str) else json.dumps(body))
    deadline = time.monotonic() + 5
    while True:
        message: dict[str, Any] = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        if "result" in message or "error" in message:
            return message


def drain_quiet(ws: ClientConnection, quiet: float = 0.25) -> None:
    """Reads until nothing arrived for `quiet` seconds (frames already in flight before a stall)."""
    while True:
        try:
            ws.recv(timeout=quiet)
        except TimeoutError:
            return


def data_of(text: str) -> tuple[str, dict[str, Any]]:
    frame = json.loads(text)
    return frame["stream"], frame["data"]


def check_book_ticker(data: dict[str, Any]) -> None:
    assert list(data) == ["e", "u", "E", "T", "s", "b", "B", "a", "A"]
    assert data["e"] == "bookTicker" and data["s"] == "BTCUSDT"
    assert all(type(data[k]) is int for k in ("u", "E", "T"))
    assert all(PRICE_2DP.match(data[k]) for k in ("b", "a")), data
    assert all(QTY_3DP.match(data[k]) for k in ("B", "A")), data
    assert float(data["b"]) < float(data["a"]) and data["T"] <= data["E"]


def check_agg_trade(data: dict[str, Any]) -> None:
    assert list(data) == ["e", "E", "a", "s", "p", "q", "f", "l", "T", "m"]
    assert data["e"] == "aggTrade" and data["s"] == "BTCUSDT"
    assert all(type(data[k]) is int for k in ("E", "a", "f", "l", "T"))
    assert PRICE_2DP.match(data["p"]) and QTY_3DP.match(data["q"]), data
    assert type(data["m"]) is bool and data["f"] <= data["l"] and data["T"] <= data["E"]


def check_mark_price(data: dict[str, Any], symbol: str) -> None:
    assert list(data) == ["e", "E", "s", "p", "i", "P", "r", "T"]
    assert data["e"] == "markPriceUpdate" and data["s"] == symbol
    assert all(MARK_8DP.match(data[k]) for k in ("p", "i", "P", "r")), data
    assert type(data["E"]) is int and type(data["T"]) is int
    # T is the next funding time (every 8 h), E falls on the whole second of the update.
    assert data["T"] % FUNDING_INTERVAL_MS == 0 and 0 < data["T"] - data["E"] <= FUNDING_INTERVAL_MS
    assert data["E"] % 1000 == 0


# ------------------------------------------------------------------------------------ framing and payloads


def test_combined_stream_payloads_have_binance_fields_and_types(fake: FakeBinance) -> None:
    streams = [*BTC, "btcusdt@markPrice@1s"]
    with open_ws(fake.combined_url(streams)) as ws:
        frames = recv_until(ws, lambda fs: any("markPrice" in f for f in fs) and len(fs) >= 20)
    seen: collections.Counter[str] = collections.Counter()
    for text in frames:
        frame = json.loads(text)
        assert list(frame) == ["stream", "data"]
        stream, data = frame["stream"], frame["data"]
        seen[stream] += 1
        checks: dict[str, Callable[[dict[str, Any]], None]] = {
            "btcusdt@bookTicker": check_book_ticker, "btcusdt@aggTrade": check_agg_trade,
            "btcusdt@markPrice@1s": lambda d: check_mark_price(d, "BTCUSDT")}
        checks[stream](data)
    assert set(seen) == set(streams)
    assert seen["btcusdt@bookTicker"] > seen["btcusdt@aggTrade"]  # the book moves more often than trades print


def test_mark_price_streams_follow_their_cadence(fake: FakeBinance) -> None:
    with open_ws(fake.combined_url(["ethusdt@markPrice", "ethusdt@markPrice@1s"])) as ws:
        frames = recv_for(ws, 3.3)
    by_stream: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for _, text in frames:
        stream, data = data_of(text)
        check_mark_price(data, "ETHUSDT")
        by_stream[stream].append(data)
    one_second = [d["E"] for d in by_stream["ethusdt@markPrice@1s"]]
    three_seconds = [d["E"] for d in by_stream["ethusdt@markPrice"]]
    assert len(one_second) >= 3 and all(b - a == 1000 for a, b in zip(one_second, one_second[1:], strict=False))
    assert 1 <= len(three_seconds) <= 2 and all(e % 3000 == 0 for e in three_seconds)


def test_raw_streams_send_bare_payloads(fake: FakeBinance) -> None:
    with open_ws(fake.raw_url(["btcusdt@bookTicker"])) as ws:
        check_book_ticker(json.loads(ws.recv(timeout=5)))
    with open_ws(fake.raw_url(BTC)) as ws:
        kinds = {json.loads(text)["e"] for text in recv_n(ws, 12)}
    assert kinds == {"bookTicker", "aggTrade"}


def test_unknown_paths_are_refused_with_404(fake: FakeBinance) -> None:
    with pytest.raises(InvalidStatus) as refused:
        open_ws(f"{fake.url}/api/v1/stream")
    assert refused.value.response.status_code == 404


def test_update_and_trade_ids_increase(fake: FakeBinance) -> None:
    with open_ws(fake.combined_url(BTC)) as ws:
        frames = [data_of(text) for text in recv_n(ws, 200)]
    updates = [d["u"] for s, d in frames if s == "btcusdt@bookTicker"]
    trades = [d for s, d in frames if s == "btcusdt@aggTrade"]
    assert all(a < b for a, b in zip(updates, updates[1:], strict=False))
    assert all(b["a"] == a["a"] + 1 and b["f"] == a["l"] + 1 for a, b in zip(trades, trades[1:], strict=False))


def test_same_seed_gives_the_same_market_and_another_seed_does_not() -> None:
    def first_events(seed: int) -> list[tuple[str, dict[str, Any]]]:
        with FakeBinance(rate=300, seed=seed) as server, open_ws(server.combined_url(
                [*BTC_ETH, "btcusdt@markPrice@1s"])) as ws:
            frames = [data_of(text) for text in recv_n(ws, 80)]
        # Times come from the clock and markPrice from its own cadence; everything else follows the seed.
        return [(s, {k: v for k, v in d.items() if k not in ("E", "T")}) for s, d in frames
                if "markPrice" not in s][:60]

    assert first_events(11) == first_events(11)
    assert first_events(11) != first_events(12)


# ------------------------------------------------------------------------------------------------ requests


def test_subscription_and_property_requests_get_binance_replies(fake: FakeBinance) -> None:
    with open_ws(fake.combined_url([])) as ws:
        assert request(ws, {"method": "SUBSCRIBE", "params": [*BTC, "btcusdt@depth"], "id": 1}) == \
            {"result": None, "id": 1}
        assert request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 2}) == \
            {"result": [*BTC, "btcusdt@depth"], "id": 2}
        assert request(ws, {"method": "UNSUBSCRIBE", "params": ["btcusdt@aggTrade"], "id": 3}) == \
            {"result": None, "id": 3}
        assert request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 4}) == \
            {"result": ["btcusdt@bookTicker", "btcusdt@depth"], "id": 4}
        streams = {data_of(text)[0] for text in recv_n(ws, 20)}
        assert streams == {"btcusdt@bookTicker"}  # depth is accepted but silent, as on Binance for unknown streams
        assert request(ws, {"method": "GET_PROPERTY", "params": ["combined"], "id": 5}) == {"result": True, "id": 5}
        assert request(ws, {"method": "SET_PROPERTY", "params": ["combined", False], "id": 6}) == \
            {"result": None, "id": 6}
        assert request(ws, {"method": "GET_PROPERTY", "params": ["combined"], "id": 7}) == {"result": False, "id": 7}
        check_book_ticker(json.loads(ws.recv(timeout=5)))  # raw framing from now on
    record = fake.wait_for(lambda r: not r.open_connections, what="connection closed")
    conn = record.connections[0]
    assert conn.subscriptions == ("btcusdt@bookTicker", "btcusdt@depth") and conn.combined is False
    assert [json.loads(r.text)["id"] for r in conn.requests] == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize(("body", "reply"), [
    ({"method": "SET_PROPERTY", "params": ["speed", True], "id": 8},
     {"error": {"code": 0, "msg": "Unknown property"}, "id": 8}),
    ({"method": "GET_PROPERTY", "params": ["speed"], "id": 9},
     {"error": {"code": 0, "msg": "Unknown property"}, "id": 9}),
    ({"method": "SET_PROPERTY", "params": ["combined", "yes"], "id": 10},
     {"error": {"code": 1, "msg": "Invalid value type: expected Boolean"}, "id": 10}),
    ({"method": "SET_PROPERTY", "params": ["combined", True, 1], "id": 11},
     {"error": {"code": 2, "msg": "Invalid request: too many parameters"}, "id": 11}),
    ({"method": "GET_PROPERTY", "params": [], "id": 12},
     {"error": {"code": 2, "msg": "Invalid request: property name must be a string"}, "id": 12}),
    ({"method": "GET_PROPERTY", "params": [5], "id": 13},
     {"error": {"code": 2, "msg": "Invalid request: property name must be a string"}, "id": 13}),
    ({"method": "SUBSCRIBE", "params": ["BTCUSDT bookTicker"], "id": 14},
     {"error": {"code": 2, "msg": "Invalid request: invalid stream"}, "id": 14}),
    ({"method": "SUBSCRIBE", "params": BTC, "id": "abc"},
     {"error": {"code": 2, "msg": "Invalid request: request ID must be an unsigned integer"}, "id": None}),
    ({"method": "LIST_SUBSCRIPTIONS", "id": -1},
     {"error": {"code": 2, "msg": "Invalid request: request ID must be an unsigned integer"}, "id": None}),
    ('{"method":"FOO","id":1}',
     {"error": {"code": 2, "msg": "Invalid request: unknown variant `FOO`, expected one of `SUBSCRIBE`, "
                "`UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`, `SET_PROPERTY`, `GET_PROPERTY` at line 1 column 15"},
      "id": None}),
    ('{"params":[],"id":1}',
     {"error": {"code": 2, "msg": "Invalid request: missing field `method` at line 1 column 20"}, "id": None}),
])
def test_bad_requests_get_binance_error_replies(fake: FakeBinance, body: Any, reply: dict[str, Any]) -> None:
    with open_ws(fake.combined_url(["btcusdt@bookTicker"])) as ws:
        assert request(ws, body) == reply
        assert request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 99})["id"] == 99  # the connection stays usable


def test_invalid_json_gets_code_3_and_a_disconnect(fake: FakeBinance) -> None:
    with open_ws(fake.combined_url(["btcusdt@bookTicker"])) as ws:
        assert request(ws, "not json") == {"error": {"code": 3, "msg": "Invalid JSON: expected value at line 1 column 1"}}
        with pytest.raises(ConnectionClosed) as closed:
            recv_n(ws, 1000)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


# -------------------------------------------------------------------------------------------- event times


def _times(frames: list[str]) -> list[tuple[str, int, int | None]]:
    out = []
    for text in frames:
        stream, data = data_of(text)
        out.append((stream, data["E"], None if "markPrice" in stream else data["T"]))
    return out


def test_realistic_times_are_ordered_per_stream_but_not_across_streams(fake: FakeBinance) -> None:
    fake.set_rate(2000)
    with open_ws(fake.combined_url([*BTC_ETH, "btcusdt@markPrice@1s"])) as ws:
        times = _times(recv_n(ws, 2400))
    last: dict[str, int] = {}
    inversions = 0
    for stream, event, trade in times:
        assert event >= last.get(stream, 0), f"{stream} went back in time"
        if event < max((e for s, e in last.items() if s != stream), default=0):
            inversions += 1  # arrived after a frame of another stream stamped later
        last[stream] = event
        assert trade is None or trade <= event
    shared = collections.Counter(event for _, event, _ in times)
    assert inversions > 0
    assert max(shared.values()) >= 2


def test_ideal_times_strictly_increase_across_everything() -> None:
    with FakeBinance(rate=2000, seed=7, ideal=True) as server, open_ws(server.combined_url(
            [*BTC_ETH, "btcusdt@markPrice@1s"])) as ws:
        times = _times(recv_n(ws, 2400))
    events = [event for _, event, _ in times]
    assert all(a < b for a, b in zip(events, events[1:], strict=False))
    assert all(trade == event for _, event, trade in times if trade is not None)
    assert any("markPrice" in stream for stream, _, _ in times)


# ---------------------------------------------------------------------------------------------- scheduling


def test_rate_is_honoured_and_can_change(fake: FakeBinance) -> None:
    fake.set_rate(400)
    with open_ws(fake.combined_url(BTC)) as ws:
        ws.recv(timeout=5)
        assert 450 <= len(recv_for(ws, 1.5)) <= 720
        fake.set_rate(100)
        drain_quiet(ws, quiet=0.005)
        assert 70 <= len(recv_for(ws, 1.0)) <= 130


# ------------------------------------------------------------------------------------------------- faults


def test_drop_closes_without_a_close_frame(fake: FakeBinance) -> None:
    with open_ws(fake.combined_url(BTC)) as ws:
        ws.recv(timeout=5)
        assert fake.drop_connections() == 1
        with pytest.raises(ConnectionClosed) as closed:
            recv_n(ws, 10_000)
    assert closed.value.rcvd is None  # no close frame reached the client
    conn = fake.wait_for(lambda r: not r.open_connections, what="dropped connection recorded").connections[0]
    assert conn.close_code == 1006 and conn.closed_by == "drop"


def test_close_sends_the_given_code_and_reason(fake: FakeBinance) -> None:
    with open_ws(fake.combined_url(BTC)) as ws:
        ws.recv(timeout=5)
        assert fake.close_connections(4000, "maintenance") == 1
        with pytest.raises(ConnectionClosed) as closed:
            recv_n(ws, 10_000)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "maintenance")
    conn = fake.wait_for(lambda r: not r.open_connections, what="closed connection recorded").connections[0]
    assert (conn.close_code, conn.closed_by) == (4000, "server")


def test_malformed_frames_reach_the_client(fake: FakeBinance) -> None:
    def is_json(text: str) -> bool:
        try:
            json.loads(text)
            return True
        except ValueError:
            return False

    with open_ws(fake.combined_url(BTC)) as ws:
        ws.recv(timeout=5)
        assert fake.send_malformed("non_json", count=2) == 2
        assert fake.send_malformed("no_envelope") == 1
        assert fake.send_malformed("wrong_types") == 1
        frames = recv_until(ws, lambda fs: sum(not is_json(f) for f in fs) == 2 and any(
            is_json(f) and "stream" not in json.loads(f) for f in fs) and any(
            is_json(f) and isinstance(json.loads(f).get("data", {}).get("E"), str) for f in fs))
    assert all(f.startswith('{"stream"') for f in frames if not is_json(f))
    record = fake.record()
    assert record.connections[0].malformed_sent == 4
    assert sum(f.stream.startswith("<malformed:") for f in record.last_frames) == 4


def test_duplicate_next_sends_frames_twice(fake: FakeBinance) -> None:
    with open_ws(fake.combined_url(BTC)) as ws:
        ws.recv(timeout=5)
        assert fake.duplicate_next(5) == 1
        frames = recv_n(ws, 60)
    assert sum(a == b for a, b in zip(frames, frames[1:], strict=False)) == 5
    assert fake.record().connections[0].duplicates_sent == 5


def test_burst_sends_many_events_at_once() -> None:
    with FakeBinance(rate=2, seed=3) as server, open_ws(server.combined_url(BTC)) as ws:
        ws.recv(timeout=5)
        assert server.burst(300) == 1
        started = time.monotonic()
        recv_n(ws, 300)
        assert time.monotonic() - started < 1.0
        assert server.record().frames_sent >= 301


def test_stall_stops_frames_then_they_come_again(fake: FakeBinance) -> None:
    with open_ws(fake.combined_url(BTC)) as ws:
        ws.recv(timeout=5)
        fake.stall(1.0)
        stalled_at = time.monotonic()
        drain_quiet(ws)
        ws.recv(timeout=3)
        assert time.monotonic() - stalled_at >= 0.9
        assert len(recv_for(ws, 0.3)) >= 30  # the rate resumes; what was due during the stall is not replayed
        assert len(recv_for(ws, 0.3)) <= 80

        fake.stall()  # until resumed; the socket stays open and requests are answered
        drain_quiet(ws)
        assert request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 1}) == {"result": BTC, "id": 1}
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.4)
        fake.resume()
        assert len(recv_n(ws, 10, timeout=2)) == 10


def test_refusing_connections_then_accepting_again(fake: FakeBinance) -> None:
    fake.refuse_connections()
    with pytest.raises(InvalidStatus) as refused:
        open_ws(fake.combined_url(BTC))
    assert refused.value.response.status_code == 503
    fake.accept_connections()
    with open_ws(fake.combined_url(BTC)) as ws:
        ws.recv(timeout=5)
    fake.refuse_connections(0.3, status=429)
    with pytest.raises(InvalidStatus):
        open_ws(fake.combined_url(BTC))
    deadline = time.monotonic() + 5
    while True:  # the refusal ends by itself
        try:
            with open_ws(fake.combined_url(BTC)):
                break
        except InvalidStatus:
            assert time.monotonic() < deadline, "refusal did not end"
            time.sleep(0.05)
    assert fake.record().refused >= 2


# ------------------------------------------------------------------------------------------------- record


def test_record_tracks_connections_frames_and_faults() -> None:
    with FakeBinance(rate=500, seed=5, keep_frames=25) as server:
        with open_ws(server.combined_url(BTC)) as ws:
            recv_n(ws, 200)
            ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["ethusdt@bookTicker"], "id": 1}))
            recv_until(ws, lambda fs: any("ethusdt" in f for f in fs))
        with open_ws(server.raw_url(["ethusdt@aggTrade"])) as ws:
            ws.recv(timeout=5)
            server.drop_connections()
        record = server.wait_for(lambda r: len(r.connections) == 2 and not r.open_connections,
                                 what="both connections closed")
    first, second = record.connections
    assert (first.path, first.combined, first.requested_streams) == ("/stream", True, tuple(BTC))
    assert first.subscriptions == (*BTC, "ethusdt@bookTicker")
    assert first.closed_by == "client" and first.close_code == 1000
    assert first.closed_at is not None and first.opened_at <= first.closed_at
    assert (second.path, second.combined, second.closed_by) == ("/ws/ethusdt@aggTrade", False, "drop")
    assert first.frames_sent >= 200 and sum(first.frames_by_stream.values()) == first.frames_sent
    assert record.frames_sent == first.frames_sent + second.frames_sent
    assert record.frames_by_stream["btcusdt@bookTicker"] == first.frames_by_stream["btcusdt@bookTicker"]
    assert len(record.last_frames) == 25  # bounded, however many frames went out
    assert first.delay.count > 0 and first.delay.max_ms >= first.delay.p99_ms >= first.delay.p50_ms
    assert [f.action for f in record.faults] == ["drop_connections"]


def test_server_pings_are_answered_by_the_client() -> None:
    with FakeBinance(rate=5, seed=1, ping_interval=0.1) as server, open_ws(server.combined_url(BTC)):
        record = server.wait_for(lambda r: r.connections and r.connections[0].ping_latency_ms > 0,
                                 timeout=5, what="a pong to a server ping")
    assert record.connections[0].ping_latency_ms < 1000


# ------------------------------------------------------------------------------------------------ misuse


def test_user_errors_say_what_to_do(fake: FakeBinance) -> None:
    with pytest.raises(ConfigError, match="rate"):
        FakeBinance(rate=-1)
    with pytest.raises(ConfigError, match="1000-1003"):
        fake.close_connections(1006)
    with pytest.raises(ConfigError, match="non_json"):
        fake.send_malformed("garbage")
    with pytest.raises(RuntimeError, match="start"):
        FakeBinance().record()
    assert parse_stream_name("btcusdt@markPrice@1s") == ("BTCUSDT", "markPrice@1s")
    assert parse_stream_name("BTCUSDT@bookTicker") is None


# -------------------------------------------------------------------------------------------- standalone


def test_main_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.fakes.binance", "--port", "0", "--rate", "50", "--seed", "3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None  # stdout=PIPE
        line = proc.stdout.readline()
        started = json.loads(line)
        assert started["status"] == "listening" and re.fullmatch(r"ws://127\.0\.0\.1:\d+", started["url"])
        assert started["port"] > 0
        with open_ws(f"{started['url']}/ws/btcusdt@bookTicker") as ws:
            check_book_ticker(json.loads(ws.recv(timeout=5)))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
