"""The experiment runner and the summary that decide pass or fail, with probes that are plain functions (no services).

Every outcome, deadlines and polling, rollbacks after a deviation, an error and Ctrl-C, a hang, a deviation after
recovery, and the exit code each leads to.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypedDict, Unpack

import pytest

from harness import reporting
from harness.experiment import (
    Action,
    Clock,
    Experiment,
    ExperimentDeviated,
    ExperimentError,
    Observation,
    Probe,
    command_observation,
    equals,
    holds,
)
from harness.journal import Journal
from harness.outcomes import BLOCKED, ERROR, FAIL, PASS, SteadyStateNotReached, classify, exit_code
from harness.reporting import ItemSummary
from quantlab_chaos.errors import HarnessError
from quantlab_chaos.runbook import RunbookItem, Source

ITEM = RunbookItem("failure:test", "Most Common Failures", "Test failure", Source(40, "Test failure"))
SYMPTOM_LINE = Source(41, "   - Symptom: the thing fails.")
FIX_LINE = Source(42, "   - Fix: set THING=1.")


class FakeClock(Clock):
    """Time that moves only when something sleeps or works (`advance`), so deadlines are exact."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds

    def advance(self, seconds: float) -> None:
        self.t += seconds


class System:
    """A pretend system: a flag the fault clears and the fix sets, seen `lag` seconds after it changed."""

    def __init__(self, clock: FakeClock, lag: float = 0.0, fix_works: bool = True) -> None:
        self.clock, self.lag, self.fix_works = clock, lag, fix_works
        self.healthy, self.changed_at = True, clock.now() - 1e6  # settled long ago
        self.rolled_back: list[str] = []

    def set(self, healthy: bool) -> None:
        self.healthy, self.changed_at = healthy, self.clock.now()

    def looks_healthy(self) -> bool:
        settled = self.clock.now() - self.changed_at >= self.lag
        return self.healthy if settled else not self.healthy


def journal(clock: FakeClock) -> Journal:
    entry = Journal(ITEM)
    entry.runner.clock = clock
    return entry


class Parts(TypedDict, total=False):
    """The phases `experiment` takes, as Experiment names them."""

    steady_state: Sequence[Probe]
    setup: Sequence[Action | Probe]
    checks: Sequence[Probe | Action]
    fault: Sequence[Action]
    symptom: Sequence[Probe]
    fix: Sequence[Action]
    recovery: Sequence[Probe]
    rollbacks: Sequence[Action]


def experiment(system: System, *, deadline: float = 5.0, **overrides: Unpack[Parts]) -> Experiment:
    parts: Parts = {
        "steady_state": [Probe("the thing", system.looks_healthy, holds("the thing works"))],
        "fault": [Action("break the thing", lambda: system.set(False))],
        "symptom": [Probe("the thing", lambda: not system.looks_healthy(), holds("the thing fails", SYMPTOM_LINE),
                          deadline_s=deadline)],
        "fix": [Action("set THING=1", lambda: system.set(system.fix_works))],
        "recovery": [Probe("the thing", system.looks_healthy, holds("after the fix the thing works", FIX_LINE),
                           deadline_s=deadline)],
        "rollbacks": [Action("undo", lambda: system.rolled_back.append("undo"))],
    }
    parts.update(overrides)
    return Experiment("test", **parts)


def test_a_system_that_does_what_the_runbook_says_passes_and_times_come_from_polling() -> None:
    clock = FakeClock()
    system = System(clock, lag=1.5)
    entry = journal(clock)
    run = entry.run(experiment(system))
    assert classify(None).outcome == PASS
    assert entry.symptom_observed is True and entry.fix_verified is True
    # Polled every 0.2 s: the symptom first holds at the first poll at or after 1.5 s.
    assert entry.time_to_detect_s == pytest.approx(1.6, abs=0.01)
    assert entry.time_to_recover_s == pytest.approx(1.6, abs=0.01)
    assert system.rolled_back == ["undo"]
    assert [j.phase for j in run.judgements] == ["steady_state", "symptom", "recovery", "steady_state_after"]


