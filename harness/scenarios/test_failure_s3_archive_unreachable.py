"""Most Common Failures: S3 archive unreachable.

The runbook: archive writes fail, or the self-test stops at its S3 step; the fix is to check the
`RUN_ARCHIVE_S3_*` env values, that the endpoint can be reached, and the bucket's permissions.
S3 goes away in each way it does in production (refused, reset, black hole) through the environment's
S3 proxy, and once through a wrong endpoint in the env file.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from canary.checks import Runner, archive_keys, check_archive, check_canary_line, check_self_test, run_self_test
from canary.process import CommandResult
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.experiment import Action, Experiment, Observation, Probe, command_observation, holds
from harness.fakes.toxiproxy import ChaosProxy
from harness.journal import Journal, violation
from harness.ports import free_port
from quantlab_chaos import items
from quantlab_chaos.envfile import EnvFile
from quantlab_chaos.runbook import Failure, Runbook

ITEM = items.S3_ARCHIVE_UNREACHABLE
# A deadline of ours: QuantLab sets no S3 timeout, so a fault may hang a command; the harness stops it here and
# reports `did not finish in N s` (never the symptom). The twin bounds each S3 call at 3 s, and its canary's run
# (2 s), archive write and audit flush fit well inside.
DEADLINE_S = 20.0
RECOVERY_DEADLINE_S = 10.0
# CONTRACT section 4: the self-test step that talks to the bucket first.
S3_STEP = "s3_reachable"
# CONTRACT section 7: what a live run logs when its archive write fails.
ARCHIVE_ERROR_EVENT = "live_archive_error"
ARCHIVE_ROOT = archive_keys("")[0].split("replay_run_id=")[0]
ENDPOINT_SUFFIX = "ENDPOINT"


@dataclass(frozen=True)
class Fault:
    description: str
    inject: Callable[[ChaosProxy], object]
    # Whether requests still reach S3 (only the answer is lost), so objects may land although the write "failed".
    requests_reach_s3: bool = False


FAULTS: dict[str, Fault] = {
    "refused": Fault("the S3 endpoint refuses connections (S3 proxy disabled)", lambda proxy: proxy.disable()),
    "reset": Fault("every S3 connection is reset as the client sends (reset_peer upstream)",
                   lambda proxy: proxy.reset_peer(stream="upstream")),
    "reset-response": Fault("every S3 answer is cut by a reset after the request went through (reset_peer downstream)",
                            lambda proxy: proxy.reset_peer(stream="downstream"), requests_reach_s3=True),
    "blackhole": Fault("S3 accepts connections and never answers (black hole)", lambda proxy: proxy.blackhole()),
}


@pytest.mark.runbook(ITEM)
@pytest.mark.parametrize("mode", list(FAULTS))
def test_s3_unreachable(mode: str, quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    failure = runbook_model.failure("s3-archive-unreachable")
    fault = FAULTS[mode]
    journal.measure("fault", mode)
    keys_before: set[str] = set()

    def apply() -> None:
        keys_before.update(quantlab.bucket.list_keys(ARCHIVE_ROOT))
        fault.inject(quantlab.s3_proxy)

    journal.run(Experiment(
        f"{ITEM} ({mode})",
        steady_state=[kit.healthy_canary(quantlab, runbook_model), self_test_passes(quantlab, failure)],
        fault=[Action(fault.description, apply)],
        symptom=[self_test_stops_at_s3(journal, failure, kit.runner(quantlab)),
                 archive_write_fails(journal, failure, quantlab, runbook_model, keys_before, fault)],
        symptom_together=True,  # both watch the one fault: a hang costs one deadline, not two
        fix=[Action(f"Fix: {failure.fix}: the {', '.join(_archive_patterns(failure))} values are all set",
                    lambda: _verify_archive_env(failure, quantlab.quantlab_env())),
             Action("the S3 endpoint made reachable again (proxy cleared)", quantlab.s3_proxy.clear)],
        recovery=_recovery(failure, quantlab, runbook_model, kit.runner(quantlab)),
        rollbacks=[Action("the S3 proxy cleared", quantlab.s3_proxy.clear)],
        snapshot=kit.snapshot_of(quantlab),
    ))


@pytest.mark.runbook(ITEM)
def test_s3_wrong_endpoint_in_env_file(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    failure = runbook_model.failure("s3-archive-unreachable")
    service, env_file = _archiving_env_file(quantlab)
    endpoint_name = _endpoint_variable(failure)
    with_env_file = _with_env_file(quantlab, env_file)
    corrected: list[str] = []

    journal.run(Experiment(
        f"{ITEM} (wrong endpoint in {env_file.name})",
        steady_state=[kit.healthy_canary(quantlab, runbook_model), self_test_passes(quantlab, failure, with_env_file)],
        fault=[Action(f"{endpoint_name} in {env_file.name} points at a port where nothing listens",
                      lambda: quantlab.edit_env(service, set={endpoint_name: f"http://127.0.0.1:{free_port()}"}))],
        symptom=[self_test_stops_at_s3(journal, failure, with_env_file)],
        fix=[Action(f"Fix: {failure.fix} (the env file's values compared with the known-good ones and corrected)",
                    lambda: corrected.extend(_correct_archive_env(failure, quantlab, service, env_file)))],
        # Observed under the corrected env file, not the harness's own known-good values.
        recovery=_recovery(failure, quantlab, runbook_model, with_env_file,
                           canary_env=lambda: EnvFile.read(env_file).values),
        snapshot=kit.snapshot_of(quantlab),
    ))
    journal.measure("corrected_variables", corrected)


# -- probes ------------------------------------------------------------------------------------------------


def self_test_passes(quantlab: QuantLabEnvironment, failure: Failure, runner: Runner | None = None) -> Probe:
    return Probe("the self-test", lambda: check_self_test(runner or kit.runner(quantlab), DEADLINE_S),
                 holds("the self-test passes every step", failure.source))


def self_test_stops_at_s3(journal: Journal, failure: Failure, runner: Runner) -> Probe:
    """The self-test, run while S3 is unreachable, fails at its S3 step (exit non-zero), within our deadline."""

    def observe() -> Observation:
        started = kit.now()
        outcome = run_self_test(runner, DEADLINE_S)
        journal.measure("self_test_time_to_fail_s", round(outcome.result.duration_s, 3))
        passed = outcome.result.code == 0 and not outcome.result.timed_out
        seen = ("the self-test passed every step with S3 unreachable" if passed else
                f"the self-test stopped at {outcome.failed_step} (steps passed: {outcome.steps or 'none'}; "
                f"exit {outcome.result.code}; error: {outcome.error})")
        return command_observation(outcome.result, outcome.failed_step == S3_STEP and outcome.result.code not in (0, None),
                                   seen, {"steps": outcome.steps, "error": outcome.error}, started=started)

    return Probe("the self-test", observe,
                 holds(f"Symptom: {failure.symptom} (the self-test fails at {S3_STEP})", failure.symptom_source))


def archive_write_fails(journal: Journal, failure: Failure, quantlab: QuantLabEnvironment, runbook: Runbook,
                        keys_before: set[str], fault: Fault) -> Probe:
    """A live run (the canary's) while S3 is unreachable: its archive write fails, says so, and leaves no archive."""

    def observe() -> Observation:
        started = kit.now()
        canary = kit.canary(quantlab, runbook, timeout=DEADLINE_S)
        journal.measure("canary_time_to_fail_s", round(canary.result.duration_s, 3))
        errors = _archive_errors(canary.result)
        new_keys = sorted(set(quantlab.bucket.list_keys(ARCHIVE_ROOT)) - keys_before)
        verdict = check_canary_line(canary)
        run_ids = sorted({str(line["live_run_id"]) for line in errors if line.get("live_run_id")})
        archives = [check_archive(quantlab.bucket, run_id) for run_id in run_ids]
        if new_keys and fault.requests_reach_s3 and errors:
            journal.finding(
                "partial archive after a failed write",
                f"the run's archive write failed ({ARCHIVE_ERROR_EVENT}), yet {len(new_keys)} object(s) landed "
                f"({', '.join(k.rsplit('/', 1)[-1] for k in new_keys)}): a reader sees a half-archived run that "
                "QuantLab marked ERROR. Write the manifest last, or remove partial objects after a failed write.",
                severity="warning", source=failure.symptom_source)
        nothing_written = not new_keys or fault.requests_reach_s3
        write_failed = bool(errors) and not verdict.ok and all(not a.ok for a in archives) and nothing_written
        seen = (f"{ARCHIVE_ERROR_EVENT} lines: {len(errors)}; canary: {verdict.message}; "
                f"new archive objects: {new_keys[:3] or 'none'}")
        return command_observation(canary.result, write_failed, seen,
                                   {**kit.evidence(canary), "archive_errors": errors[:3], "new_keys": new_keys[:6],
                                    "archive_checks": [a.to_dict() for a in archives]}, started=started)

    return Probe("the canary's live run", observe,
                 holds(f"Symptom: {failure.symptom} (the live run's archive write fails, it logs "
                       f"{ARCHIVE_ERROR_EVENT}, and no archive is written)", failure.symptom_source))


def _archive_errors(result: CommandResult) -> list[dict[str, object]]:
    return [line for stream in ("stdout", "stderr") for line in result.json_lines(stream)
            if line.get("event") == ARCHIVE_ERROR_EVENT]


# -- fix and recovery --------------------------------------------------------------------------------------


def _recovery(failure: Failure, quantlab: QuantLabEnvironment, runbook: Runbook, runner: Runner,
              canary_env: Callable[[], Mapping[str, str]] | None = None) -> list[Probe]:
    def canary_passes() -> Observation:
        started = kit.now()
        outcome = kit.canary(quantlab, runbook, extra_env=canary_env() if canary_env else None)
        return kit.canary_observation(quantlab, outcome, started)

    return [
        Probe("the self-test", lambda: check_self_test(runner, DEADLINE_S),
              holds(f"after '{failure.fix}' the self-test passes every step", failure.fix_source),
              deadline_s=RECOVERY_DEADLINE_S),
        Probe("the runbook's canary", canary_passes,
              holds(f"after '{failure.fix}' a new canary run passes and is archived", failure.fix_source)),
    ]


def _archive_patterns(failure: Failure) -> list[str]:
    """The env names the runbook's fix tells the operator to check (`RUN_ARCHIVE_S3_*` is a glob)."""
    return [name for name in failure.fix_ids.env_names if "S3" in name.upper() or name.endswith("*")]


def _covered(name: str, failure: Failure) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _archive_patterns(failure))


