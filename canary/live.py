"""The runbook's Canary Validation against a running QuantLab: one canary run of our own, judged strictly.

QuantLab's canary tool passes when its run was archived and audited. Ours also wants events from every
requested symbol, a stop reason a canary should end with, and a fresh last event, because a canary that
passes on a silent feed is worse than none. The run is ours alone: on the deadline we stop that run (through
the observer's stop route when our command has told us its id, else by ending our own process group) and
nothing else.
"""
from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from canary.checks import (
    CanaryOutcome,
    CheckResult,
    Fixes,
    ObserverClient,
    TargetUnreachable,
    archive_keys,
    canary_argv,
    check_archive,
    check_audit,
    check_canary_line,
    check_canary_run,
    run_canary,
)
from canary.config import CanaryConfig
from canary.runner import Deadline, LocalRunner, S3ArchiveProbe
from canary.stops import find_run

RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
STOP_REQUEST_TIMEOUT_S = 3.0


class RunIdWatcher:
    """Learns our run's id from the first JSON line of our own command that names a `live_run_id`."""

    def __init__(self) -> None:
        self.run_id: str | None = None

    def feed(self, line: str) -> None:
        if self.run_id is not None or not line.lstrip().startswith("{"):
            return
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            return
        run_id = value.get("live_run_id") if isinstance(value, dict) else None
        # The id goes into a URL path: only ids that are plainly ids are trusted.
        if isinstance(run_id, str) and RUN_ID.match(run_id):
            self.run_id = run_id


class OwnRunStopper:
    """Called on the deadline: stops our run, and only ours, and remembers how."""

    def __init__(self, client: ObserverClient, watcher: RunIdWatcher, deadline: Deadline) -> None:
        self._client = client
        self._watcher = watcher
        self._deadline = deadline
        self.how: str | None = None

    def __call__(self, process: subprocess.Popen[str]) -> None:
        run_id = self._watcher.run_id
        if run_id is None:
            self.how = "its run id was not known yet, so the canary's own process group was ended"
            return
        status = self._request_stop(run_id)
        if status != 200:
            self.how = f"the observer answered {status} to the stop of run {run_id}, so the canary's own process group was ended"
            return
        try:
            process.wait(timeout=self._deadline.bound(10.0, floor=0.5))
            self.how = f"its own run {run_id} was stopped through the observer's stop route"
        except subprocess.TimeoutExpired:
            self.how = f"run {run_id} was asked to stop through the observer, then the canary's own process group was ended"

    def _request_stop(self, run_id: str) -> int | str:
        self._client.timeout = self._deadline.bound(STOP_REQUEST_TIMEOUT_S, floor=0.5)
        try:
            return self._client.request("POST", f"/observer/runs/{run_id}/stop").status_code
        except TargetUnreachable:
            return "nothing"


def run_record(client: ObserverClient, run_id: str) -> Mapping[str, Any] | None:
    """Our run as /observer/runs lists it (for its last_event_ts), or None when the observer cannot say."""
    try:
        return find_run(client, run_id)
    except TargetUnreachable:
        return None


def live_canary(config: CanaryConfig, runner: LocalRunner, client: ObserverClient, probe: S3ArchiveProbe,
                base_argv: Sequence[str], deadline: Deadline, fixes: Fixes | None = None, *,
                stop_client: ObserverClient | None = None, reserve_s: float | None = None) -> list[CheckResult]:
    """Runs the canary command once and returns canary_pass, then (when the run is known) archive, canary_run and audit.

    `stop_client` sends the deadline's stop request (give it few retries); by default `client` does."""
    live = config.live
    argv = canary_argv(base_argv, live.strategy, live.symbols, live.duration_s)
    watcher = RunIdWatcher()
    stopper = OwnRunStopper(stop_client or client, watcher, deadline)
    # Time is kept back for stopping the run and for the archive and audit checks that follow it.
    reserve = reserve_s if reserve_s is not None else min(20.0, max(3.0, 0.25 * deadline.seconds))
    budget = max(1.0, min(live.command_timeout_s, deadline.remaining() - reserve))

    def watched(command: Sequence[str], env: Mapping[str, str] | None, timeout: float) -> Any:
        return runner.run_watched(command, env, timeout, on_stdout_line=watcher.feed, on_deadline=stopper)

    outcome = run_canary(watched, argv, budget)
    line_result = check_canary_line(outcome, fixes)
    if outcome.result.timed_out:
        _explain_deadline(line_result, budget, live.duration_s, stopper.how)
    results = [line_result]
    run_id = outcome.run_id or watcher.run_id
    if run_id is None:
        return results
    results.append(check_archive(probe, run_id, fixes))
    if outcome.status == "PASS" and not outcome.result.timed_out:  # a canary we stopped has its verdict already
        results.append(_strict_verdict(config, client, probe, outcome, run_id, fixes))
    results.append(check_audit(config.spool_dir, run_id, fixes=fixes))
    return results


def _explain_deadline(result: CheckResult, budget: float, duration_s: int, how: str | None) -> None:
    """Says how our run was stopped, and when the deadline left no room for the run itself, says that instead
    of blaming S3."""
    how = how or "the canary's own process group was ended"
    result.message = f"{result.message} after {budget:.0f} s ({how})"
    result.evidence["stopped"] = how
    if budget < duration_s + 5:
        result.fix = (f"the deadline left {budget:.0f} s for a {duration_s} s canary run: raise --timeout (or [run] "
                      "timeout_s) or lower [live] duration_s")
        result.runbook_item = None


def _strict_verdict(config: CanaryConfig, client: ObserverClient, probe: S3ArchiveProbe, outcome: CanaryOutcome,
                    run_id: str, fixes: Fixes | None) -> CheckResult:
    decisions = probe.read_json_lines(archive_keys(run_id)[1])
    return check_canary_run(outcome, config.live.symbols, decisions, run_record(client, run_id),
                            expected_stop_reasons=config.live.expected_stop_reasons,
                            max_last_event_age_ms=config.live.max_last_event_age_ms, fixes=fixes)