def test_time_to_detect_moves_when_the_system_reacts_more_slowly() -> None:
    times = []
    for lag in (0.5, 3.0):
        clock = FakeClock()
        entry = journal(clock)
        entry.run(experiment(System(clock, lag=lag)))
        times.append(entry.time_to_detect_s)
    assert times[0] is not None and times[1] is not None and times[1] - times[0] == pytest.approx(2.5, abs=0.25)


def test_a_symptom_that_never_shows_fails_at_its_deadline_with_the_runbook_line_and_recovery_is_still_tried() -> None:
    clock = FakeClock()
    system = System(clock)
    recovery_tried: list[int] = []

    def recovered() -> bool:
        recovery_tried.append(1)
        return True

    never = experiment(system, symptom=[Probe("the thing", lambda: False, holds("the thing fails", SYMPTOM_LINE),
                                              deadline_s=3.0)],
                       recovery=[Probe("the thing", recovered, holds("after the fix the thing works", FIX_LINE))])
    entry = journal(clock)
    with pytest.raises(ExperimentDeviated) as caught:
        entry.run(never)
    message = str(caught.value)
    assert message.startswith("runbook line 41 says the thing fails; the system: no (still so after 3 s)")
    assert recovery_tried and system.rolled_back == ["undo"]
    assert entry.time_to_detect_s is None and entry.symptom_observed is False
    assert clock.now() >= 1000.0 + 3.0
    verdict = classify(caught.value)
    assert verdict.outcome == FAIL and "runbook line 41" in verdict.message
    assert exit_code([verdict.outcome]) == 1


def test_every_deviation_is_reported_not_only_the_first() -> None:
    clock = FakeClock()
    system = System(clock, fix_works=False)
    broken = experiment(system, symptom=[Probe("the thing", lambda: False, holds("the thing fails", SYMPTOM_LINE))])
    entry = journal(clock)
    with pytest.raises(ExperimentDeviated) as caught:
        entry.run(broken)
    phases = [d.phase for d in caught.value.deviations]
    assert phases == ["symptom", "recovery", "steady_state_after"]
    assert "and 2 more deviation(s)" in str(caught.value)
    assert [d["phase"] for d in entry.to_dict()["deviations"]] == phases


def test_a_deviation_after_recovery_fails_the_before_after_hypothesis() -> None:
    clock = FakeClock()
    system = System(clock)
    checks = []

    def steady() -> bool:
        checks.append(clock.now())
        return len(checks) == 1  # holds before the fault, not after recovery

    entry = journal(clock)
    with pytest.raises(ExperimentDeviated) as caught:
        entry.run(experiment(system, steady_state=[Probe("the other thing", steady, holds("the other thing works"))]))
    assert [d.phase for d in caught.value.deviations] == ["steady_state_after"]
    assert len(checks) == 2


def test_a_steady_state_that_does_not_hold_blocks_names_the_item_and_still_rolls_back() -> None:
    clock = FakeClock()
    system = System(clock)
    faulted = []
    entry = journal(clock)
    blocked = experiment(system, steady_state=[Probe("a healthy canary", lambda: False, holds("a canary passes"),
                                                     blocks="canary")],
                         fault=[Action("break", lambda: faulted.append(1))])
    with pytest.raises(SteadyStateNotReached) as caught:
        entry.run(blocked)
    verdict = classify(caught.value)
    assert verdict.outcome == BLOCKED and verdict.blocked_by == "canary"
    assert not faulted and system.rolled_back == ["undo"]
    assert exit_code([verdict.outcome]) == 1


