"""Hostile exchange: the live run against an exchange that sends junk, repeats itself, goes back in time,
drops, refuses and stalls.

Each test starts the target's live run (its live runner unit, or a background canary when it has none) with the
observer up, turns the fake exchange hostile in one way, and then checks what CONTRACT section 6 promises:
- the run keeps running: RUNNING in /observer/runs, its process alive, no crash in its journal;
- no event is counted twice and none is made up: the run's `emitted_event_count` (archive stats.json, after a
  stop through the observer) is exactly the number of distinct valid events the fake sent it, from the fake's
  record (frames per stream, less the repeats; malformed frames count nothing);
- an event older than the last of its stream ends a STRICT run as ERROR with an ordering message, and is counted
  once, like any other event, by a WARN run;
- the reconnect delays after repeated drops follow the declared policy (2 s, doubling with jitter). The 120 s
  pause after five reconnects within 60 s cannot be waited for here; the twin's node test
  `test/live-hostile.test.js` proves it over a real socket with the timings shrunk.

Frames in flight when a connection is cut may be lost between the fake and the run, so before a cut (and
before the final stop) the fake stalls and the run is given time to drain: the counts stay exact.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import psutil
import pytest

from canary.checks import ObserverClient, archive_keys, audit_entries
from canary.stops import find_run
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.fakes.binance import FakeBinance, Record, parse_stream_name
from harness.plugin import teardown_named
from quantlab_chaos.runbook import Runbook
from quantlab_chaos.waiting import eventually, wait_until

pytestmark = [pytest.mark.hostile, pytest.mark.timeout(120)]

RATE = 20.0  # bookTicker/aggTrade events a second: enough to see, little CPU
# The fake pings every second, so a stall of a few seconds outlasts several ping intervals (Binance: 3 minutes).
PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 20.0
STALL_S = 2.5
# Longer than the first reconnect wait (2 s, plus jitter and a late timer), shorter than the first two together.
REFUSE_S = 4.0
# CONTRACT section 6: a markPriceUpdate frame is two internal events (mark_price and funding); the others one.
EVENTS_PER_FRAME = {"bookTicker": 1, "aggTrade": 1, "markPrice": 2, "markPrice@1s": 2}
# Reconnect policy (CONTRACT section 6): 2 s, doubling, with jitter. The band allows jitter either way and the
# time a reconnect takes through the proxy; a policy without backoff, or without doubling, falls outside it.
BACKOFF_BASE_S = 2.0
BACKOFF_BAND = (0.8, 1.5)
RECONNECT_OVERHEAD_S = 0.75
QUIET_S = 1.0  # no new event in the observer for this long: the run has drained what was sent
ARCHIVE_DEADLINE_S = 20.0
ERROR_DEADLINE_S = 10.0
# What a crashed or failing Node process leaves in its journal: the run's own error line, or output that is not a
# JSON log line and names an error (an uncaught exception's message and stack, V8's fatal errors).
CRASH_MARKS = re.compile(r'"live_run_error"|Uncaught|Unhandled|FATAL ERROR|heap out of memory|'
                         r'std(?:out|err): (?!\{)(.*\b\w*Error\b|\s+at \S.*:\d+:\d+\)?$)')
# A message about event order (not the run's ordering_mode setting, which start lines carry).
ORDERING = re.compile(r"order(?!ing_mode)", re.IGNORECASE)


@pytest.fixture()
@teardown_named("stop the fake exchange")
def fake_binance(request: pytest.FixtureRequest) -> Iterator[FakeBinance]:
    """This module's exchange: a slow feed with a ping every second (overrides the plugin's fixture)."""
    with FakeBinance(rate=RATE, seed=request.node.nodeid, ping_interval=PING_INTERVAL_S,
                     ping_timeout=PING_TIMEOUT_S) as server:
        yield server


# -- the run under attack ------------------------------------------------------------------------------------


@dataclass
class Watched:
    """A live run, its observer view, its process and journal, and the fake exchange feeding it."""

    env: QuantLabEnvironment
    live: kit.LiveRun
    client: ObserverClient
    pid: int | None = None  # the live runner's main PID when the run started: a restart is not "kept running"

    def __post_init__(self) -> None:
        if self.live.process is None:
            self.pid = self.env.status(kit.LIVE_ROLE).main_pid

    @property
    def fake(self) -> FakeBinance:
        return self.env.exchange

    def view(self) -> dict[str, Any]:
        return find_run(self.client, self.live.run_id) or {}

    def journal(self) -> list[str]:
        if self.live.via == "unit":
            return self.env.logs(kit.LIVE_ROLE)
        log = self.env.workdir / "background-canary.log"
        return log.read_text(errors="replace").splitlines() if log.exists() else []

    def alive(self) -> bool:
        if self.live.process is not None:
            return self.live.process.poll() is None
        status = self.env.status(kit.LIVE_ROLE)
        return status.active and status.main_pid == self.pid and self.pid is not None and psutil.pid_exists(self.pid)

    def assert_running(self, after: str) -> None:
        """The run is RUNNING in the observer, its process lives, and its journal shows no crash."""
        view = self.view()
        crashes = [line for line in self.journal() if CRASH_MARKS.search(line)]
        assert view.get("status") == "RUNNING" and self.alive() and not crashes, (
            f"after {after} the live run {self.live.run_id} ({self.live.via}) should keep running: observer says "
            f"{view.get('status')} (stop reason {view.get('stop_reason')}), process alive: {self.alive()}, "
            f"crash lines: {crashes[-5:]}")

    def wait_frames(self, more: int, what: str, timeout: float = 10.0) -> Record:
        """Waits until the fake has sent `more` stream frames beyond what it has sent now."""
        start = self.fake.record().frames_sent
        return self.fake.wait_for(lambda r: r.frames_sent >= start + more, timeout=timeout, what=what)

    def drain(self) -> Record:
        """Stalls the exchange and waits until the run has handled everything sent; returns the fake's record."""
        self.fake.stall()
        seen: list[Any] = [object(), time.monotonic()]

        def quiet() -> bool:
            view = self.view()
            if not view:  # no answer this time (e.g. rate limited): no news either way
                return False
            if view.get("last_event_ts") != seen[0]:
                seen[:] = [view.get("last_event_ts"), time.monotonic()]
            return bool(time.monotonic() - seen[1] >= QUIET_S)

        # A slow poll: the observer allows 120 requests a minute per path.
        wait_until(quiet, timeout=15.0, interval=0.3, what=f"the live run going quiet for {QUIET_S} s")
        return self.fake.record()

    def stop_and_stats(self) -> dict[str, Any]:
        """Stops the run through the observer and returns its archived stats.json."""
        answer = self.env.observer("POST", f"/observer/runs/{self.live.run_id}/stop")
        assert answer.status_code == 200, f"the observer refused to stop the run: {answer.status_code} {answer.text}"
        return self.stats()

    def stats(self) -> dict[str, Any]:
        key = next(k for k in archive_keys(self.live.run_id) if k.endswith("stats.json"))
        wait_until(lambda: self.env.bucket.head(key), timeout=ARCHIVE_DEADLINE_S, interval=0.2,
                   what=f"the archived {key}")
        stats = self.env.bucket.read_json(key)
        assert isinstance(stats, dict) and isinstance(stats.get("emitted_event_count"), int), (
            f"{key} has no emitted_event_count: {stats}")
        return stats


