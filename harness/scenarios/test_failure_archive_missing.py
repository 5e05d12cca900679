"""Most Common Failures: Archive missing after run.

The runbook: the canary fails its archive check; the fix is `RUN_ARCHIVE_ENABLED=1`, the S3 permissions and
the RunArchiveWriter log lines. Two causes: archiving switched off, and S3 cut while a run is under way.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import pytest

from canary.checks import CanaryOutcome, archive_keys, check_canary_line
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.journal import Journal
from harness.ports import wait_until
from harness.runbook import Failure, Runbook

ITEM = "failure:archive-missing"
ARCHIVE_ROOT = archive_keys("")[0].split("replay_run_id=")[0]
# Long enough to cut S3 after the run has connected to the exchange, short enough to keep the scenario quick.
MID_RUN_CANARY_S = 3
CONNECT_DEADLINE_S = 10.0
CANARY_DEADLINE_S = 30.0


def _archive_flag(failure: Failure) -> tuple[str, str]:
    """The archive switch and its 'on' value, as the runbook's fix writes them (`RUN_ARCHIVE_ENABLED=1`)."""
    values = failure.fix_ids.env()
    if not values:
        pytest.fail(f"{failure.fix_source}: the fix names no NAME=value setting to turn archiving on; "
                    "write it as `RUN_ARCHIVE_ENABLED=1`.")
    return next(iter(values.items()))


@pytest.mark.runbook(ITEM)
def test_archive_missing_archiving_off(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    failure = runbook_model.failure("archive-missing")
    flag, on = _archive_flag(failure)

    with journal.steady_state("a healthy canary run archived and audited"):
        _, before = kit.baseline(quantlab, runbook_model)
        keys_before = set(quantlab.bucket.list_keys(ARCHIVE_ROOT))

    with journal.inject(f"{flag} off in the canary's environment"):
        outcome = kit.canary(quantlab, runbook_model, extra_env={flag: "0"}, timeout=CANARY_DEADLINE_S)
    _archive_check_symptom(journal, failure, quantlab, outcome, keys_before)

    with journal.fix(f"Fix: {failure.fix}"):
        fixed_env = {flag: on}
    _expect_recovery(journal, failure, quantlab, runbook_model, fixed_env)
    journal.nothing_lost(before, kit.now_snapshot(quantlab))


@pytest.mark.runbook(ITEM)
def test_archive_missing_s3_cut_mid_run(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    failure = runbook_model.failure("archive-missing")
    flag, on = _archive_flag(failure)

    with journal.steady_state("a healthy canary run archived and audited"):
        _, before = kit.baseline(quantlab, runbook_model)
        keys_before = set(quantlab.bucket.list_keys(ARCHIVE_ROOT))
        connections_before = len(quantlab.exchange.record().connections)

    with journal.inject("S3 cut (proxy disabled) once the canary's run is connected to the exchange"):
        outcome, cut_after_s = _canary_with_s3_cut(quantlab, runbook_model, connections_before)
    journal.measure("s3_cut_after_s", cut_after_s)
    _archive_check_symptom(journal, failure, quantlab, outcome, keys_before)

    with journal.fix(f"Fix: {failure.fix} (S3 reachable again)"):
        quantlab.s3_proxy.enable()
        fixed_env = {flag: on}
    _expect_recovery(journal, failure, quantlab, runbook_model, fixed_env)
    journal.nothing_lost(before, kit.now_snapshot(quantlab))


def _canary_with_s3_cut(quantlab: QuantLabEnvironment, runbook: Runbook,
                        connections_before: int) -> tuple[CanaryOutcome, float]:
    """Runs a short canary and disables the S3 proxy after its run has started and reached the exchange."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(kit.canary, quantlab, runbook, seconds=MID_RUN_CANARY_S, timeout=CANARY_DEADLINE_S)
        try:
            wait_until(lambda: len(quantlab.exchange.record().connections) > connections_before or running.done(),
                       timeout=CONNECT_DEADLINE_S, what="the canary's run connecting to the exchange")
        finally:
            # Cut even when the wait failed, so the outcome below says what the canary did.
            quantlab.s3_proxy.disable()
        cut_after = round(time.monotonic() - started, 3)
        outcome = running.result()
    if cut_after >= outcome.result.duration_s:
        pytest.fail(f"the canary ended ({outcome.result.duration_s:.1f} s) before S3 was cut ({cut_after} s): "
                    f"it never reached the exchange; {kit.evidence(outcome)}")
    return outcome, cut_after


def _archive_check_symptom(journal: Journal, failure: Failure, quantlab: QuantLabEnvironment, outcome: CanaryOutcome,
                           keys_before: set[str]) -> None:
    verdict = check_canary_line(outcome)
    new_keys = sorted(set(quantlab.bucket.list_keys(ARCHIVE_ROOT)) - keys_before)
    # check_canary_line ties a FAIL to this runbook item when the canary's error is about the archive.
    failed_archive_check = not verdict.ok and verdict.runbook_item == ITEM
    journal.symptom(
        failed_archive_check and not new_keys,
        expected=f"Symptom: {failure.symptom}",
        actual=f"canary: {verdict.message}; new archive objects: {new_keys[:3] or 'none'}",
        source=failure.symptom_source,
        evidence={**kit.evidence(outcome), "new_keys": new_keys[:6]},
    )


def _expect_recovery(journal: Journal, failure: Failure, quantlab: QuantLabEnvironment, runbook: Runbook,
                     fixed_env: Mapping[str, str]) -> None:
    outcome = kit.canary(quantlab, runbook, extra_env=fixed_env, timeout=CANARY_DEADLINE_S)
    problems = kit.failed(kit.canary_checks(quantlab, outcome))
    journal.recovered(
        not problems,
        expected=f"after '{failure.fix}' the canary passes and its three archive objects are in S3",
        actual=f"canary problems: {problems or 'none'}",
        source=failure.fix_source,
        evidence=kit.evidence(outcome),
    )