def test_a_hang_is_its_own_observation_never_the_symptom() -> None:
    clock = FakeClock()
    system = System(clock)

    class Result:
        code, duration_s, timed_out = None, 12.0, True

    hung = Probe("the self-test", lambda: command_observation(Result(), None, "no step failed", started=clock.now()),
                 holds("the self-test fails on S3 check", SYMPTOM_LINE), deadline_s=30.0)
    accept_anything = Probe("the self-test", lambda: command_observation(Result(), True, "no step failed"),
                            equals(True, "the self-test fails", SYMPTOM_LINE))
    for probe in (hung, accept_anything):
        entry = journal(clock)
        with pytest.raises(ExperimentDeviated) as caught:
            entry.run(experiment(system, symptom=[probe]))
        assert str(caught.value).startswith("runbook line 41 says the self-test fails")
        assert "the system: the self-test did not finish in 12 s and was stopped by the harness" in str(caught.value)
        assert entry.measurements["hung:the self-test"] == 12.0
    # Observed once (a command that ran to its deadline is final), not polled for 30 s.
    assert clock.now() < 1000.0 + 1.0


def test_a_probe_raising_a_harness_error_is_an_error_and_rollbacks_run() -> None:
    clock = FakeClock()
    system = System(clock)

    def broken() -> bool:
        raise HarnessError("toxiproxy went away")

    entry = journal(clock)
    with pytest.raises(HarnessError) as caught:
        entry.run(experiment(system, symptom=[Probe("the thing", broken, holds("the thing fails"))]))
    assert classify(caught.value).outcome == ERROR and exit_code([ERROR, FAIL]) == 3
    assert system.rolled_back == ["undo"]
    assert any(step.kind == "rollback" and step.ok for step in entry.steps)


def test_rollbacks_run_after_ctrl_c_and_a_failing_rollback_does_not_stop_the_others() -> None:
    clock = FakeClock()
    system = System(clock)

    def interrupted() -> bool:
        raise KeyboardInterrupt

    def failing_undo() -> None:
        raise OSError("gone")

    rollbacks = [Action("first", lambda: system.rolled_back.append("first")), Action("failing", failing_undo),
                 Action("last", lambda: system.rolled_back.append("last"))]
    entry = journal(clock)
    with pytest.raises(KeyboardInterrupt):
        entry.run(experiment(system, symptom=[Probe("the thing", interrupted, holds("fails"))], rollbacks=rollbacks))
    assert system.rolled_back == ["last", "first"]
    assert [s.ok for s in entry.steps if s.kind == "rollback"] == [True, False, True, True]


def test_a_rollback_that_fails_after_a_pass_is_the_harnesss_error() -> None:
    clock = FakeClock()

    def failing_undo() -> None:
        raise OSError("cannot restore the env file")

    with pytest.raises(HarnessError, match="rollback failed: restore: OSError: cannot restore"):
        journal(clock).run(experiment(System(clock), rollbacks=[Action("restore", failing_undo)]))


def test_contexts_entered_during_the_run_are_left_with_the_rollbacks() -> None:
    from contextlib import contextmanager

    clock = FakeClock()
    left: list[str] = []

    @contextmanager
    def live_run() -> Iterator[str]:
        try:
            yield "run-1"
        finally:
            left.append("run-1")

    entry = journal(clock)
    started: list[str] = []
    setup = Action("a live run", lambda: started.append(entry.enter(live_run())))
    with pytest.raises(ExperimentDeviated):
        entry.run(experiment(System(clock), setup=[setup], symptom=[Probe("x", lambda: False, holds("the thing fails"))]))
    assert started == ["run-1"] and left == ["run-1"]


def test_a_setup_step_that_fails_blocks_on_the_item_it_needs() -> None:
    from harness.sysd.status import ServiceFailed

    clock = FakeClock()

    def start_observer() -> None:
        raise ServiceFailed("quantlab-observer.service exited 1")

    with pytest.raises(SteadyStateNotReached) as caught:
        journal(clock).run(experiment(System(clock), setup=[Action("start the observer", start_observer)]))
    assert caught.value.blocked_by == "start-stop" and "exited 1" in str(caught.value)


def test_a_fault_the_system_refuses_is_a_deviation_and_its_symptom_is_not_judged() -> None:
    clock = FakeClock()
    judged: list[int] = []

    def refuse() -> None:
        raise AssertionError("the live runner unit has no EnvironmentFile=")

    def judge() -> bool:
        judged.append(1)
        return True

    entry = journal(clock)
    with pytest.raises(ExperimentDeviated) as caught:
        entry.run(experiment(System(clock), fault=[Action("THING=0 in the env file", refuse)],
                             symptom=[Probe("x", judge, holds("the thing fails"))]))
    assert not judged
    assert caught.value.deviations[0].phase == "fault"
    assert "no EnvironmentFile" in str(caught.value)


