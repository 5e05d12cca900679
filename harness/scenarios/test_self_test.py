"""Health Checks: the self-test commands (ConfigCheck and SelfTest), run exactly as the runbook writes them.

The runbook: each prints JSON and exits 0 when all is well, 1 otherwise. They pass on a healthy host, and
each fails, then recovers, on the fault it exists to catch: a missing observer token, an unreachable bucket.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from canary.checks import CheckResult, Runner, check_config, check_self_test, run_self_test
from canary.process import CommandResult
from harness.environment import QuantLabEnvironment
from harness.journal import Journal
from harness.runbook import Runbook, ShellCommand, Source
from harness.target import CONFIG_CHECK, SELF_TEST

ITEM = "self-test"
DEADLINE_S = 20.0
# CONTRACT section 4: the self-test step that talks to the bucket first, and ConfigCheck's line for a missing name.
S3_STEP = "s3_reachable"
MISSING_LINE = "[config] {name} is required"
# CONTRACT section 4, used only when the runbook's prose states no exit codes.
DEFAULT_EXIT_CODES = (0, 1)


def _command(runbook: Runbook, script: Path) -> ShellCommand:
    for command in runbook.self_tests:
        if str(script) in command.argv:
            return command
    pytest.skip(f"the runbook {runbook.path} lists no `node {script}` among its self-test commands")


def _as_written(quantlab: QuantLabEnvironment, command: ShellCommand, unset: Sequence[str] = ()) -> Runner:
    """A runner for the canary checks that runs the runbook's command as written, whatever argv the check asks for."""

    def run(_argv: Sequence[str], extra_env: Mapping[str, str] | None, timeout: float) -> CommandResult:
        return quantlab.run_command(command.argv, env=extra_env, unset=unset, timeout=timeout)

    return run


def _exit_codes(runbook: Runbook) -> tuple[tuple[int, int], Source | None]:
    """(ok, failed) exit codes from the prose above the self-test commands ("exits 0 when ..., 1 otherwise")."""
    lines = runbook.path.read_text(encoding="utf-8").splitlines()
    first = runbook.self_tests[0].source.line - 1
    for index in range(first - 1, -1, -1):
        text = lines[index]
        if not text.strip() or text.startswith("#"):
            break
        found = re.search(r"exits?\s+(\d+)\D+?(\d+)", text)
        if found:
            return (int(found.group(1)), int(found.group(2))), Source(index + 1, text)
    return DEFAULT_EXIT_CODES, None


def _expect_passes(journal: Journal, quantlab: QuantLabEnvironment, runbook: Runbook, command: ShellCommand,
                   when: str) -> CheckResult:
    (ok_code, _), prose = _exit_codes(runbook)
    runner = _as_written(quantlab, command)
    result = check_config(runner, DEADLINE_S) if str(CONFIG_CHECK) in command.argv else (
        check_self_test(runner, DEADLINE_S) if str(SELF_TEST) in command.argv else _generic(runner))
    exit_code = result.evidence.get("exit_code")
    journal.expect(
        result.ok and exit_code == ok_code,
        expected=f"`{command.text}` {when} prints its ok JSON and exits {ok_code}",
        actual=f"{result.message} (exit {exit_code})",
        source=prose or command.source,
        evidence={"command": command.text, **result.evidence},
    )
    return result


def _generic(runner: Runner) -> CheckResult:
    """A self-test command the harness has no dedicated check for: it must print JSON and exit 0."""
    result = runner((), None, DEADLINE_S)
    ok = result.code == 0 and bool(result.json_lines())
    return CheckResult("self_test_command", ok, f"exit {result.code}, {len(result.json_lines())} JSON line(s)",
                       evidence={"exit_code": result.code})


@pytest.mark.runbook(ITEM)
def test_self_test_commands_as_written(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    with journal.steady_state("a configured host: token, archive settings, spool, reachable bucket"):
        pass
    for command in runbook_model.self_tests:
        with journal.step("command", command.text):
            _expect_passes(journal, quantlab, runbook_model, command, "on a healthy host")


@pytest.mark.runbook(ITEM)
def test_config_check_missing_token(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    command = _command(runbook_model, CONFIG_CHECK)
    (_, failed_code), prose = _exit_codes(runbook_model)
    token = runbook_model.failure("observer-unauthorized").fix_ids.env_names[0]
    wanted = MISSING_LINE.format(name=token)

    with journal.steady_state(f"`{command.text}` passes"):
        _expect_passes(journal, quantlab, runbook_model, command, "before the fault")

    with journal.inject(f"{token} missing from the environment"):
        result = quantlab.run_command(command.argv, unset=[token], timeout=DEADLINE_S)
    journal.symptom(
        result.code == failed_code and wanted in result.stderr.splitlines(),
        expected=f"`{command.text}` exits {failed_code} and says `{wanted}`",
        actual=f"exit {result.code}; stderr: {result.stderr.strip()[-200:] or 'empty'}",
        source=prose or command.source,
        evidence={"exit_code": result.code},
    )

    with journal.fix(f"{token} set again"):
        recovered = check_config(_as_written(quantlab, command), DEADLINE_S)
    journal.recovered(recovered.ok, expected=f"with {token} set, `{command.text}` passes", actual=recovered.message,
                      source=command.source, evidence=recovered.evidence)


@pytest.mark.runbook(ITEM)
def test_self_test_s3_down(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    command = _command(runbook_model, SELF_TEST)
    (_, failed_code), prose = _exit_codes(runbook_model)
    failure = runbook_model.failure("s3-archive-unreachable")

    with journal.steady_state(f"`{command.text}` passes"):
        _expect_passes(journal, quantlab, runbook_model, command, "before the fault")

    with journal.inject("the S3 endpoint refuses connections (S3 proxy disabled)"):
        quantlab.s3_proxy.disable()
        outcome = run_self_test(_as_written(quantlab, command), DEADLINE_S)
    journal.measure("self_test_time_to_fail_s", round(outcome.result.duration_s, 3))
    journal.symptom(
        outcome.result.code == failed_code and outcome.failed_step == S3_STEP,
        expected=f"`{command.text}` exits {failed_code}, stopped at {S3_STEP} ({failure.symptom})",
        actual=f"exit {outcome.result.code}; stopped at {outcome.failed_step}; steps passed: {outcome.steps or 'none'}; "
               f"error: {outcome.error}",
        source=failure.symptom_source,
        evidence={"steps": outcome.steps, "error": outcome.error, "timed_out": outcome.result.timed_out},
    )

    with journal.fix("the S3 endpoint reachable again"):
        quantlab.s3_proxy.enable()
    recovered = check_self_test(_as_written(quantlab, command), DEADLINE_S)
    journal.recovered(recovered.ok, expected=f"with S3 reachable, `{command.text}` passes every step",
                      actual=recovered.message, source=failure.fix_source, evidence=recovered.evidence)
