"""Canary Validation: the runbook's canary command as written, and every "Expected" bullet under it.

Each expected bullet is mapped to the check that proves it (PASS line, archive in S3, audit in the local
spool); a bullet no check proves fails the scenario, so a new expectation in the runbook cannot go unchecked.
The stricter `check_canary_run` (every symbol, stop reason, fresh feed) runs on top, and a second canary run
must pass and leave the first one's archive objects and audit lines intact.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest

from canary.checks import (
    CanaryOutcome,
    CheckResult,
    archive_keys,
    canary_argv,
    check_archive,
    check_audit,
    check_canary_line,
    check_canary_run,
    run_canary,
)
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.experiment import Action, Experiment, Observation, Probe, Slot, command_observation, holds
from harness.journal import Journal
from quantlab_chaos import items
from quantlab_chaos.runbook import Runbook, Source

ITEM = items.CANARY
# The command is run as written; its length comes from GO_LIVE_CANARY_SECONDS (CONTRACT section 2), not a flag.
CANARY_SECONDS = "2"
CANARY_DEADLINE_S = 60.0
RUNS_PATH = "/observer/runs"  # CONTRACT section 3, used when the runbook lists no runs check
# Which check proves an expected bullet, by the words the bullet uses (first match wins).
EXPECTATIONS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("canary_pass", re.compile(r"\bPASS\b|exits?\s+\d", re.I)),
    ("archive", re.compile(r"archive|\bS3\b", re.I)),
    ("audit", re.compile(r"audit|spool", re.I)),
)


@pytest.mark.runbook(ITEM)
def test_canary_validation(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    command = runbook_model.canary
    if command is None:
        pytest.skip(f"the runbook {runbook_model.path} has no canary command")
    argv = canary_argv(command.argv, quantlab.strategy("steady"))
    symbols = _flag(argv, "--symbols").split(",")
    ran: Slot[CanaryOutcome] = Slot("the canary run")

    def run_as_written() -> None:
        outcome = run_canary(kit.runner(quantlab), argv, CANARY_DEADLINE_S, {"GO_LIVE_CANARY_SECONDS": CANARY_SECONDS})
        journal.measure("canary_s", round(outcome.result.duration_s, 3))
        ran.set(outcome)

    def listed() -> Observation:
        record, decisions = _listing(quantlab, runbook_model, ran.value)
        return Observation(record is not None and decisions is not None,
                           f"run listed by the observer: {record is not None}; decisions readable: {decisions is not None}",
                           {"run_id": ran.value.run_id, "record": record})

    def run_checked() -> CheckResult:
        record, decisions = _listing(quantlab, runbook_model, ran.value)
        return check_canary_run(ran.value, symbols, decisions, record)

    def second_run() -> Observation:
        started = kit.now()
        return kit.canary_observation(quantlab, kit.canary(quantlab, runbook_model), started)

    journal.run(Experiment(
        ITEM,
        # The canary under test runs before the snapshot: the second run below must leave what it wrote intact.
        setup=[kit.start(quantlab, "observer"),
               Action(f"{command.text} (strategy: {quantlab.strategy('steady').name})", run_as_written)],
        steady_state=[],
        checks=[
            Probe("the runbook under the canary command", lambda: _bullets_seen(runbook_model),
                  holds("the canary command is followed by what to expect", command.source)),
            *[_bullet(quantlab, ran, text, source) for text, source in runbook_model.canary_expected],
            Probe("the observer's runs listing and the archive", listed,
                  holds("the observer lists the canary's run and its decisions are archived", command.source)),
            Probe("the canary's run, its archived decisions and its listing", run_checked,
                  holds(f"the canary's run took events from every requested symbol ({', '.join(symbols)}), ended "
                        "as a canary should and saw a fresh feed", command.source)),
            Probe("a second canary run", second_run, holds("a second canary run passes too", command.source)),
        ],
        snapshot=kit.snapshot_of(quantlab),
    ))


def _bullets_seen(runbook: Runbook) -> Observation:
    count = len(runbook.canary_expected)
    return Observation(count > 0, f"{count} 'Expected' bullet(s) under the canary command" if count else
                       "no 'Expected' bullets under the canary command")


def _bullet(quantlab: QuantLabEnvironment, ran: Slot[CanaryOutcome], text: str, source: Source) -> Probe:
    """An Expected bullet, judged by the check its words name (a bullet no check proves does not hold)."""
    name = next((check for check, pattern in EXPECTATIONS if pattern.search(text)), None)

    def observe() -> Observation:
        if name is None:
            return Observation(False, "the harness has no check for this expectation; add one to EXPECTATIONS in "
                                      "this scenario (and to canary/checks.py if needed)")
        outcome = ran.value
        result = _runbook_check(name, quantlab, outcome)
        ok, seen = result.ok, result.message
        wanted_exit = re.search(r"exits?\s+(\d+)", text)
        if name == "canary_pass":
            ok = ok and (not wanted_exit or outcome.result.code == int(wanted_exit.group(1)))
            seen = f"the canary printed status {outcome.status} and exited {outcome.result.code} ({seen})"
        # A canary the harness had to stop shows as such (hung), whichever bullet is judged.
        return command_observation(outcome.result, ok, seen, {"check": name, **result.evidence})

    return Probe(f"the canary run ({name or 'no'} check)", observe, holds(text, source))


def _runbook_check(name: str, quantlab: QuantLabEnvironment, outcome: CanaryOutcome) -> CheckResult:
    if name == "canary_pass":
        return check_canary_line(outcome)
    if not outcome.run_id:
        return CheckResult("no_run", False, "the canary printed no live_run_id, so its run cannot be looked up")
    return check_archive(quantlab.bucket, outcome.run_id) if name == "archive" else \
        check_audit(quantlab.audit_dir, outcome.run_id)


def _flag(argv: Sequence[str], flag: str) -> str:
    if flag not in argv:
        pytest.fail(f"the runbook's canary command has no {flag}; the canary needs it (CONTRACT section 5)")
    return argv[list(argv).index(flag) + 1]


def _decisions(quantlab: QuantLabEnvironment, run_id: str | None) -> list[dict[str, Any]] | None:
    """The run's archived decisions (decisions.jsonl), or None when they cannot be read."""
    if not run_id:
        return None
    key = next(key for key in archive_keys(run_id) if key.endswith(".jsonl"))
    try:
        return quantlab.bucket.read_lines(key)
    except Exception:  # noqa: BLE001 - a missing object is already reported by check_archive
        return None


def _listing(quantlab: QuantLabEnvironment, runbook: Runbook,
             outcome: CanaryOutcome) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """The run as the observer lists it, and its archived decisions (None for what cannot be had)."""
    return _run_record(quantlab, runbook, outcome.run_id), _decisions(quantlab, outcome.run_id)


def _run_record(quantlab: QuantLabEnvironment, runbook: Runbook, run_id: str | None) -> dict[str, Any] | None:
    """The run as the observer lists it, through the runbook's own runs request when it has one (sent to the
    runbook's host and port; no answer there is an observation that does not hold)."""
    if not run_id:
        return None
    request = next((r for r in runbook.health_checks if r.path.rstrip("/").endswith("/runs")), None)
    response = kit.send(quantlab, request) if request else quantlab.observer("GET", RUNS_PATH)
    try:
        body = response.json() if response.status_code == 200 else {}
    except ValueError:
        return None
    runs = body.get("runs") if isinstance(body, dict) else None
    return next((run for run in runs or [] if isinstance(run, dict) and run.get("live_run_id") == run_id), None)