@pytest.mark.parametrize("parts, refusal", [
    ({"steady_state": []}, "steady state has no probe"),
    ({"steady_state": [], "fault": [], "symptom": [], "fix": [], "recovery": []}, "no probe at all"),
    ({"symptom": []}, "applies a fault but observes no symptom"),
    ({"recovery": []}, "applies a fix but observes no recovery"),
    ({"fault": [], "fix": []}, "symptom probes but applies no fault"),
    ({"symptom": [Probe("x", lambda: True, holds("y"), interval_s=0)]}, "interval 0 s"),
])
def test_an_experiment_that_observes_nothing_is_refused_when_built(parts: Parts, refusal: str) -> None:
    with pytest.raises(ExperimentError, match=refusal):
        experiment(System(FakeClock()), **parts)


def test_a_defect_finding_fails_the_item_it_belongs_to_and_severities_are_checked() -> None:
    clock = FakeClock()
    entry = journal(clock)
    entry.finding("partial archive", "3 objects of a failed write landed", severity="defect", source=SYMPTOM_LINE)
    entry.finding("a note", "fine", severity="info")
    with pytest.raises(ExperimentDeviated, match="runbook line 41 says no defect .partial archive."):
        entry.run(experiment(System(clock)))
    with pytest.raises(ExperimentError, match="severity 'critical'"):
        entry.finding("x", "y", severity="critical")


def test_unanswered_observations_in_the_steady_state_block_on_the_item_the_exception_names() -> None:
    clock = FakeClock()

    class Unanswered(AssertionError):
        blocks_item = "health-checks"

    def unanswered() -> bool:
        raise Unanswered("GET /observer/health got no answer")

    with pytest.raises(SteadyStateNotReached) as caught:
        journal(clock).run(experiment(System(clock), steady_state=[Probe("the observer", unanswered, holds("up"))]))
    assert caught.value.blocked_by == "health-checks"


def test_a_wait_that_times_out_inside_a_probe_is_an_observation_not_an_error() -> None:
    clock = FakeClock()

    def waits() -> bool:
        raise TimeoutError("no RUN_STOP within 2 s")

    with pytest.raises(ExperimentDeviated, match="the system: no RUN_STOP within 2 s"):
        journal(clock).run(experiment(System(clock), symptom=[Probe("the stop", waits, holds("the run stops"))]))


def test_observations_keep_the_systems_own_time() -> None:
    clock = FakeClock()
    system = System(clock)
    start = clock.now()

    def command() -> Observation:
        clock.advance(4.0)  # the command ran 4 s, and failed after 1.5 s of it
        return Observation(True, "failed at s3_reachable", final=True, at=start + 1.5)

    entry = journal(clock)
    entry.run(experiment(system, symptom=[Probe("the self-test", command, holds("fails on S3"))]))
    assert entry.time_to_detect_s == pytest.approx(1.5)


# -- the summary: a test's outcome and an item's ------------------------------------------------------------


class Report:
    """Just what TestOutcome.note reads from a pytest report."""

    def __init__(self, outcome: str, message: str = "", blocked_by: str | None = None, when: str = "call") -> None:
        self.duration, self.when = 0.1, when
        self.failed = outcome not in (PASS, "skipped")
        self.verdict = {"outcome": outcome, "message": message, "blocked_by": blocked_by}
        self.longrepr = message


@pytest.mark.parametrize("phases, expected", [
    ([PASS, PASS, PASS], PASS),
    ([PASS, FAIL, ERROR], FAIL),
    ([PASS, BLOCKED, ERROR], ERROR),  # a teardown that broke after a blocked call: the harness's own trouble
    ([ERROR, "skipped"], ERROR),
    (["skipped"], "skipped"),
])
def test_a_tests_outcome_is_the_worst_of_its_phases(phases: list[str], expected: str) -> None:
    outcome = reporting.TestOutcome("t::x", ITEM.id)
    for when, phase in zip(("setup", "call", "teardown"), phases, strict=False):
        outcome.note(Report(phase, f"{phase} in {when}", when=when))  # type: ignore[arg-type]  # a stand-in TestReport
    assert outcome.outcome == expected


