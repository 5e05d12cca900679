"""Most Common Failures: Budget/guard stops.

The runbook: a run ends with the stop reason its symptom names (one code for budgets, one for promotion guards);
the fix is to look over the budget and guard settings and read the audit trail in the spool path the fix names.
One test per cause (each budget of CONTRACT section 6, and the promotion guards): the cause is injected through
the canary's own env, the code must show everywhere QuantLab reports a stop (the canary line, /observer/runs,
the archived manifest, the RUN_STOP audit entry), the audit trail must say which limit fired, and with the
limits back at the runbook's Safety Defaults and a healthy strategy the run ends at its natural end again.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import json

import pytest

from canary.checks import (
    BUDGET_AUDIT_ACTION, GUARD_AUDIT_ACTION, CanaryOutcome, CheckResult, archive_keys, audit_entries, check_canary_run,
    check_limit_audited, check_manifest_stop_reason, check_run_stop_audited, check_run_stopped, find_run,
    run_self_test,
)
from canary.process import CommandResult
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.journal import Journal
from harness.ports import eventually
from harness.runbook import Failure, Runbook

ITEM = "failure:budget-guard-stops"
FAILURE = "budget-guard-stops"

# CONTRACT section 2 and 6: the env that sets each limit, the names the audit trail gives them, and the stop
# reason of a run that reached its natural end. The runbook names none of these, so they are QuantLab's facts.
MAX_EVENTS_ENV = "RUN_BUDGET_MAX_EVENTS"
MAX_SECONDS_ENV = "RUN_BUDGET_MAX_RUN_SECONDS"
MAX_RATE_ENV = "RUN_BUDGET_MAX_DECISIONS_PER_MIN"
GUARDS_ENABLED_ENV = "PROMOTION_GUARDS_ENABLED"
AUDIT_SPOOL_ENV = "AUDIT_SPOOL_DIR"
STREAM_END = "STREAM_END"
RUN_STOP_PLACES = ("canary line", "/observer/runs", "archive manifest", "RUN_STOP audit entry")

BUDGET, GUARD = "budget", "guard"
CANARY_TIMEOUT_S = 60.0
LOSING_QTY = 20_000  # one cent lower loses 200: past the max_loss default of 100 (10_000 lands on it, not past)
# How long the losing run may take to lose: the guard normally ends it within a second, so this bound only costs
# time when the market rises for a while (then a 4 s run could end STREAM_END first: a soak found one). The
# runbook sets no time for the stop, so a longer bound proves the same thing.
LOSING_RUN_S = 10
HEALTHY_RUN_S = 3  # long enough to clear the min_decisions guard with room to spare



@dataclass(frozen=True)
class Cause:
    """One way a limit stops a run: how to inject it, and what the audit trail must then name."""

    kind: str  # BUDGET or GUARD: which of the symptom's codes the stop must carry
    accepted: tuple[str, ...]  # metadata.budget / metadata.guard values that explain this stop
    describe: str
    inject: Callable[[QuantLabEnvironment, Runbook], Injected]


@dataclass
class Injected:
    outcome: CanaryOutcome
    evidence: dict[str, object] = field(default_factory=dict)


# -- the injections ------------------------------------------------------------------------------------------


def _inject_max_events(env: QuantLabEnvironment, runbook: Runbook) -> Injected:
    """A limit the feed's steady rate stays under for the whole run; a burst from the exchange crosses it."""
    seconds = 8
    per_second = env.exchange.rate + len(kit.DEFAULT_SYMBOLS)  # bookTicker/aggTrade rate + one mark price per symbol
    limit = int(per_second * seconds * 1.5) + 20
    burst = 2 * limit
    with _canary_in_background(env, runbook, seconds=seconds, extra_env={MAX_EVENTS_ENV: str(limit)}) as pending:
        connected = _new_connection(env, pending.known_connections)
        if connected:
            env.exchange.burst(burst)
    return Injected(pending.result(), {"limit": limit, "burst": burst, "natural_events_bound": per_second * seconds,
                                       "exchange_connected": connected})


def _inject_max_duration(env: QuantLabEnvironment, runbook: Runbook) -> Injected:
    outcome = kit.canary(env, runbook, seconds=4, extra_env={MAX_SECONDS_ENV: "1"}, timeout=CANARY_TIMEOUT_S)
    return Injected(outcome, {"limit_s": 1, "canary_s": 4})