def expected_events(record: Record) -> int:
    """Internal events a run should have counted from everything the fake sent: each distinct valid frame once."""
    total = 0
    for name, frames in record.distinct_frames_by_stream.items():
        parsed = parse_stream_name(name)
        assert parsed is not None and parsed[1] in EVENTS_PER_FRAME, f"the fake sent an unexpected stream {name}"
        total += EVENTS_PER_FRAME[parsed[1]] * frames
    return total


def assert_counted_once(stats: dict[str, Any], record: Record, hostility: str) -> None:
    expected = expected_events(record)
    assert stats["emitted_event_count"] == expected, (
        f"after {hostility} the run counted {stats['emitted_event_count']} events, but the exchange sent {expected} "
        f"distinct valid ones (frames per stream {record.frames_by_stream}, repeats {record.duplicates_by_stream}, "
        f"malformed {record.malformed_sent}, out of order {record.out_of_order_sent})")


@contextmanager
def watched(env: QuantLabEnvironment, runbook: Runbook) -> Iterator[Watched]:
    """The observer and a live run with events flowing (the target's live runner, or a background canary)."""
    env.start("observer")
    with kit.live_run(env, runbook, seconds=90) as live:
        yield Watched(env, live, kit.observer_client(env))


@contextmanager
def warn_canary(env: QuantLabEnvironment, runbook: Runbook) -> Iterator[Watched]:
    """A background canary with `--ordering-mode WARN` (the live runner unit runs the default, STRICT), started
    and stopped by the kit like its own background canary."""
    if runbook.canary is None:
        pytest.skip(f"the runbook {runbook.path} has no canary command to run with --ordering-mode WARN")
    argv = list(runbook.canary.argv)
    if "--ordering-mode" in argv[:-1]:
        argv[argv.index("--ordering-mode") + 1] = "WARN"
    else:
        argv += ["--ordering-mode", "WARN"]
    warn = replace(runbook, canary=replace(runbook.canary, argv=tuple(argv)))
    env.start("observer")
    client = kit.observer_client(env)
    before = kit.running_ids(client)
    process = kit._spawn_canary(env, warn, 90, "steady")
    try:
        new = wait_until(lambda: kit.running_ids(client) - before, timeout=20, interval=0.1,
                         what="the WARN canary's run RUNNING in /observer/runs")
        run_id = sorted(new)[0]
        wait_until(lambda: (find_run(client, run_id) or {}).get("last_event_ts"), timeout=20, interval=0.2,
                   what="events reaching the WARN canary's run")
        yield Watched(env, kit.LiveRun(run_id, "canary", process), client)
    finally:
        kit.stop_group(process)