@pytest.mark.parametrize("tests, drift, expected, code", [
    ([PASS, PASS], [], PASS, 0),
    ([PASS, FAIL, BLOCKED], [], FAIL, 1),
    ([PASS, BLOCKED], [], BLOCKED, 1),
    ([PASS, ERROR, BLOCKED], [], ERROR, 3),
    ([PASS], [{"runbook": "port 9150", "system": "port 3000", "line": 12}], "drift", 1),
    (["skipped"], [], ERROR, 3),
    ([], [], ERROR, 3),
])
def test_an_items_outcome_and_the_exit_code_it_leads_to(tests: list[str], drift: list[dict[str, object]],
                                                       expected: str, code: int) -> None:
    summary = ItemSummary(ITEM, drift=list(drift))
    for index, outcome in enumerate(tests):
        test = reporting.TestOutcome(f"t::x{index}", ITEM.id)
        blocked_by = "canary" if outcome == BLOCKED else None
        test.note(Report(outcome, f"{outcome} here", blocked_by=blocked_by))  # type: ignore[arg-type]  # a stand-in TestReport
        summary.tests.append(test)
    outcome, message, blocked_by = summary.verdict()
    assert outcome == expected
    assert exit_code([outcome]) == code
    if expected == BLOCKED:
        assert blocked_by == "canary"
    if expected == "drift":
        assert "runbook line 12 says 'port 9150'; the system: port 3000" in message


SIGINT_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from harness.experiment import Action, Experiment, Probe, holds
    from harness.journal import Journal
    from quantlab_chaos.runbook import RunbookItem, Source

    marker = Path(sys.argv[1])
    entry = Journal(RunbookItem("failure:test", "s", "t", Source(1, "t")))

    def waiting() -> bool:
        marker.with_suffix(".waiting").write_text("yes")
        time.sleep(60)
        return True

    entry.run(Experiment("sigint", steady_state=[Probe("ok", lambda: True, holds("ok"))],
                         fault=[Action("break", lambda: None)],
                         symptom=[Probe("slow", waiting, holds("the thing fails"))],
                         rollbacks=[Action("restore", lambda: marker.write_text("rolled back"))]))
