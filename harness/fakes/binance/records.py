"""What the fake Binance server did, as immutable snapshots for assertions, and the delay statistics behind them.

The record types are frozen so a test can keep a `Record` while the server goes on; `Delays` is the mutable,
bounded accumulator that the loop side updates and `DelayStats` its snapshot.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConnectionRecord", "DelayStats", "Delays", "FaultEvent", "Record", "RequestLog", "SentFrame"]

_DELAY_SAMPLES = 10_000


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


class Delays:
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
