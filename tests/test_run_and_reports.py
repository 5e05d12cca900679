"""The main job `quantlab-chaos run`, its reports, and the static drift check `quantlab-chaos runbook check`."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from tests.twin_copy import twin_copy
from harness.target import TWIN_ROOT

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
    assert all(SUMMARY_ITEM_KEYS <= set(row) for row in rows.values())
    assert rows[ITEM]["outcome"] == "pass" and rows[ITEM]["symptom_observed"] and rows[ITEM]["fix_verified"]
    assert rows[ITEM]["time_to_detect_s"] > 0 and rows[ITEM]["time_to_recover_s"] > 0
    assert summary["totals"] == {"pass": 1, "fail": 0, "drift": 0, "blocked": 0, "error": 0}
    assert summary["exit_code"] == 0 and summary["isolation"].startswith(("network namespaces", "port locks"))
    assert "| failure:live-ws-disabled |" in (reports / "summary.md").read_text()
    junit = ElementTree.parse(reports / "junit.xml").getroot()
    assert int(junit.find("testsuite").get("tests")) >= 1


def test_allure_results_have_runbook_steps_labels_and_redacted_attachments(
        one_item_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, reports = one_item_run
    allure_dir = reports / "allure-results"
    results = [json.loads(p.read_text()) for p in allure_dir.glob("*-result.json")]
    scenario = next(r for r in results if r["name"] == "test_live_ws_disabled")
    labels = {label["name"]: label["value"] for label in scenario["labels"]}
    assert labels["runbook_item"] == ITEM and labels["feature"] == "Most Common Failures (Top 5)"
    step_names = [step["name"] for step in scenario["steps"]]
    phases = [name.split(":", 1)[0] for name in step_names]
    # The experiment's phases, in the runbook's order, each an allure step.
    assert [p for p in dict.fromkeys(phases) if p != "setup"] == [
        "steady state", "fault", "symptom", "fix", "recovery", "steady state after", "nothing lost", "rollback"], phases
    attachments = {a["name"] for a in scenario.get("attachments", [])}
    assert {"journal observer", "journal live", "audit spool", "archive objects"} <= attachments
    categories = json.loads((allure_dir / "categories.json").read_text())
    assert [c["name"].split(" (")[0] for c in categories] == ["Runbook drift", "Blocked", "System defect", "Harness error"]
    assert "target=" in (allure_dir / "environment.properties").read_text()
    text = "\n".join(p.read_text(errors="replace") for p in allure_dir.iterdir() if p.is_file())
    assert "OBSERVER_TOKEN=" not in text and "AKQL" not in text, "a secret reached the allure results"


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
                      "system": "no source file of the target mentions this code", "line": drift[0]["line"]}]


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
    assert "QuantLab runbook" in text and "Most Common Failures (Top 5)" in text, text[:2000]
    assert "Passed 1" in text, text[:2000]
