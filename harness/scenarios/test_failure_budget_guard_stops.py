"""Most Common Failures: Budget/guard stops.

The runbook: a run ends with the stop reason its symptom names (one code for budgets, one for promotion guards);
the fix is to look over the budget and guard settings and read the audit trail in the spool path the fix names.
One experiment per cause (each budget of CONTRACT section 6, and the promotion guards): the fault is the cause,
injected into the canary run's own env or strategy (and, for the event budget, a burst from the exchange while
the run is live); the symptom is the code in each place QuantLab reports a stop (the canary line, /observer/runs,
the archived manifest, the RUN_STOP audit entry; one probe each, so every place that disagrees is reported) and
the audit trail naming the limit that fired; the fix sets that run's limits to the runbook's Safety Defaults with
a healthy strategy, and the recovery is the same run, so fixed, ending at its natural end.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from canary.checks import CanaryOutcome, CheckResult, archive_keys, audit_entries, check_canary_run, run_self_test
from canary.process import CommandResult
from canary.stops import (
    BUDGET_AUDIT_ACTION,
    GUARD_AUDIT_ACTION,
    check_limit_audited,
    check_manifest_stop_reason,
    check_run_stop_audited,
    find_run,
)
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.experiment import (
    Action,
    Experiment,
    Observation,
    Probe,
    Slot,
    Tolerance,
    command_observation,
    holds,
)
from harness.journal import Journal, violation
from quantlab_chaos import items
from quantlab_chaos.runbook import Failure, Runbook
from quantlab_chaos.waiting import eventually

ITEM = items.BUDGET_GUARD_STOPS
FAILURE = "budget-guard-stops"

# CONTRACT section 2 and 6: the env that sets each limit, the names the audit trail gives them, and the stop
# reason of a run that reached its natural end. The runbook names none of these, so they are QuantLab's facts.
MAX_EVENTS_ENV = "RUN_BUDGET_MAX_EVENTS"
MAX_SECONDS_ENV = "RUN_BUDGET_MAX_RUN_SECONDS"
MAX_RATE_ENV = "RUN_BUDGET_MAX_DECISIONS_PER_MIN"
GUARDS_ENABLED_ENV = "PROMOTION_GUARDS_ENABLED"
AUDIT_SPOOL_ENV = "AUDIT_SPOOL_DIR"
STREAM_END = kit.NATURAL_END

BUDGET, GUARD = "budget", "guard"
CANARY_TIMEOUT_S = 60.0  # the harness kills a canary run past this: a hung run, never the symptom
RUN_DEADLINE_S = CANARY_TIMEOUT_S + 10  # waiting for the background run: its own kill, then a margin
LISTING_DEADLINE_S = 2.0  # /observer/runs shows the ended run this soon after the canary exits
CONNECT_DEADLINE_S = 15.0
LOSING_QTY = 20_000  # one cent lower loses 200: past the max_loss default of 100 (10_000 lands on it, not past)
# How long the losing run may take to lose: the guard normally ends it within a second, so this bound only costs
# time when the market rises for a while (then a 4 s run could end STREAM_END first: a soak found one). The
# runbook sets no time for the stop, so a longer bound proves the same thing.
LOSING_RUN_S = 10
HEALTHY_RUN_S = 3  # long enough to clear the min_decisions guard with room to spare
EVENTS_RUN_S = 8


@dataclass
class RunConfig:
    """What the canary run is started with. The fault puts the cause in, the fix sets the same run's limits back,
    and the recovery runs it as fixed."""

    strategy: str = "steady"
    seconds: int = HEALTHY_RUN_S
    extra_env: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()

    def take(self, other: RunConfig) -> None:
        self.strategy, self.seconds, self.extra_env, self.extra = (
            other.strategy, other.seconds, dict(other.extra_env), other.extra)

    def describe(self) -> str:
        settings = " ".join(f"{name}={value}" for name, value in self.extra_env.items())
        return f"strategy {self.strategy}, {self.seconds} s" + (f", {settings}" if settings else "")


@dataclass(frozen=True)
class Cause:
    """One way a limit stops a run: the run that injects it, and what the audit trail must then name."""

    kind: str  # BUDGET or GUARD: which of the symptom's codes the stop must carry
    accepted: tuple[str, ...]  # metadata.budget / metadata.guard values that explain this stop
    describe: str
    config: Callable[[QuantLabEnvironment], RunConfig]
    burst: bool = False  # a burst of events from the exchange once the run is connected


def _events_limit(env: QuantLabEnvironment) -> int:
    """A limit the feed's steady rate stays under for the whole run; a burst from the exchange crosses it."""
    per_second = env.exchange.rate + len(kit.DEFAULT_SYMBOLS)  # bookTicker/aggTrade rate + one mark price per symbol
    return int(per_second * EVENTS_RUN_S * 1.5) + 20


