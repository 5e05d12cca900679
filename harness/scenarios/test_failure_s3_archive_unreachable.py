"""Most Common Failures: S3 archive unreachable.

The runbook: archive writes fail, or the self-test stops at its S3 step; the fix is to check the
`RUN_ARCHIVE_S3_*` env values, that the endpoint can be reached, and the bucket's permissions.
S3 goes away in each way it does in production (refused, reset, black hole) through the environment's
S3 proxy, and once through a wrong endpoint in the env file.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from canary.checks import (
    CanaryOutcome, Runner, SelfTestOutcome, archive_keys, check_archive, check_canary_line, check_self_test, run_self_test,
)
from canary.process import CommandResult
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.errors import HarnessError
from harness.fakes.toxiproxy import ChaosProxy
from harness.journal import Journal
from harness.ports import free_port
from harness.runbook import Failure, Runbook
from harness.units import EnvFile

ITEM = "failure:s3-archive-unreachable"
# QuantLab sets no S3 timeout, so a fault may hang a command: it is stopped here and reported as a finding.
DEADLINE_S = 12.0
# CONTRACT section 4: the self-test step that talks to the bucket first.
S3_STEP = "s3_reachable"
# CONTRACT section 7: what a live run logs when its archive write fails.
ARCHIVE_ERROR_EVENT = "live_archive_error"
ARCHIVE_ROOT = archive_keys("")[0].split("replay_run_id=")[0]
ENDPOINT_SUFFIX = "ENDPOINT"
# Services whose env file holds the archive settings, most relevant first.
ARCHIVING_SERVICES = ("live", "observer")


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

    with journal.steady_state("a healthy canary run archived and audited; the self-test passes"):
        _, before = kit.baseline(quantlab, runbook_model)
        _expect_self_test_passes(journal, kit.runner(quantlab), failure, "before the fault")
        keys_before = set(quantlab.bucket.list_keys(ARCHIVE_ROOT))

    with journal.inject(fault.description):
        fault.inject(quantlab.s3_proxy)
        self_test, canary = _self_test_and_canary(quantlab, runbook_model, kit.runner(quantlab))

    _self_test_symptom(journal, failure, self_test, mode)
    _archive_write_symptom(journal, failure, quantlab, canary, keys_before, mode, fault)

    with journal.fix(f"Fix: {failure.fix} (the endpoint is made reachable again)"):
        _verify_archive_env(journal, failure, quantlab.quantlab_env())
        quantlab.s3_proxy.clear()
    _expect_recovery(journal, failure, quantlab, runbook_model, kit.runner(quantlab))
    journal.nothing_lost(before, kit.now_snapshot(quantlab))


@pytest.mark.runbook(ITEM)
def test_s3_wrong_endpoint_in_env_file(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    failure = runbook_model.failure("s3-archive-unreachable")
    service, env_file = _archiving_env_file(quantlab)
    endpoint_name = _endpoint_variable(failure)

    with journal.steady_state(f"a healthy canary run archived; the self-test passes with {service}'s env file"):
        _, before = kit.baseline(quantlab, runbook_model)
        _expect_self_test_passes(journal, _with_env_file(quantlab, env_file), failure, "before the fault")

    with journal.inject(f"{endpoint_name} in {env_file.name} points at a port where nothing listens"):
        quantlab.edit_env(service, set={endpoint_name: f"http://127.0.0.1:{free_port()}"})
        self_test = run_self_test(_with_env_file(quantlab, env_file), DEADLINE_S)
    _self_test_symptom(journal, failure, self_test, "wrong endpoint")

    with journal.fix(f"Fix: {failure.fix} (the env file's values are compared with the known-good ones)"):
        corrected = _correct_archive_env(journal, failure, quantlab, service, env_file)
    journal.measure("corrected_variables", corrected)
    _expect_recovery(journal, failure, quantlab, runbook_model, _with_env_file(quantlab, env_file),
                     canary_env=EnvFile.read(env_file).values)
    journal.nothing_lost(before, kit.now_snapshot(quantlab))


# -- fault outcomes ----------------------------------------------------------------------------------------


def _self_test_and_canary(quantlab: QuantLabEnvironment, runbook: Runbook,
                          runner: Runner) -> tuple[SelfTestOutcome, CanaryOutcome]:
    """Both at once, so a fault that hangs them costs one deadline, not two."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        self_test = pool.submit(run_self_test, runner, DEADLINE_S)
        canary = pool.submit(kit.canary, quantlab, runbook, timeout=DEADLINE_S)
        return self_test.result(), canary.result()


