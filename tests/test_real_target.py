"""The harness's verdicts on a real QuantLab snapshot (../shared/targets/) match what we expect of it, item by item.

`test_real_target_run` prepares each snapshot (tools/prepare_target.py), runs the whole chaos suite on it and
compares summary.json with tests/expectations/<snapshot>.json; deselect it with `-k "not real_target_run"` or
`-m "not real_target"`. The other tests prove the comparison and the expectations files themselves.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.annotated import RUNBOOK_HTML
from tests.real_target import (
    EXPECTATIONS_DIR,
    PREPARE_TIMEOUT_S,
    PROJECT,
    RUN_TIMEOUT_S,
    TARGETS,
    Difference,
    ExpectationsError,
    archive_name,
    archives,
    chaos_run,
    compare,
    compare_remedy,
    expectations_path,
    format_differences,
    keep_reports,
    load_expectations,
    prepare,
    remedy_verify,
    summary_table,
)
from tests.test_annotated_report import assert_page_shows, screenshot

ARCHIVES = archives()
RUNBOOK_ITEMS = {
    "start-stop", "health-checks", "self-test", "kill-switch", "canary", "failure:s3-archive-unreachable",
    "failure:observer-unauthorized", "failure:live-ws-disabled", "failure:budget-guard-stops",
    "failure:archive-missing", "break-glass:stop-live-runs", "break-glass:rotate-observer-token",
    "break-glass:disable-live-ws", "safety-defaults",
}


def expectations(**items: tuple[str, str]) -> dict[str, Any]:
    return {"archive": "demo.tar.gz", "items": {item: {"outcome": outcome, "phrase": phrase, "why": "demo"}
                                                for item, (outcome, phrase) in items.items()}}


def summary(*rows: tuple[str, str, str]) -> dict[str, Any]:
    return {"items": [{"id": item, "outcome": outcome, "message": message, "blocked_by": None, "line": 1}
                      for item, outcome, message in rows]}


EXPECTED = expectations(**{"health-checks": ("drift", "port 3000"), "kill-switch": ("blocked", "no live run")})
HEALTH_OK = ("health-checks", "drift", "[drift] the observer listens on PORT 3000, not 9150")  # the phrase, any case
KILL_OK = ("kill-switch", "blocked", "[blocked] steady state not reached: no live run could be started")
MATCHING = summary(HEALTH_OK, KILL_OK)


def problems(differences: list[Difference]) -> dict[str, str]:
    return {d.item: d.problem for d in differences}


def test_a_matching_summary_has_no_difference() -> None:
    assert compare(EXPECTED, MATCHING) == []


def test_an_empty_phrase_accepts_any_message() -> None:
    expected = expectations(**{"self-test": ("pass", "")})
    assert compare(expected, summary(("self-test", "pass", ""))) == []


def test_a_wrong_outcome_is_reported() -> None:
    got = summary(("health-checks", "fail", "the observer listens on port 3000"), KILL_OK)
    [difference] = compare(EXPECTED, got)
    assert (difference.item, difference.problem) == ("health-checks", "outcome differs")
    assert (difference.expected_outcome, difference.got_outcome) == ("drift", "fail")


def test_a_message_without_the_phrase_is_reported() -> None:
    got = summary(("health-checks", "drift", "the runbook names port 9150"), KILL_OK)
    assert problems(compare(EXPECTED, got)) == {"health-checks": "message lacks the phrase"}


def test_outcome_and_phrase_both_wrong_are_one_difference_naming_both() -> None:
    got = summary(("health-checks", "pass", ""), KILL_OK)
    assert problems(compare(EXPECTED, got)) == {"health-checks": "outcome differs; message lacks the phrase"}


def test_an_item_missing_from_either_side_is_reported() -> None:
    extra = summary(HEALTH_OK, KILL_OK, ("canary", "pass", ""))
    assert problems(compare(EXPECTED, extra)) == {"canary": "not in the expectations file"}
    missing = summary(HEALTH_OK)
    assert problems(compare(EXPECTED, missing)) == {"kill-switch": "missing from summary.json"}


def test_an_error_outcome_is_always_a_difference_with_its_message() -> None:
    got = summary(HEALTH_OK, ("kill-switch", "error", "[error] the harness failed: KeyError: 'pid'"))
    [difference] = compare(EXPECTED, got)
    assert difference.problem == "the harness itself failed on this item (outcome error)"
    assert "KeyError" in difference.got_message
    unexpected = summary(HEALTH_OK, KILL_OK, ("canary", "error", "[error] boom"))
    assert "outcome error" in problems(compare(EXPECTED, unexpected))["canary"]


def test_a_row_without_outcome_says_what_it_has_instead() -> None:
    """Today's harness writes "status" ("pass" | "fail" | "skip"), not "outcome"."""
    got = {"items": [{"id": "health-checks", "status": "fail", "message": "port 3000"}, MATCHING["items"][1]]}
    [difference] = compare(EXPECTED, got)
    assert difference.problem == 'the row has no "outcome"' and difference.got_outcome == "(none; status=fail)"


