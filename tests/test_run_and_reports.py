"""The main job `quantlab-chaos run`, its reports, and the static drift check `quantlab-chaos runbook check`."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from harness.target import TWIN_ROOT
from tests.twin_copy import twin_copy

CLI = str(Path(sys.executable).with_name("quantlab-chaos"))
ITEM = "failure:live-ws-disabled"
SUMMARY_ITEM_KEYS = {"id", "section", "title", "outcome", "blocked_by", "symptom_observed", "fix_verified", "time_to_detect_s",
                     "time_to_recover_s", "message"}


def chaos(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def one_item_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    reports = tmp_path_factory.mktemp("reports")
    return chaos("run", "--only", ITEM, "-n", "1", "--reports", str(reports)), reports


def test_run_passes_an_item_and_writes_every_report(one_item_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, reports = one_item_run
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(rf"PASS +{re.escape(ITEM)}", done.stdout) and "PASSED" in done.stdout  # progress, then the table
    summary = json.loads((reports / "summary.json").read_text())
    assert {"target", "runbook", "started_at", "duration_s", "items", "drift", "totals", "exit_code",
            "isolation"} <= set(summary)
    rows = {row["id"]: row for row in summary["items"]}
    assert set(rows) == {ITEM}, "only the selected item is listed (--only)"
    assert all(set(row) >= SUMMARY_ITEM_KEYS for row in rows.values())
    assert rows[ITEM]["outcome"] == "pass" and rows[ITEM]["symptom_observed"] and rows[ITEM]["fix_verified"]
    assert rows[ITEM]["time_to_detect_s"] > 0 and rows[ITEM]["time_to_recover_s"] > 0
    assert summary["totals"] == {"pass": 1, "fail": 0, "drift": 0, "blocked": 0, "error": 0}
    assert summary["exit_code"] == 0 and summary["isolation"].startswith(("network namespaces", "port locks"))
    assert "| failure:live-ws-disabled |" in (reports / "summary.md").read_text()
    suite = ElementTree.parse(reports / "junit.xml").getroot().find("testsuite")
    tests = suite.get("tests") if suite is not None else None
    assert tests is not None and int(tests) >= 1


def test_allure_results_have_runbook_steps_labels_and_redacted_attachments(
        one_item_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, reports = one_item_run
    allure_dir = reports / "allure-results"
    results = [json.loads(p.read_text()) for p in allure_dir.glob("*-result.json")]
    scenario = next(r for r in results if r["name"] == "test_live_ws_disabled")
    labels = {label["name"]: label["value"] for label in scenario["labels"]}
    # Numbered in runbook order: the section is the runbook's 5th, the item its 8th.
    assert labels["runbook_item"] == ITEM and labels["runbook_line"] == "49"
    assert labels["feature"] == labels["suite"] == "05. Most Common Failures (Top 5)"
    assert labels["story"] == labels["subSuite"] == f"08. Live WS disabled [{ITEM}]"
    assert labels["epic"] == labels["parentSuite"] == "QuantLab runbook"
    assert scenario["description"].startswith("Proves runbook line 49: ")
    step_names = [step["name"] for step in scenario["steps"]]
    phases = [name.split(":", 1)[0] for name in step_names]
    # The experiment's phases, in the runbook's order, each an allure step.
    assert [p for p in dict.fromkeys(phases) if p != "setup" and not p.startswith("finding")] == [
        "steady state", "fault", "symptom", "fix", "recovery", "steady state after", "nothing lost", "rollback"], phases
    teardowns = teardown_names(allure_dir)
    assert {"quantlab::stop the services, scan what they wrote for secrets", "toxiproxy::remove the toxics, enable the proxies",
            "fake_binance::stop the fake exchange", "journal::save the journal into the test report"} <= teardowns
    assert not [name for name in teardowns if re.search(r"::(<lambda>|\d+)$", name)], teardowns
    attachments = {a["name"] for a in scenario.get("attachments", [])}
    assert {"journal observer", "journal live", "audit spool", "archive objects"} <= attachments
    categories = json.loads((allure_dir / "categories.json").read_text())
    assert [c["name"].split(" (")[0] for c in categories] == ["Runbook drift", "Blocked", "System defect", "Harness error"]
    assert "target=" in (allure_dir / "environment.properties").read_text()
    text = "\n".join(p.read_text(errors="replace") for p in allure_dir.iterdir() if p.is_file())
    assert "OBSERVER_TOKEN=" not in text and "AKQL" not in text, "a secret reached the allure results"


def teardown_names(allure_dir: Path) -> set[str]:
    """The names of the teardown steps in allure's fixture containers."""
    return {after["name"] for path in allure_dir.glob("*-container.json")
            for after in json.loads(path.read_text()).get("afters", [])}