def _self_test_symptom(journal: Journal, failure: Failure, outcome: SelfTestOutcome, mode: str) -> None:
    took = round(outcome.result.duration_s, 3)
    hung = outcome.result.timed_out
    journal.measure("self_test_time_to_fail_s", took)
    journal.measure("self_test_hung", hung)
    if hung:
        journal.finding(
            f"self-test hangs (S3 fault: {mode})",
            f"the self-test had not finished after {took} s ({outcome.failed_step or 'no step'} not passed) and was "
            "stopped; QuantLab sets no S3 timeout, so an operator waits forever. Give the S3 client a request timeout.",
        )
    stopped_at_s3 = outcome.failed_step == S3_STEP
    passed = outcome.result.code == 0 and not hung
    journal.symptom(
        stopped_at_s3,
        expected=f"Symptom: {failure.symptom} (the self-test stops at {S3_STEP})",
        actual=("the self-test passed every step with S3 unreachable" if passed else
                f"the self-test stopped at {outcome.failed_step} (steps passed: {outcome.steps or 'none'}; "
                f"exit {outcome.result.code}; error: {outcome.error})"),
        source=failure.symptom_source,
        evidence={"steps": outcome.steps, "error": outcome.error, "exit_code": outcome.result.code,
                  "duration_s": took, "timed_out": hung},
    )


def _archive_write_symptom(journal: Journal, failure: Failure, quantlab: QuantLabEnvironment, canary: CanaryOutcome,
                           keys_before: set[str], mode: str, fault: Fault) -> None:
    """A live run's archive write fails: it says so (or hangs), the canary fails, and the run has no archive."""
    took = round(canary.result.duration_s, 3)
    hung = canary.result.timed_out
    journal.measure("canary_time_to_fail_s", took)
    errors = _archive_errors(canary.result)
    new_keys = sorted(set(quantlab.bucket.list_keys(ARCHIVE_ROOT)) - keys_before)
    verdict = check_canary_line(canary)
    run_ids = sorted({str(line["live_run_id"]) for line in errors if line.get("live_run_id")})
    archives = [check_archive(quantlab.bucket, run_id) for run_id in run_ids]
    if hung:
        journal.finding(
            f"canary hangs (S3 fault: {mode})",
            f"the canary had not finished after {took} s and was stopped"
            + ("" if errors else f", with no {ARCHIVE_ERROR_EVENT} logged, so nothing told the operator why")
            + "; QuantLab sets no S3 timeout. Give the S3 client a request timeout.",
        )
    if new_keys and fault.requests_reach_s3:
        journal.finding(
            f"partial archive (S3 fault: {mode})",
            f"the run's archive write failed ({ARCHIVE_ERROR_EVENT}), yet {len(new_keys)} object(s) landed "
            f"({', '.join(k.rsplit('/', 1)[-1] for k in new_keys)}): a reader sees a half-archived run that QuantLab "
            "marked ERROR. Write the manifest last, or remove partial objects after a failed write.",
        )
    nothing_written = not new_keys or fault.requests_reach_s3
    incomplete = all(not result.ok for result in archives)
    write_failed = (bool(errors) or hung) and not verdict.ok and incomplete and nothing_written
    journal.symptom(
        write_failed,
        expected=f"Symptom: {failure.symptom} (the live run's archive write fails and no archive is written)",
        actual=f"{ARCHIVE_ERROR_EVENT} lines: {len(errors)}; canary: {verdict.message}; "
               f"new archive objects: {new_keys[:3] or 'none'}",
        source=failure.symptom_source,
        evidence={**kit.evidence(canary), "archive_errors": errors[:3], "new_keys": new_keys[:6],
                  "archive_checks": [result.to_dict() for result in archives], "timed_out": hung},
    )


