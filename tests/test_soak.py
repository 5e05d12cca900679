"""`quantlab-chaos soak`: the comparison of runs, its reports, the CPU pressure and a real two-run soak."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from harness.soak import (
    NO_REPORT,
    CpuPressure,
    RunResult,
    collect_run,
    find_flakes,
    markdown,
    report,
    write_report,
)
from harness.target import PROJECT_ROOT
from quantlab_chaos.waiting import wait_until

FAST_ITEM = "failure:live-ws-disabled"
FAST_TEST = "harness/scenarios/test_failure_live_ws_disabled.py::test_live_ws_disabled"
NO_PRESSURE = {"enabled": False, "processes": 0, "nice": 0}


def _result(run: int, outcomes: dict[str, str], messages: dict[str, str] | None = None, source: str = "junit") -> RunResult:
    failed = any(o in ("failed", "error") for o in outcomes.values())
    return RunResult(run, 1 if failed else 0, 1.0, source, f"/r/{run}",
                     outcomes, messages or {}, {test: float(run) for test in outcomes})


def _soak(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", "soak", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_differing_outcomes_are_listed_with_their_run_numbers() -> None:
    runs = [
        _result(1, {"t::stable": "passed", "t::flaky": "passed", "t::broken": "failed"}),
        _result(2, {"t::stable": "passed", "t::flaky": "failed", "t::broken": "failed"}, {"t::flaky": "timed out"}),
        _result(3, {"t::stable": "passed", "t::flaky": "passed", "t::broken": "failed"}),
    ]
    flakes = find_flakes(runs)
    assert [f.test for f in flakes] == ["t::flaky"]
    assert flakes[0].outcomes == {"failed": [2], "passed": [1, 3]}
    assert flakes[0].messages == {2: "timed out"}
    assert flakes[0].describe() == "t::flaky: failed in run 2; passed in run 1, 3"

    data = report(runs, runs_requested=3, pressure=NO_PRESSURE, only=[], started_at=datetime.now(UTC),
                  duration_s=3.0)
    assert data["verdict"] == "flaky"
    assert data["flaky"] == [{"test": "t::flaky", "outcomes": {"failed": [2], "passed": [1, 3]}, "messages": {"2": "timed out"}}]
    assert data["failing"] == [{"test": "t::broken", "outcome": "failed", "message": ""}]
    assert next(r for r in data["tests"] if r["test"] == "t::flaky")["outcomes"] == {"passed": 2, "failed": 1}
    text = markdown(data)
    assert "`t::flaky`: failed in run 2; passed in run 1, 3" in text and "run 2: timed out" in text


def test_a_test_missing_from_a_run_or_a_run_without_report_is_a_difference() -> None:
    runs = [
        _result(1, {"a": "passed", "b": "passed"}),
        _result(2, {"a": "passed"}),
        RunResult(3, 124, 9.0, "none", "/r/3", {}),
    ]
    by_test = {f.test: f.outcomes for f in find_flakes(runs)}
    assert by_test == {"a": {NO_REPORT: [3], "passed": [1, 2]}, "b": {"absent": [2], NO_REPORT: [3], "passed": [1]}}


def test_identical_runs_are_stable_and_consistent_failures_are_not_flakes() -> None:
    same = [_result(n, {"a": "passed", "b": "skipped"}) for n in (1, 2)]
    data = report(same, runs_requested=2, pressure=NO_PRESSURE, only=["x"], started_at=datetime.now(UTC),
                  duration_s=2.0)
    assert (data["verdict"], data["flaky"], data["failing"]) == ("stable", [], [])
    broken = [_result(n, {"a": "failed"}) for n in (1, 2)]
    data = report(broken, runs_requested=2, pressure=NO_PRESSURE, only=[], started_at=datetime.now(UTC),
                  duration_s=2.0)
    assert (data["verdict"], data["flaky"]) == ("failing", [])


def test_outcomes_come_from_junit_else_summary(tmp_path: Path) -> None:
    junit = tmp_path / "with-junit"
    junit.mkdir()
    (junit / "junit.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="harness.scenarios.test_kill_switch" name="test_a" time="1.5"/>'
        '<testcase classname="harness.scenarios.test_kill_switch" name="test_b[x]" time="2">'
        '<failure message="AssertionError: late&#10;more">trace</failure></testcase>'
        '<testcase classname="harness.scenarios.test_kill_switch" name="test_b[x]" time="0.5">'
        '<error message="teardown broke">trace</error></testcase>'
        '<testcase classname="harness.scenarios.test_kill_switch" name="test_c" time="0">'
        '<skipped message="no docker"/></testcase>'
        "</testsuite></testsuites>")
    result = collect_run(1, 1, 3.0, junit)
    module = "harness/scenarios/test_kill_switch.py"
    assert result.source == "junit"
    assert result.outcomes == {f"{module}::test_a": "passed", f"{module}::test_b[x]": "error", f"{module}::test_c": "skipped"}
    assert result.durations[f"{module}::test_b[x]"] == pytest.approx(2.5)

    summary = tmp_path / "only-summary"
    summary.mkdir()
    (summary / "summary.json").write_text(json.dumps({"items": [
        {"id": "kill-switch", "message": "x: boom", "tests": [{"nodeid": "m.py::t", "outcome": "failed"}]}]}))
    result = collect_run(2, 1, 3.0, summary)
    assert (result.source, result.outcomes, result.messages) == ("summary", {"m.py::t": "failed"}, {"m.py::t": "x: boom"})
    assert collect_run(3, 2, 1.0, tmp_path / "nothing").source == "none"


def test_report_files_have_the_documented_shape(tmp_path: Path) -> None:
    runs = [_result(1, {"a": "passed"}), _result(2, {"a": "failed"}, {"a": "boom"})]
    data = report(runs, runs_requested=2, pressure=NO_PRESSURE, only=[], started_at=datetime.now(UTC),
                  duration_s=2.0)
    write_report(data, tmp_path)
    loaded = json.loads((tmp_path / "soak.json").read_text())
    assert set(loaded) == {"runs_requested", "runs_completed", "cpu_pressure", "only", "started_at", "duration_s",
                           "verdict", "runs", "flaky", "failing", "tests"}
    assert set(loaded["runs"][0]) == {"run", "exit_code", "duration_s", "source", "reports", "outcomes"}
    assert loaded["tests"][0]["duration_s"] == {"min": 1.0, "median": 1.5, "max": 2.0}
    assert "## Flaky tests" in (tmp_path / "soak.md").read_text()


def test_cpu_pressure_spins_one_loop_per_core_and_stops() -> None:
    pressure = CpuPressure()
    try:
        pressure.start(2)
        loops = [psutil.Process(pid) for pid in pressure.pids()]
        assert len(loops) == 2
        # Busy: each loop piles up CPU time (a sleeping process would not); how fast depends on the box's load.
        wait_until(lambda: all(p.cpu_times().user >= 0.5 for p in loops), timeout=20, interval=0.1,
                   what="both busy loops using 0.5 s of CPU")
        assert all(p.nice() == os.getpriority(os.PRIO_PROCESS, 0) for p in loops)
    finally:
        pressure.stop()
    assert all(not psutil.pid_exists(p.pid) or p.status() == psutil.STATUS_ZOMBIE for p in loops)


def test_busy_loops_end_by_themselves_when_the_soak_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", "import time; from harness.soak import CpuPressure; p = CpuPressure(); p.start(2); "
         "print(' '.join(map(str, p.pids())), flush=True); time.sleep(60)"],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(psutil.pid_exists(pid) for pid in pids)
    finally:
        parent.kill()  # SIGKILL: no finally, no atexit in the parent
        parent.wait(timeout=5)
    wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10, what="busy loops gone after their parent")


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)  # psutil has no type information: Any
    except psutil.NoSuchProcess:
        return False


def test_soak_needs_two_runs() -> None:
    done = _soak("-N", "1", timeout=30)
    assert done.returncode == 2
    assert "needs at least 2" in done.stderr and "Traceback" not in done.stderr


def test_two_real_runs_of_one_item(tmp_path: Path) -> None:
    done = _soak("-N", "2", "--only", FAST_ITEM, "-n", "1", "--reports", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = json.loads((tmp_path / "soak.json").read_text())
    assert (data["verdict"], data["runs_completed"], data["only"], data["flaky"]) == ("stable", 2, [FAST_ITEM], [])
    assert [run["outcomes"] for run in data["runs"]] == [{FAST_TEST: "passed"}] * 2
    assert all(run["source"] == "junit" and Path(run["reports"], "summary.json").is_file() for run in data["runs"])
    assert [row["test"] for row in data["tests"]] == [FAST_TEST]
    assert "stable after 2 run(s)" in done.stdout


def test_sigterm_stops_the_soak_its_run_and_its_busy_loops(tmp_path: Path) -> None:
    log = tmp_path / "soak.log"
    with open(log, "w") as out:
        soak = subprocess.Popen([sys.executable, "-m", "harness.cli", "soak", "-N", "3", "--cpu-pressure", "--only",
                                 FAST_ITEM, "-n", "1", "--reports", str(tmp_path)],
                                cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "run 1/3" in log.read_text(), timeout=30, what="the first run to start")
        announced = re.search(r"pids ([\d, ]+)\)", log.read_text())
        assert announced is not None, log.read_text()
        pids = [int(pid) for pid in announced.group(1).split(", ")]
        # Once the scenario's toxiproxy runs, the run has its own processes in sessions of their own to leave behind.
        wait_until(lambda: any(p.name().startswith("toxiproxy") for p in _descendants(soak.pid)), timeout=60,
                   what="the run's toxiproxy server")
        everything = [p.pid for p in _descendants(soak.pid)] + pids
        soak.send_signal(signal.SIGTERM)
        assert soak.wait(timeout=120) == 130
    finally:
        if soak.poll() is None:
            soak.kill()
            soak.wait(timeout=10)
    # The busy loops die with the soak; the run's processes get a short grace for their own teardown.
    assert not any(_alive(pid) for pid in pids)
    wait_until(lambda: not any(_alive(pid) for pid in everything), timeout=15, what="every process of the soak gone")
    data = json.loads((tmp_path / "soak.json").read_text())
    assert data["verdict"] == "interrupted" and data["cpu_pressure"]["processes"] >= 1


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        children: list[psutil.Process] = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return children


def test_a_run_that_refuses_to_start_stops_the_soak_with_its_reason(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "soak", "-N", "3", "--s3-backend", "minio", "--only", FAST_ITEM,
         "--reports", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "DOCKER_HOST": "unix:///nonexistent/quantlab-chaos-no-docker.sock"})
    assert done.returncode == 2
    assert "the run refused to start" in done.stderr and "Start Docker" in done.stderr and "Traceback" not in done.stderr
    assert json.loads((tmp_path / "soak.json").read_text())["runs_completed"] == 1
