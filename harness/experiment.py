"""Experiments a scenario declares and its journal runs, in the spirit of Chaos Toolkit's.

An experiment is the runbook item's story in order: the steady state (probes), the fault (actions), the symptom
(probes with a deadline), the fix (actions), the recovery (probes with a deadline), the steady state again (the
before/after hypothesis), nothing lost (earlier audit lines and archive objects intact), and rollbacks that always
run, after a deviation, a harness error or Ctrl-C too.

A probe observes the system from outside and returns an `Observation`; a `Tolerance` taken from the runbook judges
it. Probes are polled until they hold or their deadline passes, so time to detect runs from the moment the fault
was applied to the first observation that the symptom holds, and time to recover from the fix to the first
observation that recovery holds. A command the harness had to kill at its deadline is its own observation (`hung
after N s`) and never satisfies a tolerance: a hang is not the symptom. Every phase is evaluated after a deviation
and every deviation is reported; only a steady state that cannot be reached ends the experiment early (`blocked`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from harness.outcomes import DriftFound, SteadyStateNotReached, one_sentence
from quantlab_chaos import items
from quantlab_chaos.errors import HarnessError

if TYPE_CHECKING:
    from harness.journal import Journal
    from quantlab_chaos.runbook import Source

T = TypeVar("T")

STEADY, CHECK, FAULT, SYMPTOM, FIX, RECOVERY, STEADY_AFTER, NOTHING_LOST, ROLLBACK = (
    "steady_state", "check", "fault", "symptom", "fix", "recovery", "steady_state_after", "nothing_lost", "rollback")
# Phases whose probes judge the system: a probe there that does not hold is a deviation (in the steady state it
# blocks the experiment instead).
JUDGED = (CHECK, SYMPTOM, RECOVERY, STEADY_AFTER, NOTHING_LOST)
SEVERITIES = ("info", "warning", "defect")


class ExperimentError(HarnessError):
    """An experiment that cannot be run as declared (a phase that observes nothing): the harness's own mistake."""


@dataclass(frozen=True)
class Observation:
    """What a probe saw, in words (`seen`) and as a value its tolerance judges.

    `hung_after_s`: the command or run the probe watched had to be killed at that deadline; such an observation
    never holds. `final`: observing again would see the same (a command that ran to its end), so it is not polled.
    `at`: the monotonic time the system showed it, when that is earlier than the moment the probe returned (a
    command's exit), else None."""

    value: Any
    seen: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    hung_after_s: float | None = None
    final: bool = False
    at: float | None = None


@dataclass(frozen=True)
class Tolerance:
    """What the runbook says must hold, in its words, and the test that the observed value satisfies it."""

    says: str
    accepts: Callable[[Any], bool]
    source: Source | None = None


def holds(says: str, source: Source | None = None) -> Tolerance:
    """The observed value is true (a bool, or a `CheckResult`-like object whose `ok` is true)."""
    return Tolerance(says, lambda value: bool(getattr(value, "ok", value)) is True, source)


def equals(expected: Any, says: str, source: Source | None = None) -> Tolerance:
    return Tolerance(says, lambda value: value == expected, source)


@dataclass(frozen=True)
class Probe:
    """One observation of the system, judged by `tolerance`. `observe` returns an `Observation`, a `CheckResult`
    (its ok, message and evidence), or a bool. `deadline_s` > 0 polls it every `interval_s` until it holds.
    `blocks`: for a steady-state probe, the runbook item whose own failure would keep it from holding."""

    name: str
    observe: Callable[[], Any]
    tolerance: Tolerance
    deadline_s: float = 0.0
    interval_s: float = 0.2
    blocks: str | None = None
    recheck: bool = True  # a steady-state probe checked again after recovery (before/after hypothesis)


@dataclass(frozen=True)
class Action:
    """Something the harness does to the system: a setup step, a fault, a fix or a rollback, described as the
    runbook words it. `blocks`: for a setup step, the runbook item whose own failure would keep it from working."""

    name: str
    run: Callable[[], Any]
    blocks: str | None = None
    source: Source | None = None  # the runbook line that asks for it, quoted when the system refuses it