def _inject_max_decision_rate(env: QuantLabEnvironment, runbook: Runbook) -> Injected:
    # Guards off so a chatty run's losing flips cannot end it before the rate budget does.
    outcome = kit.canary(env, runbook, seconds=4, strategy="chatty",
                         extra_env={MAX_RATE_ENV: "5", GUARDS_ENABLED_ENV: "0"}, timeout=CANARY_TIMEOUT_S)
    return Injected(outcome, {"limit_per_min": 5, "strategy": "chatty"})


def _inject_losing(env: QuantLabEnvironment, runbook: Runbook) -> Injected:
    # A size so large that the first dip of a cent below the entry crosses the max_loss guard's default; the
    # strategy's small round-trip losses alone do not always make a loss streak within seconds.
    config = json.dumps({"qty": LOSING_QTY})
    outcome = kit.canary(env, runbook, seconds=LOSING_RUN_S, strategy="losing", extra=("--strategy-config", config),
                         timeout=CANARY_TIMEOUT_S)
    return Injected(outcome, {"strategy": "losing", "strategy_config": config})


def _inject_silent(env: QuantLabEnvironment, runbook: Runbook) -> Injected:
    outcome = kit.canary(env, runbook, seconds=2, strategy="silent", timeout=CANARY_TIMEOUT_S)
    return Injected(outcome, {"strategy": "silent"})


CAUSES = {
    "max_events": Cause(BUDGET, ("max_events",), f"{MAX_EVENTS_ENV} small, then a burst of events from the exchange",
                        _inject_max_events),
    "max_duration": Cause(BUDGET, ("max_duration",), f"{MAX_SECONDS_ENV}=1 with a 4 s canary", _inject_max_duration),
    "max_decision_rate": Cause(BUDGET, ("max_decision_rate",), f"{MAX_RATE_ENV}=5 with a strategy deciding on every event",
                               _inject_max_decision_rate),
    "losing_strategy": Cause(GUARD, ("loss_streak", "max_loss"), f"a losing strategy trading {LOSING_QTY} lots",
                             _inject_losing),
    "silent_strategy": Cause(GUARD, ("min_decisions",), "a strategy that never decides", _inject_silent),
}


class _Pending:
    """A canary running in the background, and the exchange connections that existed before it."""

    def __init__(self, future: Future[CanaryOutcome], known_connections: set[int]) -> None:
        self._future = future
        self.known_connections = known_connections

    def result(self) -> CanaryOutcome:
        return self._future.result(timeout=CANARY_TIMEOUT_S + 10)


@contextmanager
def _canary_in_background(env: QuantLabEnvironment, runbook: Runbook, *, seconds: int,
                          extra_env: dict[str, str]) -> Iterator[_Pending]:
    """The runbook's canary in a thread, so the exchange can be driven while the run is live."""
    known = {c.id for c in env.exchange.record().connections}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="canary") as pool:
        future = pool.submit(kit.canary, env, runbook, seconds=seconds, extra_env=extra_env, timeout=CANARY_TIMEOUT_S)
        yield _Pending(future, known)


def _new_connection(env: QuantLabEnvironment, known: set[int]) -> bool:
    return eventually(lambda: [c for c in env.exchange.record().open_connections if c.id not in known], timeout=15)


# -- what the runbook says --------------------------------------------------------------------------------------


def _code(journal: Journal, failure: Failure, kind: str) -> str:
    """The symptom's code for budgets or for guards (the runbook names both in one symptom)."""
    codes = [code for code in failure.symptom_ids.codes if kind.upper() in code]
    journal.expect(bool(codes), expected=f"Symptom: {failure.symptom}",
                   actual=f"the symptom names no {kind} stop code (codes: {list(failure.symptom_ids.codes)})",
                   source=failure.symptom_source)
    return codes[0]


def _fix_limits(journal: Journal, runbook: Runbook, failure: Failure) -> dict[str, str]:
    """The Safety Defaults' env limits: the budget settings the fix asks to look over, at the runbook's values."""
    limits = {setting.name: setting.value for setting in runbook.env_limits}
    journal.expect(bool(limits), expected=f"Fix: {failure.fix}",
                   actual="the runbook's Safety Defaults give no env limits to set the budgets back to",
                   source=failure.fix_source)
    return limits


# -- where QuantLab reports a stop -------------------------------------------------------------------------------


