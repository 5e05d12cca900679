"""Canary Validation: the runbook's canary command as written, and every "Expected" bullet under it.

Each expected bullet is mapped to the check that proves it (PASS line, archive in S3, audit in the local
spool); a bullet no check proves fails the scenario, so a new expectation in the runbook cannot go unchecked.
The stricter `check_canary_run` (every symbol, stop reason, fresh feed) runs on top.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from canary.checks import (
    CanaryOutcome, CheckResult, archive_keys, canary_argv, check_archive, check_audit, check_canary_line,
    check_canary_run, run_canary,
)
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.journal import Journal
from harness.runbook import Runbook, Source

ITEM = "canary"
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

    with journal.steady_state("observer up"):
        quantlab.start("observer")

    with journal.step("canary", f"{command.text} (strategy: {quantlab.strategy('steady').name})"):
        outcome = run_canary(kit.runner(quantlab), argv, CANARY_DEADLINE_S, {"GO_LIVE_CANARY_SECONDS": CANARY_SECONDS})
    checks = _runbook_checks(quantlab, outcome)
    journal.measure("canary_s", round(outcome.result.duration_s, 3))

    journal.expect(bool(runbook_model.canary_expected), expected="the canary command is followed by what to expect",
                   actual="no 'Expected' bullets under the canary command", source=command.source)
    for text, source in runbook_model.canary_expected:
        _expect_bullet(journal, text, source, checks, outcome)

    record = _run_record(quantlab, runbook_model, outcome.run_id)
    decisions = _decisions(quantlab, outcome.run_id)
    journal.expect(record is not None and decisions is not None,
                   expected="the observer lists the canary's run and its decisions are archived",
                   actual=f"run listed by the observer: {record is not None}; decisions readable: {decisions is not None}",
                   source=command.source, evidence={"run_id": outcome.run_id, "record": record})
    run = check_canary_run(outcome, symbols, decisions, record)
    journal.expect(run.ok, expected=f"the canary's run took events from every requested symbol ({', '.join(symbols)}), "
                                    "ended as a canary should and saw a fresh feed",
                   actual=run.message, source=command.source, evidence=run.evidence)

    # A later canary must leave this run's archive and audit entries as they are.
    before = kit.now_snapshot(quantlab)
    with journal.step("canary", "a second canary run"):
        later = kit.failed(kit.canary_checks(quantlab, kit.canary(quantlab, runbook_model)))
    journal.expect(not later, expected="a second canary run passes too", actual=f"problems: {later}",
                   source=command.source)
    journal.nothing_lost(before, kit.now_snapshot(quantlab))


def _runbook_checks(quantlab: QuantLabEnvironment, outcome: CanaryOutcome) -> dict[str, CheckResult]:
    missing_run = CheckResult("no_run", False, "the canary printed no live_run_id, so its run cannot be looked up")
    return {
        "canary_pass": check_canary_line(outcome),
        "archive": check_archive(quantlab.bucket, outcome.run_id) if outcome.run_id else missing_run,
        "audit": check_audit(quantlab.audit_dir, outcome.run_id) if outcome.run_id else missing_run,
    }


def _expect_bullet(journal: Journal, text: str, source: Source, checks: dict[str, CheckResult],
                   outcome: CanaryOutcome) -> None:
    name = next((check for check, pattern in EXPECTATIONS if pattern.search(text)), None)
    if name is None:
        journal.expect(False, expected=text, actual="the harness has no check for this expectation; add one to "
                       "EXPECTATIONS in this scenario (and to canary/checks.py if needed)", source=source)
        return
    result = checks[name]
    ok = result.ok
    actual = result.message
    wanted_exit = re.search(r"exits?\s+(\d+)", text)
    if name == "canary_pass":
        ok = ok and (not wanted_exit or outcome.result.code == int(wanted_exit.group(1)))
        actual = f"the canary printed status {outcome.status} and exited {outcome.result.code} ({actual})"
    journal.expect(ok, expected=text, actual=actual, source=source, evidence={"check": name, **result.evidence})


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


def _run_record(quantlab: QuantLabEnvironment, runbook: Runbook, run_id: str | None) -> dict[str, Any] | None:
    """The run as the observer lists it, through the runbook's own runs request when it has one."""
    if not run_id:
        return None
    request = next((r for r in runbook.health_checks if r.path.rstrip("/").endswith("/runs")), None)
    url = request.url_for(quantlab.observer_url) if request else quantlab.observer_url + RUNS_PATH
    headers = request.header_values({"OBSERVER_TOKEN": quantlab.token}) if request else \
        {"Authorization": f"Bearer {quantlab.token}"}
    response = httpx.request(request.method if request else "GET", url, headers=headers, timeout=5.0)
    runs = response.json().get("runs", []) if response.status_code == 200 else []
    return next((run for run in runs if run.get("live_run_id") == run_id), None)