CAUSES = {
    "max_events": Cause(BUDGET, ("max_events",), f"{MAX_EVENTS_ENV} small, then a burst of events from the exchange",
                        lambda env: RunConfig(seconds=EVENTS_RUN_S, extra_env={MAX_EVENTS_ENV: str(_events_limit(env))}),
                        burst=True),
    "max_duration": Cause(BUDGET, ("max_duration",), f"{MAX_SECONDS_ENV}=1 with a 4 s canary",
                          lambda env: RunConfig(seconds=4, extra_env={MAX_SECONDS_ENV: "1"})),
    # Guards off so a chatty run's losing flips cannot end it before the rate budget does.
    "max_decision_rate": Cause(BUDGET, ("max_decision_rate",), f"{MAX_RATE_ENV}=5 with a strategy deciding on every event",
                               lambda env: RunConfig("chatty", 4, {MAX_RATE_ENV: "5", GUARDS_ENABLED_ENV: "0"})),
    # A size so large that the first dip of a cent below the entry crosses the max_loss guard's default; the
    # strategy's small round-trip losses alone do not always make a loss streak within seconds.
    "losing_strategy": Cause(GUARD, ("loss_streak", "max_loss"), f"a losing strategy trading {LOSING_QTY} lots",
                             lambda env: RunConfig("losing", LOSING_RUN_S,
                                                   extra=("--strategy-config", json.dumps({"qty": LOSING_QTY})))),
    "silent_strategy": Cause(GUARD, ("min_decisions",), "a strategy that never decides",
                             lambda env: RunConfig("silent", 2)),
}


# -- the run the fault starts --------------------------------------------------------------------------------


class BackgroundRun:
    """The runbook's canary started by the fault, in a thread, so the exchange can be driven while it is live."""

    def __init__(self, future: Future[CanaryOutcome], started: float) -> None:
        self._future = future
        self.started = started

    def outcome(self) -> CanaryOutcome:
        """The finished run. Its own timeout kills it at CANARY_TIMEOUT_S (a hung observation); waiting longer
        than RUN_DEADLINE_S after its start is a TimeoutError, an observation that does not hold."""
        try:
            return self._future.result(timeout=max(0.0, self.started + RUN_DEADLINE_S - kit.now()))
        except TimeoutError:
            raise TimeoutError(f"the canary run the fault started did not end within {RUN_DEADLINE_S:g} s") from None