@dataclass
class Experiment:
    """A runbook item's scenario as phases. Built once; `Journal.run` runs it."""

    title: str
    steady_state: Sequence[Probe]
    # Brings the system to its steady state, in order (start the observer, a healthy canary, a live run): an Action
    # is done, a Probe is judged as part of the steady state, so what a later step needs is proven first.
    setup: Sequence[Action | Probe] = ()
    # Promises judged on the steady system, before any fault (a command's answers, a unit file's settings), in
    # order; an Action among them is a runbook step whose effect the probes after it judge (systemctl stop, then
    # "no process left"). A scenario without a fault may consist of these alone.
    checks: Sequence[Probe | Action] = ()
    fault: Sequence[Action] = ()
    symptom: Sequence[Probe] = ()
    fix: Sequence[Action] = ()
    recovery: Sequence[Probe] = ()
    rollbacks: Sequence[Action] = ()
    # Digests of what the target wrote (audit spool, archive), taken after the steady state and at the end.
    snapshot: Callable[[], Any] | None = None
    symptom_together: bool = False  # the symptom's probes watch one fault at once (each may wait its deadline)

    def __post_init__(self) -> None:
        self.setup, self.checks = list(self.setup), list(self.checks)
        self.steady_state, self.fault, self.symptom = list(self.steady_state), list(self.fault), list(self.symptom)
        self.fix, self.recovery, self.rollbacks = list(self.fix), list(self.recovery), list(self.rollbacks)
        refusals = []
        if self.fault and not self.steady_state:
            refusals.append("its steady state has no probe (a steady state that checks nothing proves nothing)")
        if not self.fault and not self.steady_state and not any(isinstance(c, Probe) for c in self.checks):
            refusals.append("it has no probe at all")
        if self.fault and not self.symptom:
            refusals.append("it applies a fault but observes no symptom")
        if self.symptom and not self.fault:
            refusals.append("it has symptom probes but applies no fault")
        if self.fix and not self.recovery:
            refusals.append("it applies a fix but observes no recovery")
        if self.recovery and not self.fix:
            refusals.append("it observes a recovery without applying a fix")
        setup_probes = [item for item in [*self.setup, *self.checks] if not isinstance(item, Action)]
        for probe in [*setup_probes, *self.steady_state, *self.symptom, *self.recovery]:
            if not isinstance(probe, Probe) or not callable(probe.observe) or not isinstance(probe.tolerance, Tolerance):
                refusals.append(f"{probe!r} is not a Probe with an observe function and a tolerance")
            elif probe.deadline_s < 0 or probe.interval_s <= 0:
                refusals.append(f"probe {probe.name!r} has deadline {probe.deadline_s} s, interval {probe.interval_s} s")
        if refusals:
            raise ExperimentError(f"the experiment {self.title!r} is refused: {'; '.join(refusals)}. Give every "
                                  "phase a probe that observes the system.")


@dataclass
class Judgement:
    """A probe's last observation and whether it held, with when it first held and how often it was observed."""

    phase: str
    probe: Probe
    observation: Observation
    held: bool
    attempts: int
    held_at: float | None = None  # monotonic

    @property
    def seen(self) -> str:
        obs = self.observation
        if obs.hung_after_s is not None:
            return f"{self.probe.name} did not finish in {obs.hung_after_s:g} s and was stopped by the harness ({obs.seen})"
        waited = f" (still so after {self.probe.deadline_s:g} s)" if self.probe.deadline_s and not self.held else ""
        return f"{obs.seen}{waited}"


def said(line: int | None, says: str, seen: str) -> str:
    """How every report words a promise the system did not keep: the runbook line, what it says, what the system did."""
    where = f"runbook line {line}" if line else "the runbook"
    return f"{where} says {says}; the system: {seen}"


@dataclass
class Deviation:
    """A judged probe that did not hold, or an action the system refused: the runbook line, what it says, what the
    system did, and the evidence."""

    phase: str
    says: str
    seen: str
    source: Source | None
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return said(self.source.line if self.source else None, self.says, self.seen)


class ExperimentDeviated(AssertionError):
    """The system did not do what the runbook says in one or more phases (the scenario fails)."""

    def __init__(self, deviations: Sequence[Deviation]) -> None:
        self.deviations = list(deviations)
        first = self.deviations[0]
        more = f" (and {len(self.deviations) - 1} more deviation(s): " + "; ".join(
            f"[{d.phase}] {d}" for d in self.deviations[1:]) + ")" if len(self.deviations) > 1 else ""
        super().__init__(f"{first}{more}")


