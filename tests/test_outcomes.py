"""The five outcomes: how a scenario's end is read, how an item's scenarios combine, and the exit code."""
from __future__ import annotations

from pathlib import Path

import pytest

from canary.checks import TargetUnreachable
from harness.journal import RunbookViolation
from harness.outcomes import (
    BLOCKED,
    DRIFT,
    ERROR,
    FAIL,
    PASS,
    SKIPPED,
    DriftFound,
    SteadyStateNotReached,
    classify,
    exit_code,
    one_sentence,
    worst,
)
from harness.reporting import ItemSummary, _junit_address, junit_errors
from harness.reporting import TestOutcome as ScenarioOutcome
from quantlab_chaos.errors import MissingToolError
from quantlab_chaos.runbook import RunbookItem, Source


@pytest.mark.parametrize(("exc", "outcome"), [
    (None, PASS),
    (RunbookViolation("runbook line 3: the runbook says x; the system did y"), FAIL),
    (AssertionError("plain assertion about the system"), FAIL),
    (TargetUnreachable("the observer at http://127.0.0.1:9150 did not answer"), FAIL),
    (SteadyStateNotReached("the canary failed", blocked_by="canary"), BLOCKED),
    (DriftFound("the runbook restarts a unit the checkout lacks"), DRIFT),
    (MissingToolError("node is not on PATH"), ERROR),
    (KeyError("a harness bug"), ERROR),
])
def test_classify_reads_each_end_as_one_outcome(exc: BaseException | None, outcome: str) -> None:
    assert classify(exc).outcome == outcome


def test_blocked_names_its_blocker_and_error_says_it_is_ours() -> None:
    blocked = classify(SteadyStateNotReached("no healthy canary run", blocked_by="canary"))
    assert blocked.blocked_by == "canary" and "blocked by runbook item canary" in blocked.message
    error = classify(ValueError("boom"))
    assert error.message.startswith("[error] the harness failed: ValueError: boom")


def test_worst_follows_the_precedence() -> None:
    assert worst([PASS, DRIFT, BLOCKED]) == BLOCKED
    assert worst([BLOCKED, ERROR]) == ERROR
    assert worst([ERROR, FAIL, PASS]) == FAIL
    assert worst([SKIPPED]) is None
    assert worst([]) is None


@pytest.mark.parametrize(("outcomes", "code"), [
    ([PASS, PASS], 0), ([PASS, DRIFT], 1), ([BLOCKED], 1), ([FAIL, PASS], 1), ([FAIL, ERROR], 3), ([], 0),
])
def test_exit_code(outcomes: list[str], code: int) -> None:
    assert exit_code(outcomes) == code


def test_one_sentence_flattens_and_cuts_at_a_word() -> None:
    text = "line one\n  line two " + "word " * 200
    cut = one_sentence(text, 60)
    assert "\n" not in cut and len(cut) <= 60 and cut.endswith("…") and cut.startswith("line one line two")


def _item() -> RunbookItem:
    return RunbookItem(id="kill-switch", section="Kill-Switch", title="Kill-Switch", source=Source(28, "- curl"))


def _test(outcome: str, message: str = "", blocked_by: str | None = None, name: str = "t") -> ScenarioOutcome:
    return ScenarioOutcome(nodeid=f"harness/scenarios/test_x.py::{name}", item="kill-switch", outcome=outcome,
                       message=message, blocked_by=blocked_by)


def test_item_takes_the_strongest_scenario_outcome_and_its_blocker() -> None:
    summary = ItemSummary(_item(), [_test(PASS, name="a"), _test(BLOCKED, "[blocked] no canary", "canary", "b")])
    outcome, message, blocked_by = summary.verdict()
    assert (outcome, blocked_by) == (BLOCKED, "canary") and message.startswith("b: [blocked] no canary")
    summary.tests.append(_test(FAIL, "runbook line 28: the run kept running", name="c"))
    assert summary.verdict()[0] == FAIL


def test_static_drift_turns_a_passing_item_to_drift_but_not_a_failing_one() -> None:
    drift = {"kind": "port", "item": "kill-switch", "runbook": "observer on port 9150", "system": "unit sets 3000",
             "line": 28}
    passing = ItemSummary(_item(), [_test(PASS)], [drift])
    outcome, message, _ = passing.verdict()
    assert outcome == DRIFT and "observer on port 9150" in message and "unit sets 3000" in message
    failing = ItemSummary(_item(), [_test(FAIL, "runbook line 28: no")], [drift])
    assert failing.verdict()[0] == FAIL


def test_an_item_without_a_scenario_that_ran_is_an_error() -> None:
    assert ItemSummary(_item(), []).verdict()[0] == ERROR
    skipped = ItemSummary(_item(), [_test(SKIPPED, "Docker is not running")])
    outcome, message, _ = skipped.verdict()
    assert outcome == ERROR and "Docker is not running" in message


def test_junit_error_scenarios_become_error_elements(tmp_path: Path) -> None:
    nodeid = "harness/scenarios/test_x.py::test_a[p1]"
    classname, name = _junit_address(nodeid)
    assert (classname, name) == ("harness.scenarios.test_x", "test_a[p1]")
    xml = tmp_path / "junit.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="0" failures="2" tests="2">'
                   f'<testcase classname="{classname}" name="{name}"><failure message="x">x</failure></testcase>'
                   f'<testcase classname="{classname}" name="test_b"><failure message="y">y</failure></testcase>'
                   '</testsuite></testsuites>')
    junit_errors(xml, {nodeid})
    text = xml.read_text()
    assert text.count("<error") == 1 and text.count("<failure") == 1
    assert 'errors="1"' in text and 'failures="1"' in text
