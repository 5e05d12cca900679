"""`quantlab-chaos remedy`: against twin copies broken in known ways it proposes exactly the fix (a drop-in with the one
missing setting, a runbook patch that gives back the runbook as it was), names a renamed code or env, says why nothing
is proposed for the rest, judges a rerun strictly, and `--verify` turns the items green without touching the copy it
was pointed at."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.annotated import RUNBOOK_HTML
from harness.drift import check_drift
from harness.remedy import report
from harness.remedy.model import NOT_APPLICABLE, NOT_VERIFIED, RUNBOOK, SYSTEM, VERIFIED, Remedy
from harness.remedy.propose import propose
from harness.remedy.runbook_patch import apply_edits
from harness.remedy.verify import checkout_copy, judge
from harness.target import PROJECT_ROOT, TWIN_ROOT, Target
from quantlab_chaos import items
from quantlab_chaos.runbook import load_runbook
from tests.twin_copy import twin_copy

WORKER_UNIT = "ops/systemd/quantlab-worker.service"
CLI = str(Path(sys.executable).with_name("quantlab-chaos"))
VERIFY_TIMEOUT_S = 420


def broken_twin(dest: Path, *, port: str | None = "9151", memory: bool = True,
                renames: dict[str, str] | None = None) -> Path:
    """A twin copy whose worker lacks MemoryMax= (`memory`), whose runbook says `port` for the observer everywhere,
    and whose runbook has each of `renames` (old -> new) replaced."""
    copy = twin_copy(dest, {WORKER_UNIT: ("MemoryMax=2G\n", "")} if memory else None)
    runbook = copy / "docs" / "runbook.md"
    text = runbook.read_text().replace("9150", port) if port else runbook.read_text()
    for old, new in (renames or {}).items():
        assert old in text
        text = text.replace(old, new)
    runbook.write_text(text)
    return copy


def remedy_of(copy: Path, rows: list[dict[str, Any]] | None = None) -> Remedy:
    target = Target.load(copy)
    runbook = load_runbook(target.runbook)
    every_item = {item.id: [f"scenario of {item.id}"] for item in runbook.items()}
    drift = [d.to_dict() for d in check_drift(runbook, target, scenarios=every_item)]
    return propose(runbook, target, drift, rows, "test")


def test_the_remedy_proposes_exactly_the_fix(tmp_path: Path) -> None:
    copy = broken_twin(tmp_path / "ql")
    found = remedy_of(copy)
    assert sorted(p.id for p in found.proposals) == ["dropin:quantlab-worker.service", "runbook:port:9151->9150"]
    [dropin] = found.by_change(SYSTEM)
    assert dropin.dropin is not None
    assert [(s.section, s.key, s.value, s.current) for s in dropin.dropin.settings] == [("Service", "MemoryMax", "2G", "")]
    [port] = found.by_change(RUNBOOK)
    assert set(port.items) == {items.HEALTH_CHECKS, items.KILL_SWITCH, items.STOP_LIVE_RUNS}
    out = report.write(tmp_path / "remedy", found)
    conf = (out / "systemd" / "quantlab-worker.service.d" / "10-runbook-safety.conf").read_text()
    assert [line for line in conf.splitlines() if line and not line.startswith("#")] == ["[Service]", "MemoryMax=2G"]
    assert sorted(p.name for p in (out / "systemd").iterdir()) == ["quantlab-worker.service.d"]
    # The patch gives back the twin's own runbook, prose ("answers on 9150") included, and applies with GNU patch.
    runbook_copy = tmp_path / "runbook.md"
    shutil.copy(copy / "docs" / "runbook.md", runbook_copy)
    if shutil.which("patch"):
        done = subprocess.run(["patch", "--batch", str(runbook_copy), str(out / "runbook.patch")], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
        assert runbook_copy.read_text() == (TWIN_ROOT / "docs" / "runbook.md").read_text()
    assert apply_edits((copy / "docs" / "runbook.md").read_text(), [port]) == (TWIN_ROOT / "docs/runbook.md").read_text()
    patch = (out / "runbook.patch").read_text()
    assert "# evidence: core/observer-api/quantlab-observer.service line 13: OBSERVER_PORT=9150" in patch
    remedy_md = (out / "REMEDY.md").read_text()
    assert "| safety-defaults | drift | `dropin:quantlab-worker.service` | drop-in quantlab-worker.service.d/" in remedy_md
    assert json.loads((out / "remedy.json").read_text())["proposals"][0]["verification"]["status"] == "not run"


def test_the_twin_itself_needs_no_remedy(tmp_path: Path) -> None:
    found = remedy_of(TWIN_ROOT)
    assert found.proposals == [] and found.unproposed == []


def test_a_renamed_code_and_env_name_are_proposed_back(tmp_path: Path) -> None:
    copy = broken_twin(tmp_path / "ql", port=None, memory=False,
                       renames={"`CORE_LIVE_WS_DISABLED`": "`CORE_LIVE_WS_DISABLD`",
                                "`RUN_ARCHIVE_ENABLED=1`": "`RUN_ARCHIVE_ENABLE=1`"})
    found = remedy_of(copy)
    assert sorted(p.id for p in found.proposals) == ["runbook:code:CORE_LIVE_WS_DISABLD->CORE_LIVE_WS_DISABLED",
                                                     "runbook:env:RUN_ARCHIVE_ENABLE->RUN_ARCHIVE_ENABLED"]
    for proposal in found.proposals:
        assert proposal.evidence and " line " in proposal.evidence[0], proposal.evidence
    fixed = apply_edits((copy / "docs" / "runbook.md").read_text(), found.proposals)
    assert fixed == (TWIN_ROOT / "docs" / "runbook.md").read_text()


def test_a_name_with_nothing_close_in_the_checkout_is_not_proposed_and_says_why(tmp_path: Path) -> None:
    copy = broken_twin(tmp_path / "ql", port=None, memory=False,
                       renames={"`CORE_LIVE_WS_DISABLED`": "`ORDER_BOOK_CACHE_DOWN`"})
    found = remedy_of(copy)
    assert found.proposals == []
    [entry] = found.unproposed
    assert entry.item == items.LIVE_WS_DISABLED and "ORDER_BOOK_CACHE_DOWN" in entry.evidence[0]
    assert "operators must decide" in entry.why


ROWS = [
    {"id": items.CANARY, "outcome": "fail", "line": 31, "blocked_by": None, "tests": [],
     "message": "canary FAIL: Cannot convert undefined or null to object",
     "deviations": [{"line": 35, "says": "PASS log from canary", "seen": "status FAIL"}]},
    {"id": items.KILL_SWITCH, "outcome": "blocked", "line": 28, "blocked_by": items.CANARY, "tests": [],
     "message": "[blocked] blocked by runbook item canary", "deviations": []},
    {"id": items.ROTATE_OBSERVER_TOKEN, "outcome": "blocked", "line": 62, "blocked_by": items.HEALTH_CHECKS,
     "tests": [], "message": "[blocked]", "deviations": []},
    {"id": items.START_STOP, "outcome": "blocked", "line": 3, "blocked_by": None, "tests": [],
     "message": "[blocked] not completely installed or built", "deviations": []},
    {"id": items.SELF_TEST, "outcome": "pass", "line": 25, "blocked_by": None, "tests": [], "message": "",
     "deviations": []},
]


def test_every_fail_drift_or_blocked_item_without_a_proposal_says_why(tmp_path: Path) -> None:
    found = remedy_of(broken_twin(tmp_path / "ql"), ROWS)
    why = {entry.item: entry.why for entry in found.unproposed}
    assert set(why) == {items.CANARY, items.KILL_SWITCH, items.ROTATE_OBSERVER_TOKEN, items.START_STOP}
    assert "a defect in the code, reported with its evidence and never patched" in why[items.CANARY]
    assert why[items.KILL_SWITCH].startswith("Blocked by canary") and "also changes its lines" in why[items.KILL_SWITCH]
    assert "shows whether that unblocks it" in why[items.ROTATE_OBSERVER_TOKEN]
    assert "install" in why[items.START_STOP]
    [port] = found.by_change(RUNBOOK)
    assert port.unblocks == (items.ROTATE_OBSERVER_TOKEN,) and items.ROTATE_OBSERVER_TOKEN in port.rerun
    canary = next(entry for entry in found.unproposed if entry.item == items.CANARY)
    assert any("Cannot convert undefined" in e for e in canary.evidence)


def _after(rows: list[dict[str, Any]], drift: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"items": rows, "drift": drift or []}


def _row(item: str, outcome: str, tests: list[tuple[str, str]], deviations: list[dict[str, Any]] | None = None,
         message: str = "") -> dict[str, Any]:
    return {"id": item, "outcome": outcome, "message": message, "deviations": deviations or [],
            "tests": [{"nodeid": f"t.py::{name}", "outcome": result} for name, result in tests]}


def test_a_rerun_is_judged_strictly(tmp_path: Path) -> None:
    found = remedy_of(broken_twin(tmp_path / "ql"))
    dropin = found.by_change(SYSTEM)[0]
    port = found.by_change(RUNBOOK)[0]
    passing = [_row(items.SAFETY_DEFAULTS, "pass", [("units", "pass")]),
               _row(items.HEALTH_CHECKS, "pass", [("idle", "pass")]),
               _row(items.KILL_SWITCH, "blocked", [("stop", "blocked")], message="[blocked] by canary"),
               _row(items.STOP_LIVE_RUNS, "blocked", [("stop", "blocked")], message="[blocked] by canary")]
    judge(found, None, _after(passing))
    assert dropin.verification.status == VERIFIED and "safety-defaults now passes" in dropin.verification.why
    assert port.verification.status == VERIFIED and "kill-switch could not judge its lines" in port.verification.why
    # A deviation on the patched lines, or one that names the unit, is not verified, quoting it.
    still = [_row(items.SAFETY_DEFAULTS, "fail", [("units", "fail")], [
                 {"line": 74, "says": "every service unit carries MemoryMax=2G", "seen": "quantlab-worker.service: no"}]),
             _row(items.HEALTH_CHECKS, "fail", [("idle", "fail")], [
                 {"line": 22, "says": "/observer/health answers 200", "seen": "GET /observer/health answered 404"}])]
    judge(found, None, _after(still))
    assert dropin.verification.status == NOT_VERIFIED and "quantlab-worker.service: no" in dropin.verification.why
    assert port.verification.status == NOT_VERIFIED and "the system is what must change" in port.verification.why
    # Static drift that is still there counts too; a check that no longer ran judges nothing.
    drift = [{"kind": "safety-default", "subject": "quantlab-worker.service", "runbook": "MemoryMax=2G",
              "system": "lacks MemoryMax"}]
    judge(found, None, _after(passing, drift))
    assert dropin.verification.status == NOT_VERIFIED
    earlier = [_row(items.SAFETY_DEFAULTS, "fail", [("units", "fail"), ("limits", "fail")])]
    judge(found, earlier, _after([_row(items.SAFETY_DEFAULTS, "blocked", [("units", "pass"), ("limits", "blocked")],
                                       message="[blocked] by canary")]))
    assert dropin.verification.status == NOT_APPLICABLE and "could not judge" in dropin.verification.why
    judge(found, None, _after([_row(items.SAFETY_DEFAULTS, "error", [("units", "error")], message="[error] boom")]))
    assert dropin.verification.status == NOT_VERIFIED and "the harness itself failed" in dropin.verification.why


def test_the_checkout_copy_links_installed_packages_and_leaves_the_checkout_alone(tmp_path: Path) -> None:
    source = twin_copy(tmp_path / "ql")
    (source / "core" / "node_modules").mkdir()
    copy = checkout_copy(source, tmp_path / "copy")
    assert (copy / "node_modules").is_symlink() and (copy / "node_modules").resolve() == (TWIN_ROOT / "node_modules").resolve()
    assert (copy / "core" / "node_modules").is_symlink()
    assert (copy / "core" / "release" / "SelfTest.js").is_file() and not (copy / "core").is_symlink()


def _digest(root: Path) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file() and "node_modules" not in p.parts)
    return hashlib.sha256(b"".join(p.read_bytes() + str(p).encode() for p in files)).hexdigest()


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "remedy", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)


def test_bad_from_folders_are_refused_in_one_paragraph(tmp_path: Path) -> None:
    copy = broken_twin(tmp_path / "ql")
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _cli("--quantlab-root", str(copy), "--from", str(empty))
    assert done.returncode == 2 and "cannot be read as a run's summary" in done.stderr and "Traceback" not in done.stderr
    (empty / "summary.json").write_text(json.dumps({"target": str(TWIN_ROOT), "items": []}))
    done = _cli("--quantlab-root", str(copy), "--from", str(empty))
    assert done.returncode == 2 and f"that run was against {TWIN_ROOT}" in done.stderr, done.stderr


def test_verify_turns_the_items_green_and_changes_nothing_in_place(tmp_path: Path) -> None:
    """The end to end proof: both proposals verified by a real rerun; the copy it was pointed at is unchanged."""
    copy = broken_twin(tmp_path / "ql")
    before = _digest(copy)
    out = tmp_path / "remedy"
    done = _cli("--quantlab-root", str(copy), "--out", str(out), "--verify", "-n", "2", timeout=VERIFY_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    data = json.loads((out / "remedy.json").read_text())
    statuses = {p["id"]: p["verification"]["status"] for p in data["proposals"]}
    assert statuses == {"dropin:quantlab-worker.service": VERIFIED, "runbook:port:9151->9150": VERIFIED}, data
    rerun = json.loads((out / "verify" / "reports" / "summary.json").read_text())
    assert {row["id"]: row["outcome"] for row in rerun["items"]} == {
        items.HEALTH_CHECKS: "pass", items.KILL_SWITCH: "pass", items.STOP_LIVE_RUNS: "pass",
        items.SAFETY_DEFAULTS: "pass"}
    assert _digest(copy) == before, "the checkout or its runbook was changed in place"
    assert not list(copy.rglob("*.service.d")), "a drop-in was written into the checkout"
    page = (out / RUNBOOK_HTML).read_text()
    assert 'data-proposal="runbook:port:9151-&gt;9150" data-verification="verified"' in page
    assert "| verified |" in (out / "REMEDY.md").read_text()


@pytest.mark.parametrize("flag", ["--verify", ""])
def test_remedy_of_a_clean_checkout_proposes_nothing(flag: str, tmp_path: Path) -> None:
    done = _cli("--out", str(tmp_path / "r"), *([flag] if flag else []))
    assert done.returncode == 0, done.stderr
    assert "0 proposal(s)" in done.stdout and not (tmp_path / "r" / "runbook.patch").exists()