def _endpoint_variable(failure: Failure) -> str:
    """The endpoint variable named through the runbook's `RUN_ARCHIVE_S3_*` (CONTRACT section 2 names the suffix)."""
    wildcards = [pattern.rstrip("*") for pattern in _archive_patterns(failure) if pattern.endswith("*")]
    names = [pattern for pattern in _archive_patterns(failure) if pattern.upper().endswith(ENDPOINT_SUFFIX)]
    if names:
        return names[0]
    if wildcards:
        return wildcards[0] + ENDPOINT_SUFFIX
    pytest.fail(f"{failure.fix_source}: the fix names no RUN_ARCHIVE_S3_* variable, so the operator is not told "
                "to check the S3 endpoint; name the archive's S3 env values in the fix.")


def _verify_archive_env(failure: Failure, env: Mapping[str, str]) -> None:
    """The fix's first step: the archive's S3 values the runbook names are all set (they are not the cause here)."""
    named = sorted(name for name in env if _covered(name, failure))
    empty = [name for name in named if not env[name].strip()]
    if not named or empty:
        raise violation(failure.fix_source, f"the {', '.join(_archive_patterns(failure))} values the fix names are set",
                        f"set: {named}; empty: {empty}")


def _correct_archive_env(failure: Failure, quantlab: QuantLabEnvironment, service: str, env_file: Path) -> list[str]:
    """Compares the env file's archive values the runbook names with the known-good ones and corrects them."""
    good = quantlab.service_env(service)
    current = EnvFile.read(env_file).values
    wrong = sorted(name for name, value in current.items() if name in good and good[name] != value)
    fixable = [name for name in wrong if _covered(name, failure)]
    if not wrong or fixable != wrong:
        raise violation(failure.fix_source,
                        f"the fix's {', '.join(_archive_patterns(failure))} covers every wrong value in the env file",
                        f"wrong: {wrong}; covered by the fix: {fixable}")
    quantlab.edit_env(service, set={name: good[name] for name in fixable})
    return fixable


# -- env files ---------------------------------------------------------------------------------------------


def _archiving_env_file(quantlab: QuantLabEnvironment) -> tuple[str, Path]:
    found = kit.archiving_env_file(quantlab)
    if found is not None:
        return found
    pytest.skip(f"the target {quantlab.target.root} has no {' or '.join(kit.ARCHIVING_SERVICES)} unit with an "
                "EnvironmentFile=, so there is no env file whose endpoint could be wrong")


def _with_env_file(quantlab: QuantLabEnvironment, env_file: Path) -> Runner:
    """Runs commands the way an operator does on the host: with the service's env file loaded."""

    def run(argv: Sequence[str], extra_env: Mapping[str, str] | None, timeout: float) -> CommandResult:
        values = {**EnvFile.read(env_file).values, **(extra_env or {})}
        return quantlab.run_command(argv, env=values, timeout=timeout)

    return run