@contextmanager
def _in_background(env: QuantLabEnvironment, runbook: Runbook, config: RunConfig) -> Iterator[BackgroundRun]:
    """Left with the experiment's rollbacks: waits for the run (bounded by its own timeout)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="canary") as pool:
        started = kit.now()
        yield BackgroundRun(pool.submit(_canary, env, runbook, config), started)


def _canary(env: QuantLabEnvironment, runbook: Runbook, config: RunConfig) -> CanaryOutcome:
    return kit.canary(env, runbook, seconds=config.seconds, strategy=config.strategy, extra=config.extra,
                      extra_env=config.extra_env, timeout=CANARY_TIMEOUT_S)


def _inject(journal: Journal, env: QuantLabEnvironment, runbook: Runbook, cause: Cause, config: RunConfig,
            run: Slot[BackgroundRun]) -> None:
    """The fault: the canary run started with the cause (and, for the event budget, a burst once it is connected)."""
    known = {c.id for c in env.exchange.record().connections}
    config.take(cause.config(env))
    journal.measure("fault_run", config.describe())
    run.set(journal.enter(_in_background(env, runbook, config)))
    if not cause.burst:
        return
    connected = eventually(lambda: [c for c in env.exchange.record().open_connections if c.id not in known],
                           timeout=CONNECT_DEADLINE_S)
    if not connected:
        raise AssertionError(f"the canary's run opened no exchange connection within {CONNECT_DEADLINE_S:g} s, so "
                             "no burst of events could reach it")
    limit = int(config.extra_env[MAX_EVENTS_ENV])
    env.exchange.burst(2 * limit)
    journal.measure("burst", {"limit": limit, "events": 2 * limit,
                              "natural_events_bound": (env.exchange.rate + len(kit.DEFAULT_SYMBOLS)) * EVENTS_RUN_S})


def _fix(failure: Failure, limits: dict[str, str], config: RunConfig) -> None:
    """The fix on the run the fault changed: its limits replaced by the Safety Defaults' values (what the fault
    set goes), and the harness's guard-safe `steady` strategy."""
    if not limits:
        raise violation(failure.fix_source, f"Fix: {failure.fix}",
                        "the runbook's Safety Defaults give no env limits to set the budgets back to")
    config.take(RunConfig(extra_env=limits))


# -- where QuantLab reports a stop: one probe each -----------------------------------------------------------


def _stopped_as(run: Slot[BackgroundRun], check: Callable[[CanaryOutcome], CheckResult]) -> Callable[[], Observation]:
    """An observation of the ended run, seen at the canary's exit; hung when the harness had to kill it."""

    def observe() -> Observation:
        background = run.value
        outcome = background.outcome()
        result = check(outcome) if outcome.run_id else _no_run(outcome)
        return command_observation(outcome.result, result.ok, result.message, result.evidence,
                                   started=background.started)

    return observe


def _no_run(outcome: CanaryOutcome) -> CheckResult:
    return CheckResult("run_id", False, f"the canary reported no run ({outcome.status or 'no canary line'}, exit "
                       f"{outcome.result.code}): {outcome.result.stderr[-200:]}", evidence=kit.evidence(outcome))


def _canary_line(code: str) -> Callable[[CanaryOutcome], CheckResult]:
    def check(outcome: CanaryOutcome) -> CheckResult:
        reason = (outcome.line or {}).get("stop_reason")
        return CheckResult("canary_line_stop_reason", reason == code,
                           f"canary line ({outcome.status}, exit {outcome.result.code}) has stop_reason {reason}",
                           evidence={"line": outcome.line, "stderr_tail": outcome.result.stderr[-300:]})

    return check


def _listed(env: QuantLabEnvironment, run: Slot[BackgroundRun], code: str) -> Callable[[], Observation]:
    """/observer/runs, polled: the run is listed, no longer RUNNING, with the stop code."""

    def observe() -> Observation:
        background = run.value
        outcome = background.outcome()
        if not outcome.run_id or outcome.result.timed_out:
            seen = _no_run(outcome).message if not outcome.run_id else f"run {outcome.run_id} not looked up"
            return command_observation(outcome.result, False, seen, started=background.started)
        record = find_run(kit.observer_client(env), outcome.run_id)
        status, reason = (record or {}).get("status"), (record or {}).get("stop_reason")
        seen = (f"run {outcome.run_id} is not listed in /observer/runs" if record is None else
                f"run {outcome.run_id} is listed {status} with stop reason {reason}")
        return Observation(record is not None and status != "RUNNING" and reason == code, seen,
                           {"status": status, "stop_reason": reason})

    return observe


