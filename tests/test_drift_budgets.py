"""The budget/guard, start/stop and safety-defaults scenarios can fail: against a twin copy with one behaviour
changed so it disagrees with the runbook, the scenario fails and its message names the runbook line broken."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness.target import PROJECT_ROOT
from quantlab_chaos.runbook import Runbook, Source, load_runbook
from tests.twin_copy import twin_copy

SCENARIOS = PROJECT_ROOT / "harness" / "scenarios"
BUDGETS = SCENARIOS / "test_failure_budget_guard_stops.py"
START_STOP = SCENARIOS / "test_start_stop.py"
SAFETY = SCENARIOS / "test_safety_defaults.py"
LIVE_RUN = "core/live/LiveRun.js"
AUDIT_WRITER = "core/audit/AuditWriter.js"
BUDGET_CODE = "core/live/RunBudgets.js"
REPLAYD_UNIT = "ops/systemd/quantlab-replayd.service"
MANIFEST_STOP = "finished_at: this.finishedAt.toISOString(), stop_reason: this.stopReason,"
RATE_DEFAULT = "envInt('RUN_BUDGET_MAX_DECISIONS_PER_MIN', 600, env)"


def run_scenario(copy: Path, node_id: str, *select: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pytest", node_id, "-p", "no:cacheprovider", "-q", "--quantlab-root", str(copy), "-x",
            *select]
    return subprocess.run(argv, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=240)


def runbook_of(copy: Path) -> Runbook:
    return load_runbook(copy / "docs" / "runbook.md")


def assert_fails_naming(result: subprocess.CompletedProcess[str], source: Source, *words: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"the scenario did not fail (exit {result.returncode}):\n{output[-3000:]}"
    line = f"runbook line {source.line}"
    assert line in output, f"the failure does not name {line}:\n{output[-3000:]}"
    for word in words:
        assert word in output, f"the failure does not mention {word!r}:\n{output[-3000:]}"


def test_budget_scenario_fails_when_the_manifest_hides_a_budget_stop(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql", {LIVE_RUN: (MANIFEST_STOP, MANIFEST_STOP.replace(
        "stop_reason: this.stopReason,",
        "stop_reason: this.stopReason === 'BUDGET_EXCEEDED' ? 'STREAM_END' : this.stopReason,"))})
    result = run_scenario(copy, f"{BUDGETS}::test_budget_max_duration_stops_the_run")
    assert_fails_naming(result, runbook_of(copy).failure("budget-guard-stops").symptom_source,
                        "manifest.json has stop_reason STREAM_END")


def test_budget_scenario_fails_when_the_default_spool_is_not_the_fixs_path(tmp_path: Path) -> None:
    elsewhere = tmp_path / "spool-elsewhere"  # inside tmp_path, so the probe leaves nothing on the host
    copy = twin_copy(tmp_path / "ql", {AUDIT_WRITER: ("DEFAULT_SPOOL_DIR = '/tmp/quantlab-audit'",
                                                      f"DEFAULT_SPOOL_DIR = '{elsewhere}'")})
    result = run_scenario(copy, f"{BUDGETS}::test_fix_names_the_default_audit_spool")
    assert_fails_naming(result, runbook_of(copy).failure("budget-guard-stops").fix_source, str(elsewhere))


def test_start_stop_fails_when_a_unit_starts_a_missing_program(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql", {REPLAYD_UNIT: ("services/replayd/server.js", "services/replayd/gone.js")})
    result = run_scenario(copy, str(START_STOP), "-k", "quantlab-replayd")
    start = next(command for command in runbook_of(copy).systemctl if command.action == "start")
    assert_fails_naming(result, start.source, "makes ops/systemd/quantlab-replayd.service active")


def test_safety_defaults_fail_when_a_unit_waits_longer_to_restart(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql", {REPLAYD_UNIT: ("RestartSec=5s", "RestartSec=10s")})
    result = run_scenario(copy, f"{SAFETY}::test_service_units_carry_the_safety_directives")
    assert_fails_naming(result, runbook_of(copy).unit_directive("RestartSec").source,
                        "quantlab-replayd.service: RestartSec=10s")


def test_safety_defaults_fail_when_the_decision_rate_default_drifts(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql", {BUDGET_CODE: (RATE_DEFAULT, RATE_DEFAULT.replace("600", "900"))})
    result = run_scenario(copy, f"{SAFETY}::test_decision_rate_limit_default_observed_in_a_live_run")
    assert_fails_naming(result, runbook_of(copy).env_limit("RUN_BUDGET_MAX_DECISIONS_PER_MIN").source,
                        "max_decision_rate")
