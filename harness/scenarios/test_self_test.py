"""Health Checks: the self-test commands (ConfigCheck and SelfTest), run exactly as the runbook writes them.

The runbook: each prints JSON and exits 0 when all is well, 1 otherwise. They pass on a healthy host, and
each fails, then recovers, on the fault it exists to catch: a missing observer token, an unreachable bucket.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from canary.checks import CheckResult, Runner, check_config, check_self_test, run_self_test
from canary.process import CommandResult
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.experiment import Action, Experiment, Observation, Probe, command_observation, holds
from harness.journal import Journal
from harness.target import CONFIG_CHECK, SELF_TEST
from quantlab_chaos import items
from quantlab_chaos.runbook import Runbook, ShellCommand, Source

ITEM = items.SELF_TEST
DEADLINE_S = 20.0
# CONTRACT section 4: the self-test step that talks to the bucket first, and ConfigCheck's line for a missing name.
S3_STEP = "s3_reachable"
MISSING_LINE = "[config] {name} is required"
# CONTRACT section 4, used only when the runbook's prose states no exit codes.
DEFAULT_EXIT_CODES = (0, 1)
PROBE = "the runbook's self-test command"


@pytest.mark.runbook(ITEM)
def test_self_test_commands_as_written(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    journal.run(Experiment(
        f"{ITEM} (on a healthy host)",
        steady_state=[],
        checks=[passes(quantlab, runbook_model, command, "on a healthy host") for command in runbook_model.self_tests],
    ))


@pytest.mark.runbook(ITEM)
def test_config_check_missing_token(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    command = _command(runbook_model, CONFIG_CHECK)
    (_, failed_code), prose = _exit_codes(runbook_model)
    token = runbook_model.failure("observer-unauthorized").fix_ids.env_names[0]
    wanted = MISSING_LINE.format(name=token)
    # The shell the operator runs the command in: the fault takes the token out of it, the fix sets it again.
    unset: set[str] = set()

    def says_missing() -> Observation:
        started = kit.now()
        result = quantlab.run_command(command.argv, unset=sorted(unset), timeout=DEADLINE_S)
        return command_observation(result, result.code == failed_code and wanted in result.stderr.splitlines(),
                                   f"exit {result.code}; stderr: {result.stderr.strip()[-200:] or 'empty'}",
                                   started=started)

    journal.run(Experiment(
        f"{ITEM} ({token} missing)",
        steady_state=[passes(quantlab, runbook_model, command, "on a healthy host", unset=unset)],
        fault=[Action(f"{token} unset in the shell `{command.text}` runs in", lambda: unset.add(token))],
        symptom=[Probe(PROBE, says_missing,
                       holds(f"`{command.text}` exits {failed_code} and says `{wanted}`", prose or command.source))],
        fix=[Action(f"{token} set again in that shell (the host's token)", lambda: unset.discard(token))],
        recovery=[passes(quantlab, runbook_model, command, f"with {token} set again", unset=unset)],
    ))


@pytest.mark.runbook(ITEM)
def test_self_test_s3_down(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    command = _command(runbook_model, SELF_TEST)
    (_, failed_code), _ = _exit_codes(runbook_model)
    failure = runbook_model.failure("s3-archive-unreachable")

    def stops_at_s3() -> Observation:
        started = kit.now()
        outcome = run_self_test(_AsWritten(quantlab, command), DEADLINE_S)
        journal.measure("self_test_time_to_fail_s", round(outcome.result.duration_s, 3))
        return command_observation(
            outcome.result, outcome.result.code == failed_code and outcome.failed_step == S3_STEP,
            f"exit {outcome.result.code}; stopped at {outcome.failed_step}; steps passed: {outcome.steps or 'none'}; "
            f"error: {outcome.error}", {"steps": outcome.steps, "error": outcome.error}, started=started)

    journal.run(Experiment(
        f"{ITEM} (S3 down)",
        steady_state=[passes(quantlab, runbook_model, command, "on a healthy host")],
        fault=[Action("the S3 endpoint refuses connections (S3 proxy disabled)", quantlab.s3_proxy.disable)],
        # A self-test the harness had to stop at DEADLINE_S is a hung observation: it never counts as the symptom.
        symptom=[Probe(PROBE, stops_at_s3,
                       holds(f"Symptom: {failure.symptom} (`{command.text}` exits {failed_code} at its {S3_STEP} step)",
                             failure.symptom_source))],
        fix=[Action(f"Fix: {failure.fix}: the endpoint reachable again (S3 proxy enabled)", quantlab.s3_proxy.enable)],
        recovery=[passes(quantlab, runbook_model, command, f"after '{failure.fix}'", source=failure.fix_source)],
        rollbacks=[Action("the S3 proxy cleared", quantlab.s3_proxy.clear)],
    ))


# -- probes ------------------------------------------------------------------------------------------------


def passes(quantlab: QuantLabEnvironment, runbook: Runbook, command: ShellCommand, when: str, *,
           unset: Collection[str] = (), source: Source | None = None) -> Probe:
    """`command` as written (without the names in `unset`, read at each run) prints its ok JSON and exits with the
    runbook's ok code; judged against the prose line that gives the codes unless `source` says otherwise."""
    (ok_code, _), prose = _exit_codes(runbook)
    check = _check_for(command)

    def observe() -> Observation:
        started = kit.now()
        runner = _AsWritten(quantlab, command, sorted(unset))
        result = check(runner, DEADLINE_S)
        exit_code = result.evidence.get("exit_code")
        return command_observation(runner.last, result.ok and exit_code == ok_code, f"{result.message} (exit {exit_code})",
                                   {"command": command.text, **result.evidence}, started=started)

    return Probe(PROBE, observe,
                 holds(f"`{command.text}` {when} prints its ok JSON and exits {ok_code}", source or prose or command.source))


def _check_for(command: ShellCommand) -> Callable[[Runner, float], CheckResult]:
    if str(CONFIG_CHECK) in command.argv:
        return check_config
    if str(SELF_TEST) in command.argv:
        return check_self_test
    return _generic


def _generic(runner: Runner, timeout: float) -> CheckResult:
    """A self-test command the harness has no dedicated check for: it must print JSON and exit 0."""
    result = runner((), None, timeout)
    ok = result.code == 0 and bool(result.json_lines())
    return CheckResult("self_test_command", ok, f"exit {result.code}, {len(result.json_lines())} JSON line(s)",
                       evidence={"exit_code": result.code})


# -- the commands as written -------------------------------------------------------------------------------


@dataclass
class _AsWritten:
    """A runner for the canary checks that runs the runbook's command as written, whatever argv the check asks
    for; it keeps what the command did, so a probe can tell a command that exited from one the harness stopped."""

    quantlab: QuantLabEnvironment
    command: ShellCommand
    unset: Sequence[str] = ()
    last: CommandResult | None = None

    def __call__(self, _argv: Sequence[str], extra_env: Mapping[str, str] | None, timeout: float) -> CommandResult:
        self.last = self.quantlab.run_command(self.command.argv, env=extra_env, unset=self.unset, timeout=timeout)
        return self.last


def _command(runbook: Runbook, script: Path) -> ShellCommand:
    for command in runbook.self_tests:
        if str(script) in command.argv:
            return command
    pytest.skip(f"the runbook {runbook.path} lists no `node {script}` among its self-test commands")


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