# Scenarios that need no service, run by the harness's plugin in reverse runbook order: what allure and summary.md
# make of findings, failures and the rows beyond the runbook. A security test reports its findings as the real one.
SYNTHETIC_SCENARIOS = '''
import json

import pytest


@pytest.mark.runbook("safety-defaults")
def test_last_item_runs_first(journal):
    journal.finding("a unit restarts too fast", "RestartSec=2 where the runbook says 5s", "warning")


@pytest.mark.runbook("failure:live-ws-disabled")
def test_item_with_a_defect(journal):
    """Leaves a defect."""
    journal.finding("a note", "for the record", "info")
    journal.finding("half-written archive", "a manifest without its events", "defect")
    assert 1 + 1 == 3, "the archive is half written"


@pytest.mark.runbook("start-stop")
def test_first_item_runs_last(journal):
    pass


@pytest.mark.hostile
@pytest.mark.parametrize("kind", ["junk", "huge"])
def test_junk_frames(kind):
    assert kind == "junk"


@pytest.mark.security
def test_probes(request):
    request.node.user_properties.append(("security_probes", json.dumps({"findings": [
        {"title": "replayd serves data without credentials", "detail": "GET / answers 200", "severity": "warning"}]})))
'''


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    (root / "test_synthetic.py").write_text(SYNTHETIC_SCENARIOS)
    done = subprocess.run([sys.executable, "-m", "pytest", str(root / "test_synthetic.py"), "-p", "no:cacheprovider",
                           "-n", "0", "--rootdir", str(root), "--alluredir", str(root / "allure-results"),
                           "--runbook-report", str(root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "2 failed, 4 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    return root


def synthetic_results(root: Path) -> dict[str, dict[str, Any]]:
    results = [json.loads(p.read_text()) for p in (root / "allure-results").glob("*-result.json")]
    return {r["name"]: r for r in results}


def test_allure_groups_follow_the_runbook_and_show_every_finding(synthetic_run: Path) -> None:
    results = synthetic_results(synthetic_run)
    labels = {name: {label["name"]: label["value"] for label in r["labels"]} for name, r in results.items()}
    # Ran in reverse runbook order; the numbered groups sort back into it.
    ran = ["test_last_item_runs_first", "test_item_with_a_defect", "test_first_item_runs_last"]
    assert [labels[name]["feature"] for name in reversed(ran)] == sorted(labels[name]["feature"] for name in ran) == [
        "01. Start / Stop (systemd)", "05. Most Common Failures (Top 5)", "07. Safety Defaults (systemd + limits)"]
    assert labels["test_first_item_runs_last"]["story"] == "01. Start / Stop (systemd) [start-stop]"
    for name in ("test_junk_frames[junk]", "test_junk_frames[huge]"):
        assert (labels[name]["epic"], labels[name]["feature"], labels[name]["story"]) == (
            "Beyond the runbook", "Beyond the runbook: hostile exchange", "junk frames")
        assert labels[name]["parentSuite"] == "Beyond the runbook" and labels[name]["suite"].endswith("hostile exchange")
    assert labels["test_probes"]["feature"] == "Beyond the runbook: security"
    security_finding = results["warning: replayd serves data without credentials"]
    assert {"name": "feature", "value": "Beyond the runbook: security"} in security_finding["labels"]

    defect = results["test_item_with_a_defect"]
    # The findings, worst first, in the description; a step and a tag each; the defect first in the error.
    assert defect["description"] == ("Proves runbook line 49: 3) **Live WS disabled**\n\nLeaves a defect.\n\n"
                                     "**Findings (2)**\n\n- **defect**: half-written archive: a manifest without its events\n"
                                     "- **info**: a note: for the record")
    assert [s["name"] for s in defect["steps"]] == ["finding [info]: a note", "finding [defect]: half-written archive"]
    tags = {label["value"] for label in defect["labels"] if label["name"] == "tag"}
    assert {"defect finding", "info finding"} <= tags
    assert defect["statusDetails"]["message"].startswith(
        "defect: half-written archive: a manifest without its events\n\nAssertionError: the archive is half written")
    assert "**warning**: replayd serves data without credentials" in results["test_probes"]["description"]
    assert not [name for name in teardown_names(synthetic_run / "allure-results") if re.search(r"<lambda>|::\d+$", name)]


def test_summary_md_gives_each_item_a_verdict_and_the_checks_beyond_the_runbook_rows(synthetic_run: Path) -> None:
    text = (synthetic_run / "summary.md").read_text()
    items_table, _, rest = text.partition("\n## ")  # the items' table; the remedy's table further down has rows too
    remedy = rest[rest.index("Remedy (reports/remedy/"):]
    assert f"| {ITEM} | fail | nothing | none | not applicable | The system does not do what the runbook says" in remedy
    assert (synthetic_run / "remedy" / "REMEDY.md").is_file()
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in items_table.splitlines() if line.startswith("| ")}
    assert rows[ITEM].endswith("| 1 defect, 1 info; defect: half-written archive | the archive is half written |"), rows[ITEM]
    assert "| **fail** |" in rows[ITEM] and "assert" not in rows[ITEM]  # pytest's explanation is not a verdict
    assert rows["start-stop"].endswith("| - | as runbook line 3 says |")
    assert rows["safety-defaults"].endswith("| 1 warning; warning: a unit restarts too fast | as runbook line 68 says |")
    assert "- Beyond the runbook: 2 pass, 1 fail" in text
    beyond = text[text.index("## Beyond the runbook (checks the runbook does not list)"):]
    hostile = next(line for line in beyond.splitlines() if "(`beyond:hostile-exchange`)" in line)
    assert hostile.startswith("| Hostile exchange (")
    assert hostile.endswith("| **fail** | 2 | - | test_junk_frames[huge]: assert 'huge' == 'junk' |"), hostile
    security = next(line for line in beyond.splitlines() if "(`beyond:security-probes`)" in line)
    assert security.endswith("| **pass** | 1 | 1 warning; warning: replayd serves data without credentials | 1 test(s) passed |")
    # the items' table comes first, the rows beyond the runbook right after it
    assert text.index("| safety-defaults |") < text.index("## Beyond the runbook") < text.index("## Findings")


def test_a_broken_target_fails_the_run_and_the_summary_names_the_item(tmp_path: Path) -> None:
    broken = twin_copy(tmp_path / "broken", {
        "core/live/BinanceFuturesStream.js": ("export const LIVE_WS_DISABLED = 'CORE_LIVE_WS_DISABLED';",
                                               "export const LIVE_WS_DISABLED = 'LIVE_INGEST_OFF';"),
    })
    reports = tmp_path / "reports"
    done = chaos("run", "--quantlab-root", str(broken), "--only", ITEM, "-n", "1", "--reports", str(reports))
    assert done.returncode == 1, done.stdout[-2000:]
    row = next(r for r in json.loads((reports / "summary.json").read_text())["items"] if r["id"] == ITEM)
    assert row["outcome"] == "fail" and row["symptom_observed"] is False
    assert "runbook line" in row["message"] and "CORE_LIVE_WS_DISABLED" in row["message"]


def test_run_rejects_an_unknown_item_with_the_list_of_items() -> None:
    done = chaos("run", "--only", "failure:nope")
    assert done.returncode == 2 and "its items are" in done.stderr and "Traceback" not in done.stderr


def test_run_rejects_a_folder_that_is_not_a_checkout(tmp_path: Path) -> None:
    done = chaos("run", "--quantlab-root", str(tmp_path))
    assert done.returncode == 2 and "does not look like a QuantLab checkout" in done.stderr


def test_runbook_check_names_an_edited_symptom_code(tmp_path: Path) -> None:
    edited = tmp_path / "runbook.md"
    edited.write_text((TWIN_ROOT / "docs" / "runbook.md").read_text().replace("`CORE_LIVE_WS_DISABLED`", "`LIVE_WS_IS_OFF`"))
    done = chaos("runbook", "check", "--runbook", str(edited), "--json", timeout=120)
    assert done.returncode == 1
    drift = [d for d in json.loads(done.stdout)["drift"] if d["kind"] == "code"]
    assert drift == [{"kind": "code", "item": ITEM, "runbook": "LIVE_WS_IS_OFF",
                      "system": "no source file of the target mentions this code", "line": drift[0]["line"],
                      "subject": "LIVE_WS_IS_OFF", "want": "LIVE_WS_IS_OFF", "have": "", "where": ""}]


def test_runbook_check_reports_unit_drift_of_a_real_quantlab_layout(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql", {
        "core/observer-api/quantlab-observer.service": ("Environment=OBSERVER_PORT=9150", "Environment=OBSERVER_PORT=3000"),
        "ops/systemd/quantlab-worker.service": ("RestartSec=5s", "RestartSec=2"),
    })
    done = chaos("runbook", "check", "--quantlab-root", str(copy), "--json", timeout=120)
    kinds = {(d["kind"], d["runbook"]) for d in json.loads(done.stdout)["drift"]}
    assert done.returncode == 1
    assert ("port", "observer on port 9150") in kinds and ("safety-default", "RestartSec=5s") in kinds


def test_runbook_check_bad_input_exits_2(tmp_path: Path) -> None:
    done = chaos("runbook", "check", "--runbook", str(tmp_path / "missing.md"))
    assert done.returncode == 2 and "does not exist" in done.stderr
    (tmp_path / "x.md").write_text("# Not a runbook\n")
    done = chaos("runbook", "check", "--runbook", str(tmp_path / "x.md"))
    assert done.returncode == 2 and "no runbook sections" in done.stderr


def test_runbook_show_prints_the_model() -> None:
    done = chaos("runbook", "show", "--json", timeout=60)
    assert done.returncode == 0
    data = json.loads(done.stdout)
    assert len(data["items"]) == 14 and data["failures"][2]["symptom_ids"]["codes"] == ["CORE_LIVE_WS_DISABLED"]


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="headless Chromium is not installed (make test installs it with apt where it can)")
def test_html_report_renders_the_runbook_items_in_headless_chromium(
        one_item_run: tuple[subprocess.CompletedProcess[str], Path], tmp_path: Path) -> None:
    from harness.run import render_html
    from tests.browser import rendered_text

    _, reports = one_item_run
    out = render_html(reports / "allure-results", tmp_path / "html")
    text = rendered_text(out)
    # grouped by runbook section, then item: the scenario's section and the drift group render
    assert "QuantLab runbook" in text and "05. Most Common Failures (Top 5)" in text, text[:2000]
    assert "Passed 1" in text, text[:2000]


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="headless Chromium is not installed (make test installs it with apt where it can)")
def test_html_report_tree_is_in_runbook_order_and_a_test_shows_its_defect(synthetic_run: Path, tmp_path: Path) -> None:
    from harness.run import render_html
    from tests.browser import rendered_text

    out = render_html(synthetic_run / "allure-results", tmp_path / "html")
    text = rendered_text(out)
    groups = ["01. Start / Stop (systemd)", "05. Most Common Failures (Top 5)", "07. Safety Defaults (systemd + limits)",
              "Beyond the runbook: hostile exchange", "Beyond the runbook: security"]
    assert all(group in text for group in groups), text[:3000]
    # the scenarios ran in reverse runbook order: the tree must not follow their start times
    assert sorted(groups, key=text.index) == groups, ("the tree is in start-time order: tools/allure/allurerc.json "
                                                      'needs "defaultSortBy": "name,asc"\n' + text[:3000])
    defect = next(json.loads(p.read_text())["id"] for p in (out / "data" / "test-results").glob("*.json")
                  if json.loads(p.read_text())["name"] == "test_item_with_a_defect")
    page = rendered_text(out, f"index.html#/{defect}")
    error = page[page.index("Error"):]
    assert error.index("defect: half-written archive") < error.index("the archive is half written"), page[:3000]
    assert "journal::save the journal into the test report" in page and "lambda" not in page, page[:3000]
