"""What every benchmark part shares: goals with verdicts, a part's result, printing, and peak-memory sampling.

A part measures, compares with its goals as ratios taken in the same run (the machine is shared and noisy, so a
lone absolute time says little), prints one line per number, and returns a `PartResult` for bench.json.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psutil

MB = 1024 * 1024


@dataclass
class Goal:
    """One goal of the issue: `measured` must be at least (`kind="min"`) or at most (`kind="max"`) `limit`."""

    id: str
    what: str
    measured: float | None
    limit: float
    unit: str
    kind: Literal["min", "max"]
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """measured / limit: at least 1 passes a "min" goal, at most 1 passes a "max" goal."""
        if self.measured is None or not math.isfinite(self.measured):
            return None
        return self.measured / self.limit

    @property
    def verdict(self) -> str:
        ratio = self.ratio
        if ratio is None:
            return "n/a"
        return "pass" if (ratio >= 1.0 if self.kind == "min" else ratio <= 1.0) else "miss"

    def line(self) -> str:
        bound = "floor" if self.kind == "min" else "limit"
        ratio = self.ratio
        if ratio is None:
            return f"{self.what}: not measured ({self.note or 'see the part above'})"
        return (f"{self.what}: {with_unit(self.measured, self.unit)} ({ratio:.2f}x the {with_unit(self.limit, self.unit)} "
                f"{bound}) {self.verdict.upper()}")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "what": self.what, "measured": _round(self.measured), "unit": self.unit,
                "goal": f"{'>=' if self.kind == 'min' else '<='} {with_unit(self.limit, self.unit)}", "limit": self.limit,
                "kind": self.kind, "ratio": _round(self.ratio, 3), "verdict": self.verdict, "note": self.note}


@dataclass
class PartResult:
    """What one part measured: raw numbers, ratios between them, and goal verdicts."""

    name: str
    status: Literal["ok", "skipped", "error"] = "ok"
    reason: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, float | None] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "duration_s": round(self.duration_s, 2),
                "raw": _rounded(self.raw), "ratios": {k: _round(v, 3) for k, v in self.ratios.items()},
                "goals": [goal.to_dict() for goal in self.goals], "notes": self.notes}


def fmt(value: float | None) -> str:
    """Numbers as people read them: 24,300 / 1.22 / 0.0031."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.1 or magnitude == 0:
        return f"{value:.2f}"
    return f"{value:.3g}"


def with_unit(value: float | None, unit: str) -> str:
    """`1.80x` for ratios, `24,300 frames/s` otherwise."""
    return f"{fmt(value)}x" if unit == "x" else f"{fmt(value)} {unit}".rstrip()


def say(line: str) -> None:
    print(f"  {line}", flush=True)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def median(values: Iterable[float]) -> float | None:
    seen = [v for v in values if v is not None]
    return statistics.median(seen) if seen else None


def percentile(values: Sequence[float], share: float) -> float | None:
    """The nearest-rank percentile (share in 0..1) of `values`."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def machine() -> dict[str, Any]:
    """What the numbers were measured on: they only compare within one run on one machine."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    return {"cpus": os.cpu_count(), "load_avg_1m": round(load[0], 2) if load[0] is not None else None,
            "python": sys.version.split()[0], "platform": sys.platform,
            "memory_total_mb": round(psutil.virtual_memory().total / MB)}


class TreeMemory:
    """Samples the RSS of a process and of all its descendants until stopped; keeps the peaks.

    RSS of a tree is summed per sample, so two processes that peak at different moments are not added up.
    """

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_root = 0
        self.peak_tree = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            root_rss = root.memory_info().rss
            children = root.children(recursive=True)
        except psutil.Error:
            return
        tree = root_rss
        for child in children:
            try:
                tree += child.memory_info().rss
            except psutil.Error:
                continue  # ended between listing and reading
        self.samples += 1
        self.peak_root = max(self.peak_root, root_rss)
        self.peak_tree = max(self.peak_tree, tree)
        self.peak_processes = max(self.peak_processes, 1 + len(children))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def thread_cpu_s(native_id: int | None) -> float | None:
    """CPU seconds (user + system) used so far by one thread of this process, by its native id."""
    if native_id is None:
        return None
    for thread in psutil.Process().threads():
        if thread.id == native_id:
            return float(thread.user_time + thread.system_time)
    return None


def native_thread_id(name: str) -> int | None:
    """The native id of this process's thread called `name` (e.g. the fake exchange's loop thread)."""
    return next((t.native_id for t in threading.enumerate() if t.name == name and t.native_id is not None), None)


def _round(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return _round(value)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value