class Slot(Generic[T]):
    """A value one phase hands to a later one (the live run the setup started, the snapshot before the fault)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._value: T | None = None
        self.filled = False

    def set(self, value: T) -> T:
        self._value, self.filled = value, True
        return value

    @property
    def value(self) -> T:
        if not self.filled:
            raise ExperimentError(f"{self.what} was used before the phase that sets it ran")
        return self._value  # type: ignore[return-value]


# -- observing ---------------------------------------------------------------------------------------------------


def as_observation(value: Any) -> Observation:
    """Whatever a probe's observe returned, as an Observation (CheckResult-like objects keep their words)."""
    if isinstance(value, Observation):
        return value
    if hasattr(value, "ok") and hasattr(value, "message"):
        hung = (getattr(value, "evidence", {}) or {}).get("timed_out")
        took = (getattr(value, "evidence", {}) or {}).get("duration_s")
        return Observation(value, str(value.message), dict(getattr(value, "evidence", {}) or {}),
                           hung_after_s=float(took) if hung and took is not None else None)
    if isinstance(value, bool):
        return Observation(value, "yes" if value else "no")
    return Observation(value, one_sentence(repr(value), 300))


def command_observation(result: Any, value: Any, seen: str, evidence: Mapping[str, Any] | None = None,
                        started: float | None = None) -> Observation:
    """A finished or killed command (a `CommandResult`) as an observation: final, hung when it timed out, and seen
    at its exit (`started` + its duration) so time to detect is the system's, not the harness's."""
    duration = float(getattr(result, "duration_s", 0.0))
    return Observation(value, seen, {**(evidence or {}), "exit_code": result.code, "duration_s": round(duration, 3)},
                       hung_after_s=round(duration, 1) if getattr(result, "timed_out", False) else None, final=True,
                       at=started + duration if started is not None else None)


class Clock:
    """Monotonic time and sleep, replaceable in tests."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def observe_once(probe: Probe, phase: str) -> Observation:
    """One observation. What a probe cannot see (a wait that timed out, a runbook request unanswered) is an
    observation that does not hold; a drift or a blocked steady state passes through; the harness's own errors too."""
    from canary.checks import TargetUnreachable

    try:
        return as_observation(probe.observe())
    except SteadyStateNotReached as exc:
        if phase == STEADY:
            raise
        return Observation(None, exc.why, {"raised": type(exc).__name__}, final=True)
    except (DriftFound, ExperimentError):
        raise
    except (AssertionError, TimeoutError, TargetUnreachable) as exc:
        if phase == STEADY:
            blocked_by = probe.blocks or getattr(exc, "blocks_item", None) or (
                items.HEALTH_CHECKS if isinstance(exc, TargetUnreachable) else None)
            raise SteadyStateNotReached(f"{probe.name}: {exc}", blocked_by=blocked_by) from exc
        return Observation(None, one_sentence(str(exc), 600), {"raised": type(exc).__name__}, final=True)


def poll(probe: Probe, phase: str, clock: Clock) -> Judgement:
    """Observes until the tolerance holds, the observation is final or hung, or the deadline passes."""
    deadline = clock.now() + probe.deadline_s
    attempts = 0
    while True:
        attempts += 1
        observation = observe_once(probe, phase)
        returned = clock.now()
        held = observation.hung_after_s is None and bool(probe.tolerance.accepts(observation.value))
        if held:
            return Judgement(phase, probe, observation, True, attempts, observation.at or returned)
        if observation.final or observation.hung_after_s is not None or returned >= deadline:
            return Judgement(phase, probe, observation, False, attempts)
        clock.sleep(max(0.0, min(probe.interval_s, deadline - returned)))


# -- running -------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one run of an experiment found, phase by phase."""

    judgements: list[Judgement] = field(default_factory=list)
    deviations: list[Deviation] = field(default_factory=list)
    rollback_errors: list[str] = field(default_factory=list)


