"""Which checks a canary run does, in what order, within one hard deadline.

Read-only by default: the observer checks, then (when the checkout is configured) the config check and the
self-test on the host, then archive and audit for a given run id. Only `--live` starts anything: one
canary run of our own.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from canary.checks import (
    CheckResult,
    Fixes,
    ObserverClient,
    check_archive,
    check_audit,
    check_config,
    check_health_fields,
    check_observer_auth,
    check_runs_listing,
    check_self_test,
)
from canary.config import CONTRACT_CANARY_ARGV, CanaryConfig, ConfigProblem
from canary.live import RUN_ID, live_canary
from canary.process import CommandNotFound
from canary.runner import Deadline, LocalRunner, S3ArchiveProbe, archive_probe, command_env
from quantlab_chaos import items
from quantlab_chaos.errors import HarnessError
from quantlab_chaos.runbook import load_runbook

OBSERVER_CHECKS = ("observer_auth", "runs_listing", "health_fields")
HOST_CHECKS = ("config_check", "self_test")
CHECK_NAMES = (*OBSERVER_CHECKS, *HOST_CHECKS, "canary", "archive", "audit")
CONFIG_CHECK_TIMEOUT_S = 30.0
SELF_TEST_TIMEOUT_S = 60.0


class DeadlineExceeded(BaseException):
    """The hard deadline passed mid-check. A BaseException, so no check's `except Exception` swallows it."""


@dataclass(frozen=True)
class RunbookContext:
    """What the runbook gives the canary: the fix for each failure, and the canary command as written."""

    fixes: dict[str, str] = field(default_factory=lambda: dict(items.DEFAULT_FIXES))
    canary_argv: tuple[str, ...] = CONTRACT_CANARY_ARGV
    source: str = "built-in"


def runbook_context(config: CanaryConfig) -> RunbookContext:
    """Fix texts and the canary command from the configured runbook; the contract's when none is configured."""
    if config.runbook is None:
        return RunbookContext()
    try:
        runbook = load_runbook(config.runbook)
    except HarnessError as exc:
        raise ConfigProblem([f"[target] runbook: {exc}"]) from None
    fixes = dict(items.DEFAULT_FIXES)
    fixes.update({items.failure_item(failure.id): failure.fix for failure in runbook.failures})
    argv = runbook.canary.argv if runbook.canary is not None else CONTRACT_CANARY_ARGV
    return RunbookContext(fixes, tuple(argv), str(config.runbook))


def plan(config: CanaryConfig, requested: Sequence[str] | None, *, live: bool, run_id: str | None) -> list[str]:
    """The checks to run, in order; ConfigProblem names each check that cannot run with this config and flags."""
    names = [name for name in CHECK_NAMES if name in requested] if requested else _default_checks(config, live, run_id)
    problems = _plan_problems(config, names, live, run_id)
    if problems:
        raise ConfigProblem(problems)
    return names


def _default_checks(config: CanaryConfig, live: bool, run_id: str | None) -> list[str]:
    names = list(OBSERVER_CHECKS)
    names += list(HOST_CHECKS) if config.quantlab_root is not None else []
    names += ["canary"] if live else []
    names += ["archive", "audit"] if run_id else []
    return names


def _plan_problems(config: CanaryConfig, names: Sequence[str], live: bool, run_id: str | None) -> list[str]:
    problems = []
    needs_root = [name for name in names if name in (*HOST_CHECKS, "canary")]
    if needs_root and config.quantlab_root is None:
        problems.append(f"{', '.join(needs_root)} run(s) QuantLab's commands on this host: set [target] quantlab_root "
                        "to the checkout.")
    elif needs_root and shutil.which("node", path=command_env(config)["PATH"]) is None:
        problems.append("node is not on PATH for QuantLab's commands; install Node.js 20 or set PATH in an env file.")
    if "canary" in names and not live:
        problems.append("the canary check starts a live canary run: add --live to allow it.")
    if "canary" in names and config.s3 is None:
        problems.append("the live canary checks the run's archive: add an [s3] section (endpoint, bucket, keys).")
    if "archive" in names and config.s3 is None:
        problems.append("the archive check needs an [s3] section (endpoint, bucket, keys).")
    if any(name in names for name in ("archive", "audit")) and not run_id:
        problems.append("the archive and audit checks need the run: pass --run-id LIVE_RUN_ID (or use --live, whose "
                        "canary checks its own run's archive and audit).")
    if run_id and not RUN_ID.match(run_id):
        problems.append(f"--run-id {run_id!r} is not a run id (letters, digits, '.', '_' and '-').")
    return problems