def _stop_reports(env: QuantLabEnvironment, outcome: CanaryOutcome, code: str) -> list[CheckResult]:
    """The stop reason in the canary line, /observer/runs, the archive manifest and the RUN_STOP audit entry."""
    run_id = outcome.run_id or ""
    line_reason = (outcome.line or {}).get("stop_reason")
    line = CheckResult("canary_line_stop_reason", line_reason == code,
                       f"canary line ({outcome.status}, exit {outcome.result.code}) has stop_reason {line_reason}",
                       evidence={"line": outcome.line, "stderr_tail": outcome.result.stderr[-300:]})
    if not run_id:
        return [line]
    return [
        line,
        check_run_stopped(kit.observer_client(env), run_id, reason=code, within_s=2.0),
        check_manifest_stop_reason(env.bucket, run_id, reason=code),
        check_run_stop_audited(env.audit_dir, run_id, reason=code),
    ]


def _summary(results: list[CheckResult]) -> str:
    return "; ".join(f"{place}: {'ok' if r.ok else r.message}" for place, r in zip(RUN_STOP_PLACES, results))


def _prove(env: QuantLabEnvironment, runbook: Runbook, journal: Journal, cause: Cause) -> None:
    failure = runbook.failure(FAILURE)
    code = _code(journal, failure, cause.kind)
    limits = _fix_limits(journal, runbook, failure)

    with journal.steady_state("observer up; a healthy canary run archived and audited"):
        env.start("observer")
        _, before = kit.baseline(env, runbook)

    with journal.inject(cause.describe):
        injected = cause.inject(env, runbook)
    outcome = injected.outcome
    reports = _stop_reports(env, outcome, code)
    journal.symptom(
        len(reports) == len(RUN_STOP_PLACES) and all(r.ok for r in reports),
        expected=f"Symptom: {failure.symptom} (in the canary line, /observer/runs, the manifest and RUN_STOP)",
        actual=_summary(reports) if outcome.run_id else f"the canary reported no run: {_summary(reports)}",
        source=failure.symptom_source,
        evidence={**injected.evidence, **kit.evidence(outcome), "reports": [r.to_dict() for r in reports]},
    )

    with journal.fix(f"Fix: {failure.fix}"):
        action, key = (BUDGET_AUDIT_ACTION, "budget") if cause.kind == BUDGET else (GUARD_AUDIT_ACTION, "guard")
        explained = check_limit_audited(env.audit_dir, outcome.run_id or "", action, key, cause.accepted)
        journal.expect(explained.ok,
                       expected=f"Fix: {failure.fix} (the audit trail names the {key} that fired: {'/'.join(cause.accepted)})",
                       actual=explained.message, source=failure.fix_source, evidence=explained.evidence)
        healed = _healthy_canary(env, runbook, limits)
    problems = kit.failed(kit.canary_checks(env, healed) + [_natural_end(env, healed)])
    fired = [f"{e.get('action')} {e.get('reason')}" for e in audit_entries(env.audit_dir, healed.run_id or "")
             if e.get("action") in (BUDGET_AUDIT_ACTION, GUARD_AUDIT_ACTION)]
    journal.recovered(
        not problems,
        expected=f"after '{failure.fix}' (limits {limits}, a healthy strategy) the run ends with {STREAM_END}",
        actual=f"stop reason {(healed.line or {}).get('stop_reason')} (audit: {fired or 'no limit fired'}); "
               f"canary problems: {problems or 'none'}",
        source=failure.fix_source,
        evidence=kit.evidence(healed),
    )
    journal.nothing_lost(before, kit.now_snapshot(env))


def _healthy_canary(env: QuantLabEnvironment, runbook: Runbook, limits: dict[str, str]) -> CanaryOutcome:
    """The runbook's canary with the limits at the runbook's values and the harness's guard-safe `steady` strategy."""
    return kit.canary(env, runbook, seconds=HEALTHY_RUN_S, extra_env=limits, timeout=CANARY_TIMEOUT_S)


def _natural_end(env: QuantLabEnvironment, outcome: CanaryOutcome) -> CheckResult:
    """The canary checks' stricter run check: every symbol fed the run and it stopped at its natural end."""
    run_id = outcome.run_id or ""
    decisions = None
    if run_id:
        key = next(k for k in archive_keys(run_id) if k.endswith("decisions.jsonl"))
        decisions = env.bucket.read_lines(key) if env.bucket.head(key) is not None else None
    record = find_run(kit.observer_client(env), run_id) if run_id else None
    return check_canary_run(outcome, kit.DEFAULT_SYMBOLS, decisions, record, expected_stop_reasons=(STREAM_END,))


# -- the scenarios -----------------------------------------------------------------------------------------------


