"""Kill-Switch (Live Run Stop).

The runbook: its stop request, with a live run's id filled in, stops that run. The run ends as a manual stop
within two seconds, in the observer, the audit trail (the stop call and RUN_STOP) and the archive manifest;
a run id the observer does not know is refused.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from canary.checks import (
    MANUAL_STOP, CheckResult, check_manifest_stop_reason, check_run_stopped, check_stop_answer, check_stop_audited,
    check_unknown_run,
)
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.journal import Journal
from harness.ports import eventually
from harness.runbook import HttpRequest, Runbook

ITEM = "kill-switch"
# How soon a stopped run must be seen ended; QuantLab's own promise (CONTRACT section 9) is one second.
STOP_DEADLINE_S = 2.0
ARCHIVE_DEADLINE_S = 15.0


def stop_and_verify(quantlab: QuantLabEnvironment, runbook: Runbook, journal: Journal, request: HttpRequest) -> None:
    """A live run, stopped with `request` (a runbook stop line): answer, stop reason, audit, archive, unknown id."""
    with journal.steady_state("observer up; a healthy canary archived and audited"):
        quantlab.start("observer")
        _, before = kit.baseline(quantlab, runbook)
    client = kit.observer_client(quantlab)
    with kit.live_run(quantlab, runbook) as live:
        with journal.step("method", f"{request.method} {request.path} with <live_run_id> = the live run ({live.via})"):
            answer = kit.send(quantlab, request, live_run_id=live.run_id)
        accepted = check_stop_answer(answer, live.run_id)
        journal.expect(accepted.ok, expected=f"'{request.text}' accepts the stop of a live run",
                       actual=accepted.message, source=request.source, evidence=accepted.evidence)
        stopped = check_run_stopped(client, live.run_id, MANUAL_STOP, within_s=STOP_DEADLINE_S)
        journal.measure("stop_to_ended_s", stopped.evidence.get("elapsed_s"))
        journal.expect(stopped.ok, expected=f"the run stops with {MANUAL_STOP} within {STOP_DEADLINE_S:.0f} s",
                       actual=stopped.message, source=request.source, evidence=stopped.evidence)

    audited = _eventually_ok(lambda: check_stop_audited(quantlab.audit_dir, live.run_id, MANUAL_STOP), STOP_DEADLINE_S)
    journal.expect(audited.ok, expected=f"the stop is audited and RUN_STOP has {MANUAL_STOP}",
                   actual=audited.message, source=request.source, evidence=audited.evidence)
    archived = _eventually_ok(lambda: check_manifest_stop_reason(quantlab.bucket, live.run_id, MANUAL_STOP),
                              ARCHIVE_DEADLINE_S)
    journal.expect(archived.ok, expected=f"the stopped run's archive manifest has {MANUAL_STOP}",
                   actual=archived.message, source=request.source, evidence=archived.evidence)

    unknown = check_unknown_run(kit.send(quantlab, request, live_run_id=str(uuid.uuid4())))
    journal.expect(unknown.ok, expected=f"'{request.text}' with a run id nobody started is refused",
                   actual=unknown.message, source=request.source, evidence=unknown.evidence)
    journal.nothing_lost(before, kit.now_snapshot(quantlab))


def _eventually_ok(check: Callable[[], CheckResult], timeout: float) -> CheckResult:
    """The check's last result, re-run until it passes or `timeout` seconds pass (the run finishes asynchronously)."""
    results: list[CheckResult] = []
    eventually(lambda: results.append(check()) or results[-1].ok, timeout=timeout, interval=0.2)
    return results[-1]


@pytest.mark.runbook(ITEM)
def test_kill_switch_stops_live_run(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    if runbook_model.kill_switch is None:
        pytest.skip(f"the runbook {runbook_model.path} has no kill-switch request")
    stop_and_verify(quantlab, runbook_model, journal, runbook_model.kill_switch)