# -- frames the run must ignore or count once -----------------------------------------------------------------


def _malformed(kind: str, count: int) -> Callable[[FakeBinance], int]:
    return lambda fake: fake.send_malformed(kind, count=count)


FRAME_HOSTILITIES: dict[str, tuple[str, Callable[[FakeBinance], Any]]] = {
    "non_json": ("frames cut short (not JSON)", _malformed("non_json", 5)),
    "no_envelope": ("JSON without stream/data", _malformed("no_envelope", 5)),
    "wrong_types": ("payloads with wrong types (prices as numbers, times as strings)", _malformed("wrong_types", 5)),
    "huge": ("a multi-megabyte frame", _malformed("huge", 1)),
    "duplicate_next": ("each of the next frames sent twice in a row", lambda fake: fake.duplicate_next(12)),
    "resend_recent": ("frames already sent, sent again later (same ids, older times)",
                      lambda fake: fake.resend_recent(15)),
}


@pytest.mark.parametrize("kind", list(FRAME_HOSTILITIES))
def test_junk_and_repeated_frames_are_not_counted(kind: str, quantlab: QuantLabEnvironment,
                                                  runbook_model: Runbook) -> None:
    what, inject = FRAME_HOSTILITIES[kind]
    with watched(quantlab, runbook_model) as run:
        inject(run.fake)
        # Frames sent after the hostile ones reach the run after them: once they are handled, so were those.
        run.wait_frames(10, f"ten stream frames after {what}")
        record = run.drain()
        run.assert_running(what)
        sent = record.malformed_sent + sum(record.duplicates_by_stream.values())
        assert sent > 0, f"the fake sent none of: {what}"
        assert_counted_once(run.stop_and_stats(), record, what)


# -- events out of order ----------------------------------------------------------------------------------------


def test_strict_run_ends_as_error_on_an_out_of_order_event(quantlab: QuantLabEnvironment,
                                                           runbook_model: Runbook) -> None:
    """The live runner (or the canary) runs STRICT, the default: an event older than its stream's last fails the run."""
    with watched(quantlab, runbook_model) as run:
        before = run.drain()
        assert run.fake.send_out_of_order(count=1, age_ms=1500) == 1
        views: list[dict[str, Any]] = []
        def ended() -> bool:
            views.append(run.view())
            return views[-1].get("status") not in (None, "RUNNING")

        eventually(ended, timeout=ERROR_DEADLINE_S, interval=0.25)
        view = views[-1]
        assert (view.get("status"), view.get("stop_reason")) == ("ERROR", "ERROR"), (
            f"an out-of-order event should end a STRICT run as ERROR within {ERROR_DEADLINE_S:.0f} s; the observer "
            f"says {view.get('status')} (stop reason {view.get('stop_reason')})")
        stats = run.stats()
        said = [line for line in run.journal() if ORDERING.search(line)] + [
            str(e.get("metadata")) for e in audit_entries(quantlab.audit_dir, run.live.run_id)
            if e.get("action") == "RUN_STOP" and ORDERING.search(str(e.get("metadata")))]
        assert said, "the run ended as ERROR but neither its journal nor its RUN_STOP audit entry says why (ordering)"
        # Everything before the late event was counted once; the late event itself was not.
        assert_counted_once(stats, before, "an out-of-order event in STRICT mode")