class Runner:
    """Runs an experiment into a journal: every phase evaluated, rollbacks always."""

    def __init__(self, journal: Journal, clock: Clock | None = None) -> None:
        self.journal = journal
        self.clock = clock or Clock()
        self._stack = ExitStack()
        self.last_deviations: list[Deviation] = []

    def enter(self, context: AbstractContextManager[T]) -> T:
        """Enters a context (a live run, a background process) that is left with the rollbacks, last first."""
        return self._stack.enter_context(context)

    def run(self, experiment: Experiment) -> Run:
        run = Run()
        self.last_deviations = run.deviations
        journal = self.journal
        journal.experiment = experiment.title
        try:
            self._steady(experiment, run)
            before = experiment.snapshot() if experiment.snapshot is not None else None
            self._check(experiment.checks, run)
            applied = self._act(FAULT, experiment.fault, run)
            if experiment.fault:
                journal.mark("fault", applied)
                if applied is not None:
                    self._judge(SYMPTOM, experiment.symptom, run, together=experiment.symptom_together)
                    journal.symptom_observed = all(j.held for j in run.judgements if j.phase == SYMPTOM)
                    journal.mark("detected", _last_held(run, SYMPTOM))
            if experiment.fix:
                journal.mark("fix", self._act(FIX, experiment.fix, run))
                self._judge(RECOVERY, experiment.recovery, run)
                journal.fix_verified = all(j.held for j in run.judgements if j.phase == RECOVERY)
                journal.mark("recovered", _last_held(run, RECOVERY))
            if experiment.fault:
                probes = [p for p in [*experiment.setup, *experiment.steady_state] if isinstance(p, Probe)]
                self._judge(STEADY_AFTER, [p for p in probes if p.recheck], run)
            if experiment.snapshot is not None:
                self._nothing_lost(before, experiment.snapshot(), run)
        finally:
            self._rollback(experiment, run)
        defects = [f for f in journal.findings if f.severity == "defect"]
        for finding in defects:
            run.deviations.append(Deviation("finding", f"no defect ({finding.title})", finding.detail, finding.source))
        if run.deviations:
            raise ExperimentDeviated(run.deviations)
        if run.rollback_errors:
            raise HarnessError(f"the experiment {experiment.title!r} passed, but its rollback failed: "
                               + "; ".join(run.rollback_errors))
        return run

    # -- phases ----------------------------------------------------------------------------------------------------

    def _steady(self, experiment: Experiment, run: Run) -> None:
        """The setup, then the steady-state probes; whatever keeps it from being reached makes the run blocked."""
        from canary.checks import TargetUnreachable
        from harness.sysd.status import ServiceFailed

        for action in experiment.setup:
            if isinstance(action, Probe):
                self._steady_probe(action, run)
                continue
            with self.journal.step("setup", action.name):
                try:
                    action.run()
                except (SteadyStateNotReached, DriftFound):
                    raise
                except ServiceFailed as exc:
                    raise SteadyStateNotReached(f"{action.name}: {exc}", blocked_by=action.blocks or items.START_STOP) from exc
                except TargetUnreachable as exc:
                    raise SteadyStateNotReached(f"{action.name}: {exc}",
                                                blocked_by=action.blocks or items.HEALTH_CHECKS) from exc
                except (AssertionError, TimeoutError) as exc:
                    raise SteadyStateNotReached(f"{action.name}: {exc}", blocked_by=action.blocks or getattr(
                        exc, "blocks_item", None)) from exc
        for probe in experiment.steady_state:
            self._steady_probe(probe, run)

    def _steady_probe(self, probe: Probe, run: Run) -> None:
        judgement = self._one(STEADY, probe, run)
        if not judgement.held:
            raise SteadyStateNotReached(f"{probe.tolerance.says}: {judgement.seen}", blocked_by=probe.blocks)

    def _check(self, checks: Sequence[Probe | Action], run: Run) -> None:
        """The checks in order: each probe judged, each action done (one the system refuses is a deviation, and the
        probes after it still judge what the system does)."""
        for check in checks:
            if isinstance(check, Action):
                self._act(CHECK, [check], run)
            else:
                self._one(CHECK, check, run)

    def _act(self, phase: str, actions: Sequence[Action], run: Run) -> float | None:
        """Runs the actions in order; the time the last one finished (the fault applied), or None when the system
        refused one (a runbook step that cannot be done as written, or a service that does not reach the state the
        step asks for: a deviation, and a fault's symptom is then not judged)."""
        from harness.sysd.status import ServiceError

        for action in actions:
            with self.journal.step(phase, action.name) as step:
                try:
                    action.run()
                except (AssertionError, ServiceError) as exc:
                    step.ok = False
                    says = getattr(exc, "says", None) or f"{action.name} can be done as written"
                    seen = getattr(exc, "seen", None) or str(exc)
                    run.deviations.append(Deviation(phase, says, seen, getattr(exc, "source", None) or action.source))
                    return None
        return self.clock.now()

    def _judge(self, phase: str, probes: Sequence[Probe], run: Run, together: bool = False) -> None:
        if together and len(probes) > 1:
            with ThreadPoolExecutor(max_workers=len(probes), thread_name_prefix=phase) as pool:
                judgements = list(pool.map(lambda p: poll(p, phase, self.clock), probes))
            for judgement in judgements:
                self._record(judgement, run)
            return
        for probe in probes:
            self._one(phase, probe, run)

    def _one(self, phase: str, probe: Probe, run: Run) -> Judgement:
        started = self.clock.now()
        judgement = poll(probe, phase, self.clock)
        self._record(judgement, run, self.clock.now() - started)
        return judgement

    def _record(self, judgement: Judgement, run: Run, took: float = 0.0) -> None:
        run.judgements.append(judgement)
        probe, obs = judgement.probe, judgement.observation
        evidence = {**obs.evidence, "attempts": judgement.attempts}
        if obs.hung_after_s is not None:
            evidence["hung_after_s"] = obs.hung_after_s
            self.journal.measure(f"hung:{probe.name}", obs.hung_after_s)
        self.journal.record(judgement.phase, f"{probe.name}: {probe.tolerance.says}", judgement.held, evidence,
                            seen=judgement.seen, duration_s=took)
        if not judgement.held and judgement.phase in JUDGED:
            run.deviations.append(Deviation(judgement.phase, probe.tolerance.says, judgement.seen,
                                            probe.tolerance.source, obs.evidence))

    def _nothing_lost(self, before: Any, after: Any, run: Run) -> None:
        lost = [f"spool {name}" for name, digest in before.spool.items() if after.spool.get(name) != digest]
        lost += [f"s3 {key}" for key, etag in before.bucket.items() if after.bucket.get(key) != etag]
        checked = len(before.spool) + len(before.bucket)
        probe = Probe("audit spool and archive compared with the snapshot after the steady state",
                      lambda: None, holds("nothing is lost: earlier audit lines and archive objects stay intact"))
        seen = f"{len(lost)} of {checked} lost or changed: {', '.join(lost[:5])}" if lost else f"all {checked} intact"
        judgement = Judgement(NOTHING_LOST, probe, Observation(not lost, seen, {"checked": checked,
                                                                              "lost_or_changed": lost[:20]}), not lost, 1)
        self._record(judgement, run)

    def _rollback(self, experiment: Experiment, run: Run) -> None:
        """Every rollback, last registered first, whatever happened before (a deviation, an error, Ctrl-C); then the
        contexts entered during the run."""
        for action in reversed(experiment.rollbacks):
            self._undo(action.name, action.run, run)
        self._undo("left what the experiment entered (live runs, background processes)", self._stack.close, run)

    def _undo(self, name: str, undo: Callable[[], Any], run: Run) -> None:
        started = self.clock.now()
        try:
            undo()
        except Exception as exc:  # noqa: BLE001 - every rollback runs; failures are reported after the others
            run.rollback_errors.append(f"{name}: {type(exc).__name__}: {exc}")
            self.journal.record(ROLLBACK, name, False, {"error": f"{type(exc).__name__}: {exc}"},
                                duration_s=self.clock.now() - started)
            return
        self.journal.record(ROLLBACK, name, True, {}, duration_s=self.clock.now() - started)


def _last_held(run: Run, phase: str) -> float | None:
    """When the phase as a whole first held (its last probe to hold), or None when any of its probes did not."""
    judged = [j for j in run.judgements if j.phase == phase]
    if not judged or not all(j.held for j in judged):
        return None
    return max(j.held_at for j in judged if j.held_at is not None)
