"""The S3, archive, canary and self-test scenarios can fail: each is run against a copy of the twin with one
behaviour changed so it disagrees with the runbook, and must fail naming the runbook line it disagrees with."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.scenarios.test_self_test import _exit_codes as exit_codes
from harness.target import TWIN_ROOT
from quantlab_chaos.runbook import Runbook, load_runbook

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = PROJECT_ROOT / "harness" / "scenarios"
RUN_TIMEOUT_S = 180.0


def _twin_copy(tmp_path: Path) -> Path:
    """A copy of the twin without node_modules (linked back, so the copy needs no install)."""
    copy = tmp_path / "quantlab"
    shutil.copytree(TWIN_ROOT, copy, ignore=shutil.ignore_patterns("node_modules"), symlinks=True)
    (copy / "node_modules").symlink_to(TWIN_ROOT / "node_modules", target_is_directory=True)
    return copy


def _change(copy: Path, relative: str, old: str, new: str) -> None:
    path = copy / relative
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{relative} no longer contains {old!r}; update this drift test to the twin's code"
    path.write_text(text.replace(old, new), encoding="utf-8")


def _run_scenario(copy: Path, scenario: str, selection: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PYTEST_", "QUANTLAB_ROOT"))}
    argv = [sys.executable, "-m", "pytest", str(SCENARIOS / scenario), "-p", "no:cacheprovider", "-q",
            "--quantlab-root", str(copy), "-x", "-k", selection]
    return subprocess.run(argv, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


@pytest.fixture(scope="module")
def runbook() -> Runbook:
    return load_runbook(TWIN_ROOT / "docs" / "runbook.md")


def _line_of(runbook: Runbook, pick: Callable[[Runbook], int]) -> str:
    return f"runbook line {pick(runbook)}"


def _assert_fails_naming(result: subprocess.CompletedProcess[str], line: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"the scenario did not fail as a test (exit {result.returncode}):\n{output[-3000:]}"
    assert line in output, f"the failure does not name {line}:\n{output[-3000:]}"


def test_s3_scenario_fails_when_self_test_skips_s3(tmp_path: Path, runbook: Runbook) -> None:
    copy = _twin_copy(tmp_path)
    # Both S3 steps always report "skipped", as if archiving were off: the self-test passes with S3 down.
    skipped = "if (!target) return { status: 'skipped', reason: 'RUN_ARCHIVE_ENABLED=0' };"
    _change(copy, "core/release/SelfTest.js", skipped, "return { status: 'skipped', reason: 'RUN_ARCHIVE_ENABLED=0' };")
    result = _run_scenario(copy, "test_failure_s3_archive_unreachable.py", "refused")
    _assert_fails_naming(result, _line_of(runbook, lambda r: r.failure("s3-archive-unreachable").symptom_source.line))


def test_archive_missing_scenario_fails_when_canary_skips_archive_check(tmp_path: Path, runbook: Runbook) -> None:
    copy = _twin_copy(tmp_path)
    _change(copy, "tools/run-canary-live.js",
            "const archiveDir = await checkArchive(options, archive, result.live_run_id, env);",
            "const archiveDir = 'not checked';")
    result = _run_scenario(copy, "test_failure_archive_missing.py", "archiving_off")
    _assert_fails_naming(result, _line_of(runbook, lambda r: r.failure("archive-missing").symptom_source.line))


def test_canary_scenario_fails_when_canary_exits_non_zero_on_pass(tmp_path: Path, runbook: Runbook) -> None:
    copy = _twin_copy(tmp_path)
    _change(copy, "tools/run-canary-live.js", "    return 0;\n  } finally {", "    return 3;\n  } finally {")
    result = _run_scenario(copy, "test_canary_validation.py", "canary")
    _assert_fails_naming(result, _line_of(runbook, lambda r: r.canary_expected[0][1].line))


def test_self_test_scenario_fails_when_config_check_ignores_token(tmp_path: Path, runbook: Runbook) -> None:
    copy = _twin_copy(tmp_path)
    _change(copy, "core/release/ConfigCheck.js", "const required = ['OBSERVER_TOKEN'];", "const required = [];")
    result = _run_scenario(copy, "test_self_test.py", "missing_token")
    # The symptom quotes the runbook's prose that gives the self-test commands' exit codes.
    _, prose = exit_codes(runbook)
    _assert_fails_naming(result, _line_of(runbook, lambda r: prose.line if prose else r.self_tests[0].source.line))


S3_CLIENT = "core/lib/s3.js"
BOUNDED_SEND = "if (options.abortSignal) return send(command, options);"
S3_ITEM = "failure:s3-archive-unreachable"
CLI = str(Path(sys.executable).with_name("quantlab-chaos"))


def _run_item(copy: Path, reports: Path, selection: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`quantlab-chaos run` of the S3 item's scenarios matching `selection` against `copy`; its summary.json."""
    argv = [CLI, "run", "--quantlab-root", str(copy), "--only", S3_ITEM, "-n", "0", "--reports", str(reports),
            "--pytest-arg=-k", f"--pytest-arg={selection}"]
    done = subprocess.run(argv, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    summary = json.loads((reports / "summary.json").read_text()) if (reports / "summary.json").is_file() else {}
    return done, summary


def test_a_self_test_that_hangs_on_a_black_holed_s3_fails_the_item_not_passes_it(tmp_path: Path, runbook: Runbook) -> None:
    """Without the twin's S3 timeout its self-test hangs like QuantLab's: the hang is not the runbook's symptom."""
    copy = _twin_copy(tmp_path)
    _change(copy, S3_CLIENT, BOUNDED_SEND, "return send(command, options);")
    done, summary = _run_item(copy, tmp_path / "reports", "blackhole")
    row = next(row for row in summary.get("items", []) if row["id"] == S3_ITEM)
    failure = runbook.failure("s3-archive-unreachable")
    assert done.returncode == 1 and row["outcome"] == "fail", done.stdout[-3000:]
    assert f"runbook line {failure.symptom_source.line} says Symptom: {failure.symptom}" in row["message"], row["message"]
    assert re.search(r"the system: the self-test did not finish in \d+(\.\d+)? s", row["message"]), row["message"]


def test_time_to_detect_comes_from_polling_and_moves_when_the_twin_reacts_more_slowly(tmp_path: Path) -> None:
    """The same black-holed S3 against the twin as it is (3 s S3 bound) and a copy whose bound is 7 s."""
    figures = {}
    for label, bound in (("as is", None), ("slowed", "7000")):
        copy = _twin_copy(tmp_path / label.replace(" ", "-"))
        if bound:
            _change(copy, S3_CLIENT, "DEFAULT_S3_TIMEOUT_MS = 3000", f"DEFAULT_S3_TIMEOUT_MS = {bound}")
        done, summary = _run_item(copy, tmp_path / f"reports-{label.replace(' ', '-')}", "blackhole")
        row = next(row for row in summary.get("items", []) if row["id"] == S3_ITEM)
        assert row["outcome"] == "pass", (label, row["message"], done.stdout[-2000:])
        figures[label] = row["time_to_detect_s"]
    assert figures["as is"] is not None and figures["slowed"] is not None
    # Each S3 call waits its bound once before the self-test step and the archive write fail: 4 s more at least.
    assert figures["slowed"] - figures["as is"] >= 3.0, figures