def test_warn_run_keeps_running_and_counts_an_out_of_order_event_once(quantlab: QuantLabEnvironment,
                                                                      runbook_model: Runbook) -> None:
    what = "events older than the last of their stream (--ordering-mode WARN)"
    with warn_canary(quantlab, runbook_model) as run:
        run.fake.send_out_of_order(count=3, age_ms=1500)
        run.fake.duplicate_next(4)
        run.wait_frames(10, f"ten stream frames after {what}")
        record = run.drain()
        assert record.out_of_order_sent == 3
        run.assert_running(what)
        assert any(ORDERING.search(line) for line in run.journal()), "WARN mode should log the out-of-order events"
        assert_counted_once(run.stop_and_stats(), record, what)


# -- connections: cut, closed, stalled, refused --------------------------------------------------------------------


def _drop(run: Watched) -> None:
    run.drain()  # nothing in flight to lose with the connection
    run.fake.drop_connections()
    run.fake.resume()


def _close(run: Watched) -> None:
    # A close frame comes after every frame sent before it: no need to drain first.
    run.fake.close_connections(4001, "hostile close")


def _stall(run: Watched) -> None:
    ends = time.monotonic() + STALL_S
    run.fake.stall(STALL_S)
    sent = run.fake.record().frames_sent
    run.fake.wait_for(lambda r: time.monotonic() >= ends and r.frames_sent > sent, timeout=STALL_S + 10,
                      what="frames after the stall")
    run.assert_running(f"{STALL_S} s without a frame")


def _refuse(run: Watched) -> None:
    run.drain()
    run.fake.refuse_connections(seconds=REFUSE_S)
    run.fake.drop_connections()
    run.fake.resume()
    run.fake.wait_for(lambda r: r.refused >= 1, timeout=10, what="a refused reconnect")
    run.assert_running("a refused reconnect")


CONNECTION_HOSTILITIES: dict[str, tuple[str, Callable[[Watched], None], int]] = {
    # name: (what, inject, connections expected at the end)
    "drop": ("an abrupt close without a close frame", _drop, 2),
    "close_code": ("a close frame with code 4001", _close, 2),
    "stall": (f"a socket silent for {STALL_S} s ({STALL_S / PING_INTERVAL_S:.1f} ping intervals)", _stall, 1),
    "refused": (f"reconnects refused with HTTP 503 for {REFUSE_S:.0f} s", _refuse, 2),
}


@pytest.mark.parametrize("kind", list(CONNECTION_HOSTILITIES))
def test_connection_hostility_keeps_the_run_and_its_count(kind: str, quantlab: QuantLabEnvironment,
                                                          runbook_model: Runbook) -> None:
    what, inject, connections = CONNECTION_HOSTILITIES[kind]
    with watched(quantlab, runbook_model) as run:
        first = run.fake.record().connections[-1].id
        inject(run)
        # Events flow again: on a new connection after a cut, on the same one after a stall.
        record = run.fake.wait_for(
            lambda r: len(r.connections) >= connections and (c := r.connections[-1]).is_open and c.frames_sent >= 10,
            timeout=20, what=f"events flowing again after {what}")
        assert record.connections[-1].id >= first + connections - 1
        record = run.drain()
        run.assert_running(what)
        if kind == "stall":
            assert record.connections[-1].ping_latency_ms > 0, "the client should answer the exchange's pings"
        assert_counted_once(run.stop_and_stats(), record, what)


def _more_connections(before: int, record: Record) -> bool:
    return len(record.connections) > before


def test_reconnect_backoff_follows_the_contract(quantlab: QuantLabEnvironment, runbook_model: Runbook) -> None:
    """Two drops of connections that deliver nothing: the waits before the reconnects are ~2 s, then ~4 s."""
    with watched(quantlab, runbook_model) as run:
        run.drain()  # a stalled exchange: new connections get no data, so the backoff keeps doubling
        delays = []
        for n in range(2):
            connected = len(run.fake.record().connections)
            run.fake.drop_connections()
            dropped_at = run.fake.record().faults[-1].at
            record = run.fake.wait_for(partial(_more_connections, connected), timeout=15,
                                       what=f"reconnect {n + 1} after a drop")
            delays.append(record.connections[-1].opened_at - dropped_at)
        for n, delay in enumerate(delays):
            nominal = BACKOFF_BASE_S * 2**n
            low, high = nominal * BACKOFF_BAND[0], nominal * BACKOFF_BAND[1] + RECONNECT_OVERHEAD_S
            assert low <= delay <= high, (
                f"reconnect {n + 1} came {delay:.2f} s after the drop; the contract's {nominal:.0f} s with jitter "
                f"allows {low:.1f}-{high:.1f} s (all delays: {[round(d, 2) for d in delays]})")
        # Counting across reconnects is the connection tests' part; here the run only has to survive.
        run.assert_running("two drops in a row")