def _symptom(env: QuantLabEnvironment, failure: Failure, cause: Cause, code: str,
             run: Slot[BackgroundRun]) -> list[Probe]:
    def says(place: str) -> Tolerance:
        return holds(f"Symptom: {failure.symptom} ({code} in {place})", failure.symptom_source)

    action, key = (BUDGET_AUDIT_ACTION, "budget") if cause.kind == BUDGET else (GUARD_AUDIT_ACTION, "guard")
    return [
        Probe("the canary line", _stopped_as(run, _canary_line(code)), says("the canary line")),
        Probe("/observer/runs", _listed(env, run, code), says("/observer/runs"), deadline_s=LISTING_DEADLINE_S),
        Probe("the archived manifest", _stopped_as(run, lambda o: check_manifest_stop_reason(env.bucket, o.run_id or "",
                                                                                             reason=code)),
              says("the archived manifest")),
        Probe("the RUN_STOP audit entry", _stopped_as(run, lambda o: check_run_stop_audited(env.audit_dir, o.run_id or "",
                                                                                           reason=code)),
              says("the run's RUN_STOP audit entry")),
        Probe("the audit trail", _stopped_as(run, lambda o: check_limit_audited(env.audit_dir, o.run_id or "", action,
                                                                               key, cause.accepted)),
              holds(f"Fix: {failure.fix} (the audit trail names the {key} that fired: {'/'.join(cause.accepted)})",
                    failure.fix_source)),
    ]


# -- recovery ------------------------------------------------------------------------------------------------


def _recovered(env: QuantLabEnvironment, runbook: Runbook, config: RunConfig) -> Callable[[], Observation]:
    """The run as the fix left it passes the canary's checks and ends at its natural end, every symbol fed."""

    def observe() -> Observation:
        started = kit.now()
        outcome = _canary(env, runbook, config)
        problems = kit.failed([*kit.canary_checks(env, outcome), _natural_end(env, outcome)])
        fired = [f"{e.get('action')} {e.get('reason')}" for e in audit_entries(env.audit_dir, outcome.run_id or "")
                 if e.get("action") in (BUDGET_AUDIT_ACTION, GUARD_AUDIT_ACTION)]
        seen = (f"run with {config.describe()}: stop reason {(outcome.line or {}).get('stop_reason')} (audit: "
                f"{fired or 'no limit fired'}); canary problems: {problems or 'none'}")
        return command_observation(outcome.result, not problems, seen, {**kit.evidence(outcome), "problems": problems},
                                   started=started)

    return observe


def _natural_end(env: QuantLabEnvironment, outcome: CanaryOutcome) -> CheckResult:
    """The canary checks' stricter run check: every symbol fed the run and it stopped at its natural end."""
    run_id = outcome.run_id or ""
    decisions = None
    if run_id:
        key = next(k for k in archive_keys(run_id) if k.endswith("decisions.jsonl"))
        decisions = env.bucket.read_lines(key) if env.bucket.head(key) is not None else None
    record = find_run(kit.observer_client(env), run_id) if run_id else None
    return check_canary_run(outcome, kit.DEFAULT_SYMBOLS, decisions, record, expected_stop_reasons=(STREAM_END,))


# -- the experiment ------------------------------------------------------------------------------------------


def _code(failure: Failure, kind: str) -> str:
    """The symptom's code for budgets or for guards (the runbook names both in one symptom)."""
    codes = [code for code in failure.symptom_ids.codes if kind.upper() in code]
    if not codes:
        raise violation(failure.symptom_source, f"Symptom: {failure.symptom}",
                        f"the symptom names no {kind} stop code (codes: {list(failure.symptom_ids.codes)})")
    return codes[0]


def _prove(env: QuantLabEnvironment, runbook: Runbook, journal: Journal, cause: Cause) -> None:
    failure = runbook.failure(FAILURE)
    code = _code(failure, cause.kind)
    limits = {setting.name: setting.value for setting in runbook.env_limits}
    config = RunConfig()
    run: Slot[BackgroundRun] = Slot("the canary run the fault started")

    journal.run(Experiment(
        f"{ITEM} ({cause.describe})",
        setup=[kit.start(env, "observer")],
        # Not checked again after recovery: the recovered run proves the same promise (passes, archived, audited,
        # ends at its natural end) under the runbook's limits.
        steady_state=[kit.healthy_canary(env, runbook, recheck=False)],
        fault=[Action(f"the runbook's canary started with {cause.describe}",
                      lambda: _inject(journal, env, runbook, cause, config, run))],
        symptom=_symptom(env, failure, cause, code, run),
        fix=[Action(f"Fix: {failure.fix} (the run's limits at the Safety Defaults: "
                    f"{' '.join(f'{k}={v}' for k, v in limits.items()) or 'none given'}; a healthy strategy)",
                    lambda: _fix(failure, limits, config))],
        recovery=[Probe("the runbook's canary, run as fixed", _recovered(env, runbook, config),
                        holds(f"after '{failure.fix}' (limits at the Safety Defaults, a healthy strategy) the run "
                              f"ends with {STREAM_END}", failure.fix_source))],
        snapshot=kit.snapshot_of(env),
    ))


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


