"""The fake Binance server's hostile faults (huge frames, resent frames, out-of-order events) and the record's
count of distinct valid events, driven by a real websockets client on 127.0.0.1."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from harness.fakes.binance import HUGE_FRAME_BYTES, MALFORMED_KINDS, DelayStats, FakeBinance, Record, streams_for
from quantlab_chaos.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

BTC = streams_for(["BTCUSDT"], ("bookTicker", "aggTrade"))


@pytest.fixture
def fake() -> Iterator[FakeBinance]:
    with FakeBinance(rate=100, seed=11) as server:
        yield server


def open_ws(url: str) -> ClientConnection:
    # The default 1 MiB limit would refuse the huge frame; a consumer decides its own limit.
    return connect(url, open_timeout=5, close_timeout=2, max_size=2 * HUGE_FRAME_BYTES)


def receive_all(ws: ClientConnection, fake: FakeBinance, quiet: float = 0.5) -> list[str]:
    """Stalls the fake and returns every frame received until `quiet` seconds pass without one."""
    fake.stall()
    frames: list[str] = []
    while True:
        try:
            frames.append(ws.recv(timeout=quiet, decode=True))
        except TimeoutError:
            return frames


def payload(text: str) -> dict[str, Any] | None:
    try:
        frame = json.loads(text)
    except ValueError:
        return None
    data = frame.get("data") if isinstance(frame, dict) else None
    return data if isinstance(data, dict) else None


def exchange_id(text: str) -> tuple[str, Any] | None:
    """(stream, id) of a valid frame: aggTrade `a`, bookTicker `u`; None for malformed ones."""
    frame = json.loads(text)
    data = frame["data"]
    key = {"aggTrade": "a", "bookTicker": "u"}.get(data.get("e"))
    if key is None or not isinstance(data.get(key), int) or not isinstance(data.get("b", data.get("p")), str):
        return None
    return frame["stream"], data[key]


def test_huge_frame_is_several_megabytes_of_valid_json_without_an_event(fake: FakeBinance) -> None:
    assert "huge" in MALFORMED_KINDS
    with open_ws(fake.combined_url(BTC)) as ws:
        frames = [ws.recv(timeout=5, decode=True)]
        assert fake.send_malformed("huge") == 1
        frames += receive_all(ws, fake)
    huge = [f for f in frames if len(f) > 1_000_000]
    assert len(huge) == 1
    assert HUGE_FRAME_BYTES * 0.99 <= len(huge[0]) <= HUGE_FRAME_BYTES
    data = payload(huge[0])
    assert data is not None and set(data) == {"e", "s", "E", "pad"}, "an envelope with padding, no prices or ids"
    record = fake.record()
    assert record.malformed_sent == 1 and record.connections[0].malformed_sent == 1
    assert sum(record.frames_by_stream.values()) == len(frames) - 1, "a malformed frame is not a stream frame"


def test_resend_recent_sends_earlier_frames_again_and_counts_them_as_duplicates(fake: FakeBinance) -> None:
    with open_ws(fake.combined_url(BTC)) as ws:
        frames = [ws.recv(timeout=5, decode=True) for _ in range(20)]
        assert fake.resend_recent(5) == 5
        frames += receive_all(ws, fake)
    record = fake.record()
    ids = [exchange_id(f) for f in frames]
    seen: set[Any] = set()
    repeats = 0
    for key in ids:
        repeats += key in seen
        seen.add(key)
    assert repeats == 5
    assert record.connections[0].duplicates_sent == 5
    assert sum(record.duplicates_by_stream.values()) == 5
    sent = sum(record.frames_by_stream.values())
    assert sum(record.distinct_frames_by_stream.values()) == sent - 5
    with pytest.raises(ConfigError):
        fake.resend_recent(0)


def test_duplicate_next_is_counted_per_stream(fake: FakeBinance) -> None:
    with open_ws(fake.combined_url(BTC)) as ws:
        frames = [ws.recv(timeout=5, decode=True)]
        fake.duplicate_next(6)
        fake.wait_for(lambda r: r.connections[0].duplicates_sent == 6, timeout=5, what="six duplicates")
        frames += receive_all(ws, fake)
    record = fake.record()
    by_stream: dict[str, int] = {}
    for a, b in zip(frames, frames[1:], strict=False):
        if a == b:
            name = json.loads(a)["stream"]
            by_stream[name] = by_stream.get(name, 0) + 1
    assert record.duplicates_by_stream == by_stream
    assert record.connections[0].duplicates_by_stream == by_stream


def test_out_of_order_events_are_new_and_older_than_their_stream(fake: FakeBinance) -> None:
    stream = BTC[1]  # btcusdt@aggTrade
    with open_ws(fake.combined_url(BTC)) as ws:
        frames = [ws.recv(timeout=5, decode=True) for _ in range(20)]
        assert fake.send_out_of_order(count=2, age_ms=500, stream=stream) == 2
        frames += receive_all(ws, fake)
    trades = [json.loads(f)["data"] for f in frames if json.loads(f)["stream"] == stream]
    # Each injected event is older than the newest event of its stream before it, and has a fresh id.
    late = [(i, t) for i, t in enumerate(trades) if t["T"] < max([x["T"] for x in trades[:i]] or [0])]
    assert len(late) == 2
    assert all(t["E"] == t["T"] for _, t in late)
    ids = [t["a"] for t in trades]
    assert len(ids) == len(set(ids)), "out-of-order events are new events, not repeats"
    record = fake.record()
    assert record.out_of_order_sent == 2 and record.connections[0].out_of_order_sent == 2
    assert record.duplicates_by_stream == {}
    assert record.distinct_frames_by_stream == record.frames_by_stream


def test_out_of_order_defaults_to_the_first_realtime_stream_and_checks_arguments(fake: FakeBinance) -> None:
    with open_ws(fake.combined_url(BTC)) as ws:
        frames = [ws.recv(timeout=5, decode=True)]
        assert fake.send_out_of_order() == 1
        frames += receive_all(ws, fake)
    assert any(json.loads(f)["stream"] == BTC[0] for f in frames)
    for bad in ({"count": 0}, {"age_ms": 0}, {"age_ms": 1.5}, {"stream": "not a stream"}):
        with pytest.raises(ConfigError):
            fake.send_out_of_order(**bad)


def test_record_defaults_keep_older_constructions_valid() -> None:
    record = Record(connections=(), refused=0, frames_sent=3, frames_by_stream={"a": 3}, last_frames=(),
                    delay=DelayStats(), faults=())
    assert record.distinct_frames_by_stream == {"a": 3}
    assert record.malformed_sent == 0 and record.out_of_order_sent == 0
