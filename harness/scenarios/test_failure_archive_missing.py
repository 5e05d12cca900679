"""Most Common Failures: Archive missing after run.

The runbook: the canary fails its archive check; the fix is `RUN_ARCHIVE_ENABLED=1`, the S3 permissions and
the RunArchiveWriter log lines. Two causes: archiving switched off in the env file the canary is run with on
the host, and S3 cut while a run is under way. Observed from outside: the canary's verdict and exit, and the
bucket's listing (no new archive objects during the fault, the run's three after the fix).
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from canary.checks import CanaryOutcome, archive_keys, check_canary_line
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.experiment import Action, Experiment, Observation, Probe, Slot, command_observation, holds
from harness.journal import Journal, violation
from quantlab_chaos import items
from quantlab_chaos.envfile import EnvFile
from quantlab_chaos.runbook import Failure, Runbook
from quantlab_chaos.waiting import wait_until

ITEM = items.ARCHIVE_MISSING
ARCHIVE_ROOT = archive_keys("")[0].split("replay_run_id=")[0]
# Long enough to cut S3 after the run has connected to the exchange, short enough to keep the scenario quick.
MID_RUN_CANARY_S = 3
CONNECT_DEADLINE_S = 10.0
CANARY_DEADLINE_S = 30.0
ARCHIVING_OFF = "0"


@pytest.mark.runbook(ITEM)
def test_archive_missing_archiving_off(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    failure = runbook_model.failure("archive-missing")
    flag, on = _archive_flag(failure)
    service, env_file = _archive_env_file(quantlab, flag)
    keys_before: set[str] = set()

    def canary() -> tuple[float, CanaryOutcome]:
        return kit.now(), _operator_canary(quantlab, runbook_model, env_file)

    def switch_off() -> None:
        keys_before.update(quantlab.bucket.list_keys(ARCHIVE_ROOT))
        quantlab.edit_env(service, set={flag: ARCHIVING_OFF})

    journal.run(Experiment(
        f"{ITEM} ({flag}={ARCHIVING_OFF} in {env_file.name})",
        steady_state=[_healthy_operator_canary(quantlab, runbook_model, env_file)],
        fault=[Action(f"{flag}={ARCHIVING_OFF} in {env_file.name}, the env file the canary is run with", switch_off)],
        symptom=[_archive_check_fails(failure, quantlab, keys_before, canary)],
        fix=[Action(f"Fix: {failure.fix} ({flag}={on} written in {env_file.name})",
                    lambda: quantlab.edit_env(service, set={flag: on}))],
        # Observed with the fixed env file loaded, not with the harness's own default values.
        recovery=[_canary_archived(failure, quantlab, lambda: _operator_canary(quantlab, runbook_model, env_file))],
        snapshot=kit.snapshot_of(quantlab),
    ))


@pytest.mark.runbook(ITEM)
def test_archive_missing_s3_cut_mid_run(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    failure = runbook_model.failure("archive-missing")
    keys_before: set[str] = set()
    running: Slot[_Running] = Slot("the canary run S3 is cut under")

    def cut() -> None:
        keys_before.update(quantlab.bucket.list_keys(ARCHIVE_ROOT))
        pool = journal.enter(ThreadPoolExecutor(max_workers=1, thread_name_prefix="canary"))
        running.set(_cut_s3_once_connected(journal, quantlab, runbook_model, pool))

    def canary() -> tuple[float, CanaryOutcome]:
        # The canary's own deadline bounds it; the margin only covers its output being read.
        return running.value.started, running.value.outcome.result(timeout=CANARY_DEADLINE_S + 5.0)

    journal.run(Experiment(
        f"{ITEM} (S3 cut mid-run)",
        steady_state=[kit.healthy_canary(quantlab, runbook_model)],
        fault=[Action("S3 cut (proxy disabled) once a canary's run is connected to the exchange", cut)],
        symptom=[_archive_check_fails(failure, quantlab, keys_before, canary)],
        fix=[Action(f"Fix: {failure.fix} (the S3 endpoint reachable again: proxy enabled)", quantlab.s3_proxy.enable)],
        recovery=[_canary_archived(failure, quantlab, lambda: kit.canary(quantlab, runbook_model,
                                                                          timeout=CANARY_DEADLINE_S))],
        rollbacks=[Action("the S3 proxy cleared", quantlab.s3_proxy.clear)],
        snapshot=kit.snapshot_of(quantlab),
    ))


# -- the canary, as the operator runs it ---------------------------------------------------------------------


def _archive_flag(failure: Failure) -> tuple[str, str]:
    """The archive switch and its 'on' value, as the runbook's fix writes them (`RUN_ARCHIVE_ENABLED=1`)."""
    values = failure.fix_ids.env()
    if not values:
        pytest.fail(f"{failure.fix_source}: the fix names no NAME=value setting to turn archiving on; "
                    "write it as `RUN_ARCHIVE_ENABLED=1`.")
    return next(iter(values.items()))


