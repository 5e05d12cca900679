"""What runbook scenarios share: running the runbook's canary in an environment, and the canary's checks."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from canary.checks import (
    CanaryOutcome, CheckResult, Runner, canary_argv, check_archive, check_audit, check_canary_line, run_canary,
)
from canary.process import CommandResult
from harness.environment import QuantLabEnvironment
from harness.journal import Snapshot, snapshot
from harness.runbook import Runbook

DEFAULT_SYMBOLS = ("BTCUSDT", "ETHUSDT")


def runner(env: QuantLabEnvironment) -> Runner:
    """The canary checks' command runner, backed by the environment (its env, its checkout)."""

    def run(argv: Sequence[str], extra_env: Mapping[str, str] | None, timeout: float) -> CommandResult:
        return env.run_command(argv, env=extra_env, timeout=timeout)

    return run


def canary(env: QuantLabEnvironment, runbook: Runbook, *, seconds: int = 2, strategy: str = "steady",
           symbols: Sequence[str] | None = None, extra: Sequence[str] = (), extra_env: Mapping[str, str] | None = None,
           timeout: float = 60.0) -> CanaryOutcome:
    """The runbook's canary command as written, with a harness strategy file and a short duration."""
    if runbook.canary is None:
        raise AssertionError(f"the runbook {runbook.path} has no canary command")
    argv = canary_argv(runbook.canary.argv, env.strategy(strategy), symbols, seconds, extra)
    return run_canary(runner(env), argv, timeout, extra_env)


def canary_checks(env: QuantLabEnvironment, outcome: CanaryOutcome) -> list[CheckResult]:
    """The runbook's three expectations of a canary: PASS line, archive in S3, audit in the local spool."""
    results = [check_canary_line(outcome)]
    if outcome.run_id:
        results.append(check_archive(env.bucket, outcome.run_id))
        results.append(check_audit(env.audit_dir, outcome.run_id))
    return results


def failed(results: Sequence[CheckResult]) -> list[str]:
    return [f"{r.name}: {r.message}" for r in results if not r.ok]


def baseline(env: QuantLabEnvironment, runbook: Runbook) -> tuple[CanaryOutcome, Snapshot]:
    """A healthy canary run before the fault, and a snapshot of what it left, to prove later that nothing is lost."""
    outcome = canary(env, runbook)
    problems = failed(canary_checks(env, outcome))
    if problems:
        raise AssertionError(f"steady state not reached: the canary failed before any fault was injected: {problems}")
    return outcome, snapshot(env.audit_dir, env.bucket)


def evidence(outcome: CanaryOutcome) -> dict[str, Any]:
    return {"exit_code": outcome.result.code, "line": outcome.line, "duration_s": round(outcome.result.duration_s, 3)}


def now_snapshot(env: QuantLabEnvironment) -> Snapshot:
    return snapshot(env.audit_dir, env.bucket)