def _archive_errors(result: CommandResult) -> list[dict[str, object]]:
    return [line for stream in ("stdout", "stderr") for line in result.json_lines(stream)
            if line.get("event") == ARCHIVE_ERROR_EVENT]


# -- fix and recovery --------------------------------------------------------------------------------------


def _expect_self_test_passes(journal: Journal, runner: Runner, failure: Failure, when: str) -> None:
    result = check_self_test(runner, DEADLINE_S)
    journal.expect(result.ok, expected=f"the self-test passes {when}", actual=result.message,
                   source=failure.source, evidence=result.evidence)


def _expect_recovery(journal: Journal, failure: Failure, quantlab: QuantLabEnvironment, runbook: Runbook,
                     runner: Runner, canary_env: Mapping[str, str] | None = None) -> None:
    self_test = check_self_test(runner, DEADLINE_S)
    outcome = kit.canary(quantlab, runbook, extra_env=canary_env)
    problems = kit.failed(kit.canary_checks(quantlab, outcome))
    if not self_test.ok:
        problems.insert(0, f"self_test: {self_test.message}")
    journal.recovered(
        not problems,
        expected=f"after '{failure.fix}' the self-test passes and a new canary run is archived",
        actual=f"problems: {problems or 'none'}",
        source=failure.fix_source,
        evidence={**kit.evidence(outcome), "self_test": self_test.evidence},
    )


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


def _verify_archive_env(journal: Journal, failure: Failure, env: Mapping[str, str]) -> None:
    """The fix's first step: the archive's S3 values the runbook names are all set (they are not the cause here)."""
    named = sorted(name for name in env if _covered(name, failure))
    empty = [name for name in named if not env[name].strip()]
    journal.expect(bool(named) and not empty,
                   expected=f"the {', '.join(_archive_patterns(failure))} values the fix names are set",
                   actual=f"set: {named}; empty: {empty}", source=failure.fix_source, evidence={"checked": named})


def _correct_archive_env(journal: Journal, failure: Failure, quantlab: QuantLabEnvironment, service: str,
                         env_file: Path) -> list[str]:
    """Compares the env file's archive values the runbook names with the known-good ones and corrects them."""
    good = quantlab.service_env(service)
    current = EnvFile.read(env_file).values
    wrong = sorted(name for name, value in current.items() if name in good and good[name] != value)
    fixable = [name for name in wrong if _covered(name, failure)]
    journal.expect(
        bool(wrong) and fixable == wrong,
        expected=f"the fix's {', '.join(_archive_patterns(failure))} covers every wrong value in the env file",
        actual=f"wrong: {wrong}; covered by the fix: {fixable}",
        source=failure.fix_source,
        evidence={"wrong": wrong},
    )
    quantlab.edit_env(service, set={name: good[name] for name in fixable})
    return fixable


# -- env files ---------------------------------------------------------------------------------------------


def _archiving_env_file(quantlab: QuantLabEnvironment) -> tuple[str, Path]:
    for service in ARCHIVING_SERVICES:
        try:
            wiring = quantlab.wiring(service)
        except HarnessError:
            continue
        if wiring.env_file is not None:
            return service, wiring.env_file
    pytest.skip(f"the target {quantlab.target.root} has no {' or '.join(ARCHIVING_SERVICES)} unit with an "
                "EnvironmentFile=, so there is no env file whose endpoint could be wrong")


def _with_env_file(quantlab: QuantLabEnvironment, env_file: Path) -> Runner:
    """Runs commands the way an operator does on the host: with the service's env file loaded."""

    def run(argv: Sequence[str], extra_env: Mapping[str, str] | None, timeout: float) -> CommandResult:
        values = {**EnvFile.read(env_file).values, **(extra_env or {})}
        return quantlab.run_command(argv, env=values, timeout=timeout)

    return run