@pytest.mark.runbook(ITEM)
def test_budget_max_events_stops_the_run(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    _prove(quantlab, runbook_model, journal, CAUSES["max_events"])


@pytest.mark.runbook(ITEM)
def test_budget_max_duration_stops_the_run(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    _prove(quantlab, runbook_model, journal, CAUSES["max_duration"])


@pytest.mark.runbook(ITEM)
def test_budget_max_decision_rate_stops_the_run(quantlab: QuantLabEnvironment, runbook_model: Runbook,
                                                journal: Journal) -> None:
    _prove(quantlab, runbook_model, journal, CAUSES["max_decision_rate"])


@pytest.mark.runbook(ITEM)
def test_promotion_guard_stops_a_losing_strategy(quantlab: QuantLabEnvironment, runbook_model: Runbook,
                                                 journal: Journal) -> None:
    _prove(quantlab, runbook_model, journal, CAUSES["losing_strategy"])


@pytest.mark.runbook(ITEM)
def test_promotion_guard_stops_a_silent_strategy(quantlab: QuantLabEnvironment, runbook_model: Runbook,
                                                 journal: Journal) -> None:
    _prove(quantlab, runbook_model, journal, CAUSES["silent_strategy"])


@pytest.mark.runbook(ITEM)
def test_fix_names_the_default_audit_spool(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    """The fix's spool path is where QuantLab spools audit entries when AUDIT_SPOOL_DIR is not set.

    Observed, not assumed: the self-test's audit_spool step writes (and deletes) a probe file in today's folder
    of the default spool and reports that folder. What the probe leaves (empty folders) is removed again.
    """
    failure = runbook_model.failure(FAILURE)
    paths = [p for p in failure.fix_ids.paths if "audit" in p.lower()] or list(failure.fix_ids.paths)
    journal.expect(bool(paths), expected=f"Fix: {failure.fix}", actual="the fix names no audit spool path",
                   source=failure.fix_source)
    named = Path(paths[0].rstrip("/") or "/")
    with journal.step("check", f"run the self-test with {AUDIT_SPOOL_ENV} unset and see where it spools"):
        default, how = _default_spool(quantlab, named)
    journal.measure("default_audit_spool", {"path": str(default) if default else None, "how": how})
    journal.expect(
        default is not None and default == named,
        expected=f"Fix: {failure.fix} (the path is QuantLab's default {AUDIT_SPOOL_ENV})",
        actual=f"QuantLab's default audit spool is {default} ({how})" if default else how,
        source=failure.fix_source,
        evidence={"named": str(named), "default": str(default) if default else None, "how": how},
    )


def _default_spool(env: QuantLabEnvironment, named: Path) -> tuple[Path | None, str]:
    """(the target's default spool folder, how it was found)."""
    existed = {folder: folder.exists() for folder in (named, *named.parents)}
    existed.update({child: True for child in (named.iterdir() if named.is_dir() else ())})

    def without_spool_env(argv, extra, timeout) -> CommandResult:  # type: ignore[no-untyped-def]
        # Archiving off: the probe must not depend on S3, only on where the spool goes.
        return env.run_command(argv, env={**(extra or {}), "RUN_ARCHIVE_ENABLED": "0"}, unset=(AUDIT_SPOOL_ENV,),
                               timeout=timeout)

    outcome = run_self_test(without_spool_env, timeout=30.0)
    reported = [line.get("dir") for line in outcome.result.json_lines()
                if line.get("event") == "self_test" and line.get("step") == "audit_spool" and line.get("dir")]
    if reported:
        day_folder = Path(str(reported[0]))
        _remove_probe_leftovers(day_folder, existed)
        return day_folder.parent, "reported by the self-test's audit_spool step"
    source = _default_in_source(env.target.root, str(named))
    if source:
        return named, f"not reported by the self-test (steps: {outcome.steps}); the literal is in {source}"
    return None, (f"the self-test did not report its spool folder (exit {outcome.result.code}, steps {outcome.steps}) "
                  f"and no source file that reads {AUDIT_SPOOL_ENV} contains {named}")


def _remove_probe_leftovers(day_folder: Path, existed: dict[Path, bool]) -> None:
    """Removes the empty folders the probe created (never one that existed before, never one with files)."""
    for folder in (day_folder, day_folder.parent):
        # Unlisted under a folder we listed means new; anywhere else we cannot tell, so it stays.
        if existed.get(folder, folder.parent not in existed):
            continue
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty: someone else writes there now


def _default_in_source(root: Path, literal: str) -> str | None:
    for path in sorted(root.rglob("*")):
        if "node_modules" in path.parts or path.suffix not in (".js", ".mjs", ".cjs", ".ts", ".py") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if AUDIT_SPOOL_ENV in text and literal.rstrip("/") in text:
            return str(path.relative_to(root))
    return None