def test_a_summary_without_items_or_with_duplicates_is_reported() -> None:
    assert problems(compare(EXPECTED, {"totals": {}})) == {"(summary)": 'summary.json has no "items" list'}
    twice = summary(HEALTH_OK, KILL_OK, HEALTH_OK)
    assert problems(compare(EXPECTED, twice)) == {"health-checks": "listed more than once in summary.json"}


def test_the_table_lists_every_difference_in_one_message() -> None:
    got = summary(("health-checks", "fail", "x " * 400), ("canary", "error", "[error] boom"))
    table = format_differences(compare(EXPECTED, got), "demo")
    assert table.startswith("demo: 3 difference(s)")
    for text in ("health-checks", "drift: 'port 3000'", "fail", "canary", "[error] boom", "kill-switch",
                 "missing from summary.json"):
        assert text in table
    assert max(len(line) for line in table.splitlines()) < 500, "long messages are clipped"


def kill_switch(**changes: Any) -> Any:
    return lambda data: data["items"]["kill-switch"].update(changes)


@pytest.mark.parametrize(("edit", "complaint"), [
    pytest.param(lambda data: data.update(items={}), '"items" must be a non-empty object', id="no-items"),
    pytest.param(lambda data: data.update(items=[]), '"items" must be a non-empty object', id="items-a-list"),
    pytest.param(kill_switch(outcome="error"), "'error', which is not one of pass, fail", id="error-expected"),
    pytest.param(lambda data: data["items"]["kill-switch"].pop("phrase"), "item 'kill-switch' lacks ['phrase']",
                 id="no-phrase"),
    pytest.param(kill_switch(phrase=" "), "needs a string of words as 'phrase'", id="blank-phrase"),
    pytest.param(kill_switch(phrase=None), "needs a string of words as 'phrase'", id="phrase-not-a-string"),
    pytest.param(kill_switch(why=""), "needs a non-empty string as 'why'", id="empty-why"),
    pytest.param(kill_switch(reason="x"), "unknown key(s) ['reason']", id="unknown-key"),
    pytest.param(lambda data: data.update(archive="other.tar.gz"),
                 "\"archive\" says 'other.tar.gz' but this file is for 'demo.tar.gz'", id="other-archive"),
])
def test_a_malformed_expectations_file_is_refused_in_one_sentence(tmp_path: Path, edit: Any, complaint: str) -> None:
    data = json.loads(json.dumps(EXPECTED))
    edit(data)
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ExpectationsError) as caught:
        load_expectations(path, "demo.tar.gz")
    message = str(caught.value)
    assert complaint in message and str(path) in message and "\n" not in message


def test_expectations_that_are_not_json_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "demo.json"
    path.write_text('{"archive": "demo.tar.gz",')
    with pytest.raises(ExpectationsError, match="is not valid JSON"):
        load_expectations(path)


def _remedy(*proposals: tuple[str, str, str]) -> dict[str, Any]:
    return {"proposals": [{"id": pid, "title": pid, "verification": {"status": status, "why": why}}
                          for pid, status, why in proposals]}


def test_the_remedy_is_compared_proposal_by_proposal() -> None:
    expected = {**EXPECTED, "remedy": {"dropin:a.service": {"verification": "verified", "why": "demo"},
                                       "runbook:port:1->2": {"verification": "not verified", "why": "demo"}}}
    assert compare_remedy(expected, _remedy(("dropin:a.service", "verified", "it holds"),
                                            ("runbook:port:1->2", "not verified", "404 there"))) == []
    got = problems(compare_remedy(expected, _remedy(("dropin:a.service", "not applicable", "blocked"),
                                                    ("runbook:code:X->Y", "verified", "ok"))))
    assert got == {"dropin:a.service": "verification differs", "runbook:port:1->2": "proposal missing from remedy.json",
                   "runbook:code:X->Y": "proposal not in the expectations file"}
    assert problems(compare_remedy(expected, _remedy(("dropin:a.service", "verified", " "),
                                                     ("runbook:port:1->2", "not verified", "x")))) == {
        "dropin:a.service": "no reason given"}


@pytest.mark.parametrize(("remedy", "complaint"), [
    ([], '"remedy" must be an object'),
    ({"dropin:a": {"verification": "verified"}}, "must be an object with exactly ['verification', 'why']"),
    ({"dropin:a": {"verification": "not run", "why": "x"}}, "expects 'not run', which is not one of"),
    ({"dropin:a": {"verification": "verified", "why": ""}}, "needs a non-empty string as 'why'"),
])
def test_a_malformed_remedy_expectation_is_refused(tmp_path: Path, remedy: Any, complaint: str) -> None:
    path = tmp_path / "demo.json"
    path.write_text(json.dumps({**EXPECTED, "remedy": remedy}))
    with pytest.raises(ExpectationsError, match=re.escape(complaint)):
        load_expectations(path, "demo.tar.gz")


