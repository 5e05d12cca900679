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

The modules: `records` (the snapshot types), `market` (stream names and price walks), `protocol` (requests, replies
and Binance's error words), `connection` (one client's scheduler and frames), `server` (`FakeBinance` and its
controls) and `standalone` (the command line, also run by `python -m harness.fakes.binance`).
"""
from __future__ import annotations

from harness.fakes.binance.connection import HUGE_FRAME_BYTES, MALFORMED_KINDS
from harness.fakes.binance.market import (
    AGG_TRADE,
    BOOK_TICKER,
    MARK_PRICE,
    MARK_PRICE_1S,
    parse_stream_name,
    streams_for,
)
from harness.fakes.binance.records import ConnectionRecord, DelayStats, FaultEvent, Record, RequestLog, SentFrame
from harness.fakes.binance.server import FakeBinance
from harness.fakes.binance.standalone import main

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