""")


def test_a_rollback_runs_after_sigint(tmp_path: Path) -> None:
    marker = tmp_path / "rollback"
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, "-c", SIGINT_SCRIPT, str(marker)], cwd=root,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stderr is not None  # stderr=PIPE
    try:
        deadline = time.monotonic() + 30
        while not marker.with_suffix(".waiting").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.with_suffix(".waiting").exists(), process.stderr.read().decode() if process.poll() is not None else ""
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert marker.read_text() == "rolled back"
    assert b"KeyboardInterrupt" in stderr and process.returncode != 0


def test_the_journal_saves_every_judged_step_with_what_was_seen() -> None:
    clock = FakeClock()
    entry = journal(clock)
    entry.run(experiment(System(clock, lag=0.4)))
    saved = json.loads(json.dumps(entry.to_dict(), default=str))
    kinds = [step["kind"] for step in saved["steps"]]
    assert kinds == ["steady_state", "fault", "symptom", "fix", "recovery", "steady_state_after", "rollback", "rollback"]
    symptom = next(step for step in saved["steps"] if step["kind"] == "symptom")
    assert symptom["ok"] is True and symptom["evidence"]["attempts"] == 3 and symptom["evidence"]["seen"] == "yes"
    assert saved["experiment"] == "test" and saved["deviations"] == []


def test_checks_alone_judge_a_steady_system_and_report_every_deviation() -> None:
    clock = FakeClock()
    checks = [Probe("unit a", lambda: False, holds("MemoryMax=2G", SYMPTOM_LINE)),
              Probe("unit b", lambda: True, holds("MemoryMax=2G", SYMPTOM_LINE)),
              Probe("unit c", lambda: Observation(False, "MemoryMax=4G"), holds("MemoryMax=2G", SYMPTOM_LINE))]
    with pytest.raises(ExperimentDeviated) as caught:
        journal(clock).run(Experiment("static", steady_state=[], checks=checks))
    assert [d.phase for d in caught.value.deviations] == ["check", "check"]
    assert "the system: MemoryMax=4G" in str(caught.value)


def test_beyond_the_runbook_a_defect_fails_its_row_unless_accepted_by_name(tmp_path: Path) -> None:
    from harness.reporting import _beyond_row
    from harness.target import accepted_findings

    leak = {"name": "target-secret:OBSERVER_TOKEN:audit-spool", "title": "the target wrote the secret", "detail": "x",
            "severity": "defect"}
    note = {"title": "replayd listens on port 1 and answers no HTTP", "detail": "y", "severity": "info"}
    assert _beyond_row("beyond:target-secrets", "t", [], [leak, note], {})["outcome"] == FAIL
    (tmp_path / ".quantlab-chaos.toml").write_text(
        '[services."quantlab-replayd.service"]\nport_env = "REPLAYD_PORT"\n\n[accept]\n'
        '"target-secret:OBSERVER_TOKEN:audit-spool" = "OPS-42"\n')
    row = _beyond_row("beyond:target-secrets", "t", [], [leak, note], accepted_findings(tmp_path))
    assert row["outcome"] == PASS
    assert row["findings"][0]["accepted"] == {"by": ".quantlab-chaos.toml line 5", "reason": "OPS-42"}
    hostile = reporting.TestOutcome("t::junk", "beyond:hostile-exchange")
    hostile.note(Report(FAIL, "the run counted a repeated frame twice"))  # type: ignore[arg-type]  # a stand-in TestReport
    row = _beyond_row("beyond:hostile-exchange", "h", [hostile], [], {})
    assert row["outcome"] == FAIL and "counted a repeated frame twice" in row["message"]
    assert exit_code([PASS, row["outcome"]]) == 1


def test_an_acceptance_without_a_reason_is_refused_with_what_to_write(tmp_path: Path) -> None:
    from harness.target import accepted_findings

    (tmp_path / ".quantlab-chaos.toml").write_text('[accept]\n"target-secret:OBSERVER_TOKEN:s3" = ""\n')
    with pytest.raises(HarnessError, match="needs a reason"):
        accepted_findings(tmp_path)


def test_a_probe_in_the_setup_is_judged_before_the_step_that_needs_it_and_blocks() -> None:
    clock = FakeClock()
    started: list[str] = []
    setup: list[Probe | Action] = [Probe("a healthy canary", lambda: False, holds("a canary passes"), blocks="canary"),
             Action("a live run", lambda: started.append("live run"))]
    with pytest.raises(SteadyStateNotReached) as caught:
        journal(clock).run(experiment(System(clock), setup=setup))
    assert caught.value.blocked_by == "canary" and not started


def test_an_action_among_the_checks_is_a_step_whose_effect_the_next_probes_judge() -> None:
    from harness.sysd.status import ServiceFailed

    clock = FakeClock()
    unit = {"active": True}

    def restart() -> None:
        raise ServiceFailed("quantlab-worker.service did not come back: exit 1")

    checks: list[Probe | Action] = [Action("systemctl stop quantlab-worker", lambda: unit.update(active=False)),
              Probe("the process table", lambda: not unit["active"], holds("stop leaves no process", SYMPTOM_LINE)),
              Action("systemctl restart quantlab-worker", restart, source=FIX_LINE),
              Probe("the unit", lambda: unit["active"], holds("restart leaves it active", FIX_LINE))]
    with pytest.raises(ExperimentDeviated) as caught:
        journal(clock).run(Experiment("verbs", steady_state=[], checks=checks))
    assert [(d.phase, d.source) for d in caught.value.deviations] == [("check", FIX_LINE), ("check", FIX_LINE)]
    assert "did not come back" in caught.value.deviations[0].seen