@dataclass
class Suite:
    """One canary run's checks, sharing the observer client, the host runner and the archive probe."""

    config: CanaryConfig
    deadline: Deadline
    runbook: RunbookContext = field(default_factory=RunbookContext)
    run_id: str | None = None

    def __post_init__(self) -> None:
        config = self.config
        self.client = ObserverClient(config.observer_url, config.token, timeout=config.http_timeout_s, retries=config.retries)
        self.runner = LocalRunner(config.quantlab_root, command_env(config), self.deadline) if config.quantlab_root else None
        self.probe: S3ArchiveProbe | None = archive_probe(config, self.deadline)

    def prepare(self, names: Sequence[str]) -> None:
        """Work that need not wait for the live run: building the S3 client (importing boto3) takes a few tenths
        of a second, which would otherwise sit between the run's end and the verdict."""
        if self.probe is not None and any(name in ("canary", "archive") for name in names):
            self.probe.client()

    @property
    def fixes(self) -> Fixes:
        return self.runbook.fixes

    def run(self, names: Sequence[str]) -> list[CheckResult]:
        """Every named check, in order; what the deadline cuts off is reported as failed, not dropped."""
        results: list[CheckResult] = []
        self.prepare(names)
        for index, name in enumerate(names):
            if self.deadline.expired:
                results += [self._not_run(rest) for rest in names[index:]]
                break
            try:
                results += self._one(name)
            except DeadlineExceeded:
                results.append(CheckResult(name, False, f"stopped by the hard deadline of {self.deadline.seconds:g} s",
                                           _DEADLINE_FIX))
                results += [self._not_run(rest) for rest in names[index + 1:]]
                break
            except CommandNotFound as exc:
                results.append(CheckResult(name, False, str(exc), "install Node.js 20 on this host"))
        return results

    def _one(self, name: str) -> list[CheckResult]:
        self.client.timeout = self.deadline.bound(self.config.http_timeout_s)
        return _CHECKS[name](self)

    def _not_run(self, name: str) -> CheckResult:
        return CheckResult(name, False, f"not run: the hard deadline of {self.deadline.seconds:g} s had passed", _DEADLINE_FIX)


_DEADLINE_FIX = "raise --timeout (or [run] timeout_s), or find out what made the checks before it slow"


def _observer_auth(suite: Suite) -> list[CheckResult]:
    return [check_observer_auth(suite.client, fixes=suite.fixes)]


def _runs_listing(suite: Suite) -> list[CheckResult]:
    return [check_runs_listing(suite.client, fixes=suite.fixes)]


def _health_fields(suite: Suite) -> list[CheckResult]:
    return [check_health_fields(suite.client, suite.config.max_health_event_age_ms, fixes=suite.fixes)]


def _config_check(suite: Suite) -> list[CheckResult]:
    assert suite.runner is not None  # plan() requires the checkout
    return [check_config(suite.runner, suite.deadline.bound(CONFIG_CHECK_TIMEOUT_S), fixes=suite.fixes)]


def _self_test(suite: Suite) -> list[CheckResult]:
    assert suite.runner is not None
    return [check_self_test(suite.runner, suite.deadline.bound(SELF_TEST_TIMEOUT_S), fixes=suite.fixes)]


def _canary(suite: Suite) -> list[CheckResult]:
    assert suite.runner is not None and suite.probe is not None
    stop_client = ObserverClient(suite.config.observer_url, suite.config.token, retries=1)
    return live_canary(suite.config, suite.runner, suite.client, suite.probe, suite.runbook.canary_argv, suite.deadline,
                       suite.fixes, stop_client=stop_client)


def _archive(suite: Suite) -> list[CheckResult]:
    assert suite.probe is not None and suite.run_id is not None
    return [check_archive(suite.probe, suite.run_id, fixes=suite.fixes)]


def _audit(suite: Suite) -> list[CheckResult]:
    assert suite.run_id is not None
    return [check_audit(Path(suite.config.spool_dir), suite.run_id, fixes=suite.fixes)]


_CHECKS: dict[str, Callable[[Suite], list[CheckResult]]] = {
    "observer_auth": _observer_auth, "runs_listing": _runs_listing, "health_fields": _health_fields,
    "config_check": _config_check, "self_test": _self_test, "canary": _canary, "archive": _archive, "audit": _audit,
}
