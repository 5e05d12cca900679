"""The safety-defaults item can fail: a twin copy whose worker unit lacks MemoryMax= fails the item, and the verdict
names the runbook line of MemoryMax= and says what would happen without it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness.target import PROJECT_ROOT
from quantlab_chaos import items
from quantlab_chaos.runbook import load_runbook
from tests.twin_copy import twin_copy

WORKER_UNIT = "ops/systemd/quantlab-worker.service"
CLI = str(Path(sys.executable).with_name("quantlab-chaos"))
RUN_TIMEOUT_S = 300


def _run_item(copy: Path, reports: Path, selection: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`quantlab-chaos run --only safety-defaults` of the scenarios matching `selection` against `copy`."""
    argv = [CLI, "run", "--quantlab-root", str(copy), "--only", items.SAFETY_DEFAULTS, "-n", "0", "--reports",
            str(reports), "--pytest-arg=-k", f"--pytest-arg={selection}"]
    done = subprocess.run(argv, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    summary = json.loads((reports / "summary.json").read_text()) if (reports / "summary.json").is_file() else {}
    return done, summary


def test_a_unit_without_memory_max_fails_the_item_naming_the_runbook_line(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql", {WORKER_UNIT: ("MemoryMax=2G\n", "")})
    memory_max = load_runbook(copy / "docs" / "runbook.md").unit_directive("MemoryMax")
    done, summary = _run_item(copy, tmp_path / "reports", "test_service_units_carry_the_safety_directives")
    row = next((row for row in summary.get("items", []) if row["id"] == items.SAFETY_DEFAULTS), None)
    assert row is not None, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 1 and row["outcome"] == "fail", (row["outcome"], row["message"], done.stdout[-3000:])
    assert f"runbook line {memory_max.source.line} says every service unit carries MemoryMax=2G" in row["message"], \
        row["message"]
    assert ("quantlab-worker.service: no MemoryMax=: a leak in quantlab-worker grows until the host's OOM killer "
            "picks a victim") in row["message"], row["message"]
    assert [d["line"] for d in row["deviations"]] == [memory_max.source.line], row["deviations"]