# -- the fix's spool path ------------------------------------------------------------------------------------


@pytest.mark.runbook(ITEM)
def test_fix_names_the_default_audit_spool(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    """The fix's spool path is where QuantLab spools audit entries when AUDIT_SPOOL_DIR is not set.

    Observed, not assumed: the self-test's audit_spool step writes (and deletes) a probe file in today's folder
    of the default spool and reports that folder. What the probe leaves (empty folders) is removed again.
    """
    failure = runbook_model.failure(FAILURE)
    journal.run(Experiment(
        f"{ITEM} (the fix's audit spool path)",
        steady_state=[],
        checks=[Probe(f"the self-test, run with {AUDIT_SPOOL_ENV} unset", lambda: _default_spool(journal, quantlab, failure),
                      holds(f"Fix: {failure.fix} (the path is QuantLab's default {AUDIT_SPOOL_ENV})", failure.fix_source))],
    ))


def _named_spool(failure: Failure) -> Path | None:
    paths = [p for p in failure.fix_ids.paths if "audit" in p.lower()] or list(failure.fix_ids.paths)
    return Path(paths[0].rstrip("/") or "/") if paths else None


def _default_spool(journal: Journal, env: QuantLabEnvironment, failure: Failure) -> Observation:
    """Whether the target's default spool folder is the one the fix names, and how it was found."""
    named = _named_spool(failure)
    if named is None:
        return Observation(False, "the fix names no audit spool path", final=True)
    existed = {folder: folder.exists() for folder in (named, *named.parents)}
    existed.update({child: True for child in (named.iterdir() if named.is_dir() else ())})

    def without_spool_env(argv, extra, timeout) -> CommandResult:  # type: ignore[no-untyped-def]
        # Archiving off: the probe must not depend on S3, only on where the spool goes.
        return env.run_command(argv, env={**(extra or {}), "RUN_ARCHIVE_ENABLED": "0"}, unset=(AUDIT_SPOOL_ENV,),
                               timeout=timeout)

    started = kit.now()
    outcome = run_self_test(without_spool_env, timeout=30.0)
    reported = [line.get("dir") for line in outcome.result.json_lines()
                if line.get("event") == "self_test" and line.get("step") == "audit_spool" and line.get("dir")]
    evidence = {"named": str(named), "steps": outcome.steps}
    if reported:
        day_folder = Path(str(reported[0]))
        _remove_probe_leftovers(day_folder, existed)
        default = day_folder.parent
        journal.measure("default_audit_spool", {"path": str(default), "how": "reported by the self-test"})
        return command_observation(outcome.result, default == named,
                                   f"the self-test's audit_spool step spooled in {day_folder}: QuantLab's default "
                                   f"audit spool is {default}", {**evidence, "default": str(default)}, started=started)
    source = _default_in_source(env.target.root, str(named))
    journal.measure("default_audit_spool", {"path": str(named) if source else None, "how": source or "not found"})
    if source:
        return Observation(True, f"the self-test did not report its spool folder (steps: {outcome.steps}); the "
                           f"literal {named} is the default in {source}", {**evidence, "source": source}, final=True)
    return Observation(False, f"the self-test did not report its spool folder (exit {outcome.result.code}, steps "
                       f"{outcome.steps}) and no source file that reads {AUDIT_SPOOL_ENV} contains {named}", evidence,
                       final=True)


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