def _archive_env_file(quantlab: QuantLabEnvironment, flag: str) -> tuple[str, Path]:
    """The env file of the service that archives runs: the one an operator loads to run the canary on the host."""
    found = kit.archiving_env_file(quantlab)
    if found is not None:
        return found
    pytest.skip(f"the target {quantlab.target.root} has no {' or '.join(kit.ARCHIVING_SERVICES)} unit with an "
                f"EnvironmentFile=, so no env file could have {flag} switched off; the runbook's fix does not say "
                "where else to look, and a value the harness sets itself would prove nothing")


def _operator_canary(quantlab: QuantLabEnvironment, runbook: Runbook, env_file: Path) -> CanaryOutcome:
    """The runbook's canary as an operator runs it on the host: with the env file's values as they are now."""
    return kit.canary(quantlab, runbook, extra_env=EnvFile.read(env_file).values, timeout=CANARY_DEADLINE_S)


def _healthy_operator_canary(quantlab: QuantLabEnvironment, runbook: Runbook, env_file: Path) -> Probe:
    """kit.healthy_canary, with the env file loaded at each run (so the re-check sees the fixed file)."""
    source = runbook.canary.source if runbook.canary is not None else None

    def observe() -> Observation:
        started = kit.now()
        return kit.canary_observation(quantlab, _operator_canary(quantlab, runbook, env_file), started,
                                      natural_end=True)

    return Probe(f"the runbook's canary command (harness strategy, {env_file.name} loaded)", observe,
                 holds("a canary run passes, archived and audited, and ends at its natural end", source),
                 blocks=kit.CANARY_ITEM)


@dataclass(frozen=True)
class _Running:
    started: float
    outcome: Future[CanaryOutcome]


def _cut_s3_once_connected(journal: Journal, quantlab: QuantLabEnvironment, runbook: Runbook,
                           pool: ThreadPoolExecutor) -> _Running:
    """Starts a short canary and disables the S3 proxy once its run has reached the exchange. A canary that does
    not get there is a deviation from the canary line (the steady state showed it does)."""
    connections_before = len(quantlab.exchange.record().connections)
    started = kit.now()
    outcome = pool.submit(kit.canary, quantlab, runbook, seconds=MID_RUN_CANARY_S, timeout=CANARY_DEADLINE_S)
    source = runbook.canary.source if runbook.canary is not None else None
    says = f"a {MID_RUN_CANARY_S} s canary run connects to the exchange and runs on"
    try:
        wait_until(lambda: len(quantlab.exchange.record().connections) > connections_before or outcome.done(),
                   timeout=CONNECT_DEADLINE_S, what="the canary's run connecting to the exchange")
    except TimeoutError as exc:
        raise violation(source, says, str(exc)) from None
    if outcome.done():
        raise violation(source, says, f"the canary ended before its run reached the exchange: "
                                      f"{kit.evidence(outcome.result())}")
    quantlab.s3_proxy.disable()
    journal.measure("s3_cut_after_s", round(kit.now() - started, 3))
    return _Running(started, outcome)


# -- probes ----------------------------------------------------------------------------------------------------


def _archive_check_fails(failure: Failure, quantlab: QuantLabEnvironment, keys_before: set[str],
                         canary: Callable[[], tuple[float, CanaryOutcome]]) -> Probe:
    """The canary's run (`canary` gives when it started and how it ended) fails its archive check, and the
    bucket's listing shows no new archive object."""

    def observe() -> Observation:
        started, outcome = canary()
        verdict = check_canary_line(outcome)
        new_keys = sorted(set(quantlab.bucket.list_keys(ARCHIVE_ROOT)) - keys_before)
        # check_canary_line ties a FAIL to this runbook item when the canary's error is about the archive.
        failed_archive_check = not verdict.ok and verdict.runbook_item == ITEM
        return command_observation(outcome.result, failed_archive_check and not new_keys,
                                   f"canary: {verdict.message}; new archive objects: {new_keys[:3] or 'none'}",
                                   {**kit.evidence(outcome), "new_keys": new_keys[:6]}, started=started)

    return Probe("the runbook's canary", observe, holds(f"Symptom: {failure.symptom}", failure.symptom_source))


def _canary_archived(failure: Failure, quantlab: QuantLabEnvironment, canary: Callable[[], CanaryOutcome]) -> Probe:
    def observe() -> Observation:
        started = kit.now()
        return kit.canary_observation(quantlab, canary(), started)

    return Probe("the runbook's canary", observe,
                 holds(f"after '{failure.fix}' the canary passes and its three archive objects are in S3",
                       failure.fix_source))