@pytest.mark.parametrize("path", sorted(EXPECTATIONS_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_every_expectations_file_is_well_formed_and_covers_the_runbook(path: Path) -> None:
    data = load_expectations(path, f"{path.stem}.tar.gz")
    assert set(data["items"]) == RUNBOOK_ITEMS


@pytest.mark.real_target
@pytest.mark.timeout(PREPARE_TIMEOUT_S + RUN_TIMEOUT_S + 120)
@pytest.mark.parametrize("archive", ARCHIVES or [None], ids=[archive_name(a) for a in ARCHIVES] or ["no-snapshot"])
def test_real_target_run(archive: Path | None, tmp_path: Path) -> None:
    if archive is None:
        pytest.skip(f"{TARGETS} is absent or holds no *.tar.gz: there is no real QuantLab snapshot to run the "
                    f"harness against")
    expectations_file = expectations_path(archive)
    try:  # a malformed file is found before a run of many minutes, not after
        expected = load_expectations(expectations_file, archive.name) if expectations_file.is_file() else None
    except ExpectationsError as exc:
        pytest.fail(str(exc), pytrace=False)

    root, preparing = prepare(archive, tmp_path / "prepare")
    assert root is not None, f"preparing {archive.name} failed:\n{preparing.tail()}"
    reports = tmp_path / "reports"
    run = chaos_run(root, reports, tmp_path / "run")
    kept = keep_reports(reports, archive)
    assert run.code is not None, f"the chaos run on {archive.name} did not end in {RUN_TIMEOUT_S:.0f} s:\n{run.tail()}"
    assert (reports / "summary.json").is_file(), f"the chaos run on {archive.name} wrote no summary.json:\n{run.tail()}"
    got = json.loads((reports / "summary.json").read_text())
    outcomes = {row["id"]: row["outcome"] for row in got["items"]}
    assert_page_shows(reports / RUNBOOK_HTML, outcomes, got["items"][0]["id"])
    screenshot(reports / RUNBOOK_HTML, reports / "runbook.png")
    for name in (RUNBOOK_HTML, "runbook.png"):
        shutil.copy2(reports / name, kept / name)
    shown = expectations_file.relative_to(PROJECT)
    assert expected is not None, f"there is no {shown}; write it from what the run concluded:\n{summary_table(got)}"
    differences = compare(expected, got)
    if differences:  # one message with every difference, without pytest's repr of the list after it
        title = f"the harness's verdicts on {archive.name} against {shown}"
        pytest.fail(format_differences(differences, title)
                    + f"\n(the run's summary.json and summary.md are in {kept.relative_to(PROJECT)}/)", pytrace=False)
    check_remedy(root, reports, tmp_path, archive, expected)


def check_remedy(root: Path, reports: Path, tmp_path: Path, archive: Path, expected: dict[str, Any]) -> None:
    """`remedy --from REPORTS --verify` on the snapshot: each proposal verified or not as the expectations say, with
    its reason; the runbook patch applies with GNU patch to a copy of the runbook; the checkout is left as it was."""
    before = sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*.service*") if "node_modules" not in p.parts)
    verifying = remedy_verify(root, reports, tmp_path / "remedy")
    keep_reports(reports, archive)
    remedy_json = reports / "remedy" / "remedy.json"
    assert verifying.code is not None, f"remedy --verify did not end in {RUN_TIMEOUT_S:.0f} s:\n{verifying.tail()}"
    assert remedy_json.is_file(), f"remedy --verify wrote no remedy.json (exit {verifying.code}):\n{verifying.tail()}"
    assert verifying.code in (0, 1), f"remedy --verify failed (exit {verifying.code}):\n{verifying.tail()}"
    remedy = json.loads(remedy_json.read_text())
    differences = compare_remedy(expected, remedy)
    if differences:
        pytest.fail(format_differences(differences, f"the remedy's verifications on {archive.name}"), pytrace=False)
    patch_file = reports / "remedy" / "runbook.patch"
    if patch_file.is_file() and shutil.which("patch"):
        runbook_copy = tmp_path / "runbook.md"
        shutil.copy(root / "docs" / "runbook.md", runbook_copy)
        done = subprocess.run(["patch", "--batch", str(runbook_copy), str(patch_file)], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, f"runbook.patch does not apply with patch: {done.stdout}{done.stderr}"
    after = sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*.service*") if "node_modules" not in p.parts)
    assert after == before, "remedy --verify wrote into the checkout's units"
    assert "## Remedy" in (reports / "summary.md").read_text()

