"""`quantlab-chaos soak`: the chaos suite N times in a row; any outcome that differs between runs is a flake.

Each run is a full `quantlab-chaos run` in its own process with its own reports folder (DIR/soak/run-NN/),
so a flaky run keeps its junit.xml, summary and allure evidence for diagnosis. Per-test outcomes come from
junit.xml (every test case) or, when pytest died before writing it, from summary.json; a run that wrote
neither counts as one outcome, `no-report`, for every test the other runs saw.

With --cpu-pressure one busy loop per core spins at the suite's own niceness for the whole soak, so timeouts
that only hold on an idle machine show up. The loops are stopped in a `finally` (Ctrl-C and SIGTERM included)
and each one also exits by itself when the soak process is gone, so none outlives a SIGKILL.

soak.json (stable):
{"runs_requested", "runs_completed", "cpu_pressure": {"enabled", "processes", "nice"}, "only", "started_at",
 "duration_s", "verdict": "stable"|"flaky"|"failing"|"interrupted",
 "runs": [{"run", "exit_code", "duration_s", "source": "junit"|"summary"|"none", "reports", "outcomes": {test: outcome}}],
 "flaky": [{"test", "outcomes": {outcome: [run numbers]}, "messages": {run: first failure line}}],
 "failing": [{"test", "outcome", "message"}],
 "tests": [{"test", "outcomes": {outcome: count}, "duration_s": {"min", "median", "max"}}]}
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.reporting import SUMMARY_JSON
from harness.target import PROJECT_ROOT
from quantlab_chaos import procgroup
from quantlab_chaos.errors import EXIT_FAILED, EXIT_USAGE, ConfigError

SOAK_JSON = "soak.json"
SOAK_MD = "soak.md"
NO_REPORT = "no-report"
ABSENT = "absent"
FAILED_OUTCOMES = {"failed", "error", NO_REPORT}
DEFAULT_RUN_TIMEOUT_S = 1200.0
# The busy loop checks its parent every ~50 ms of spinning, so it dies with the soak even after a SIGKILL.
_BUSY_LOOP = (
    "import os, sys\n"
    "parent = int(sys.argv[1])\n"
    "while os.getppid() == parent:\n"
    "    for _ in range(200_000):\n"
    "        pass\n"
)


@dataclass
class RunResult:
    """One run of the suite: its exit code and the outcome of every test it reported."""

    run: int
    exit_code: int
    duration_s: float
    source: str
    reports: str
    outcomes: dict[str, str]
    messages: dict[str, str] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "exit_code": self.exit_code, "duration_s": round(self.duration_s, 2),
                "source": self.source, "reports": self.reports, "outcomes": dict(sorted(self.outcomes.items()))}


# ---------------------------------------------------------------------------------------------- outcomes of a run


def read_junit(path: Path) -> tuple[dict[str, str], dict[str, str], dict[str, float]]:
    """Outcome, first failure line and duration of every test case in a JUnit XML file."""
    outcomes: dict[str, str] = {}
    messages: dict[str, str] = {}
    durations: dict[str, float] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = _junit_test_id(case)
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = child.get("message") or (child.text or "")
                break
        # pytest writes a second <testcase> for an error in teardown after a pass or fail: keep the worse outcome.
        if test not in outcomes or _rank(outcome) > _rank(outcomes[test]):
            outcomes[test] = outcome
            if message:
                messages[test] = _one_line(message)
        durations[test] = durations.get(test, 0.0) + float(case.get("time") or 0.0)
    return outcomes, messages, durations


def _junit_test_id(case: ET.Element) -> str:
    """`harness/scenarios/test_x.py::test_y[param]` from pytest's dotted classname and name."""
    classname, name = case.get("classname", ""), case.get("name", "")
    parts = classname.split(".")
    # pytest's classname is the module path with dots, plus the class name(s) for methods.
    for cut in range(len(parts), 0, -1):
        candidate = PROJECT_ROOT.joinpath(*parts[:cut]).with_suffix(".py")
        if candidate.is_file():
            return "::".join(["/".join(parts[:cut]) + ".py", *parts[cut:], name])
    return f"{classname}::{name}" if classname else name


def _rank(outcome: str) -> int:
    return {"passed": 0, "skipped": 1, "failed": 2, "error": 3}.get(outcome, 4)


def _one_line(text: str) -> str:
    """The failure message on one line: the lines of a runbook violation joined."""
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())[:600]


def read_summary(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Per-test outcomes from summary.json (its `tests` rows), for a run whose junit.xml is missing."""
    data = json.loads(path.read_text())
    outcomes: dict[str, str] = {}
    messages: dict[str, str] = {}
    for row in data.get("items", []):
        for test in row.get("tests", []):
            outcomes[test["nodeid"]] = test["outcome"]
            if test["outcome"] == "failed" and row.get("message"):
                messages[test["nodeid"]] = _one_line(row["message"])
    return outcomes, messages


def collect_run(run: int, exit_code: int, duration_s: float, reports: Path) -> RunResult:
    """What one run left in its reports folder."""
    junit, summary = reports / "junit.xml", reports / SUMMARY_JSON
    try:
        if junit.is_file():
            outcomes, messages, durations = read_junit(junit)
            return RunResult(run, exit_code, duration_s, "junit", str(reports), outcomes, messages, durations)
    except ET.ParseError:
        pass  # a run killed while writing; summary.json may still be whole
    try:
        if summary.is_file():
            outcomes, messages = read_summary(summary)
            return RunResult(run, exit_code, duration_s, "summary", str(reports), outcomes, messages)
    except (ValueError, KeyError):
        pass
    return RunResult(run, exit_code, duration_s, "none", str(reports), {})


# ------------------------------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Flake:
    """A test whose outcome was not the same in every run: which outcome in which runs."""

    test: str
    outcomes: dict[str, list[int]]
    messages: dict[int, str]

    def to_dict(self) -> dict[str, Any]:
        return {"test": self.test, "outcomes": self.outcomes, "messages": {str(k): v for k, v in self.messages.items()}}

    def describe(self) -> str:
        runs = "; ".join(f"{outcome} in run {_runs_text(numbers)}" for outcome, numbers in self.outcomes.items())
        return f"{self.test}: {runs}"


def _runs_text(numbers: list[int]) -> str:
    return ", ".join(str(n) for n in numbers)


def _outcome_in(result: RunResult, test: str) -> str:
    if result.source == "none":
        return NO_REPORT
    return result.outcomes.get(test, ABSENT)


def find_flakes(results: Sequence[RunResult]) -> list[Flake]:
    """Every test whose outcome differs between the runs (a test missing from a run counts as `absent`)."""
    tests = sorted({test for result in results for test in result.outcomes})
    flakes = []
    for test in tests:
        by_outcome: dict[str, list[int]] = {}
        for result in results:
            by_outcome.setdefault(_outcome_in(result, test), []).append(result.run)
        if len(by_outcome) > 1:
            messages = {r.run: r.messages[test] for r in results if test in r.messages}
            flakes.append(Flake(test, dict(sorted(by_outcome.items())), messages))
    return flakes


def find_failing(results: Sequence[RunResult]) -> list[dict[str, str]]:
    """Tests that failed in every run: not flaky, but the soak cannot call the suite stable either."""
    if not results:
        return []
    tests = sorted({test for result in results for test in result.outcomes})
    failing = []
    for test in tests:
        seen = {_outcome_in(result, test) for result in results}
        if len(seen) == 1 and (outcome := seen.pop()) in FAILED_OUTCOMES:
            message = next((r.messages[test] for r in results if test in r.messages), "")
            failing.append({"test": test, "outcome": outcome, "message": message})
    return failing


def per_test_table(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Per test: how often each outcome came, and the spread of its duration (a test near its deadline shows here)."""
    tests = sorted({test for result in results for test in result.outcomes})
    rows = []
    for test in tests:
        counts: dict[str, int] = {}
        for result in results:
            outcome = _outcome_in(result, test)
            counts[outcome] = counts.get(outcome, 0) + 1
        times = [r.durations[test] for r in results if test in r.durations]
        spread = ({"min": round(min(times), 2), "median": round(statistics.median(times), 2), "max": round(max(times), 2)}
                  if times else None)
        rows.append({"test": test, "outcomes": counts, "duration_s": spread})
    return rows


def verdict(results: Sequence[RunResult], flakes: Sequence[Flake], failing: Sequence[dict[str, str]],
            interrupted: bool) -> str:
    if interrupted:
        return "interrupted"
    if flakes:
        return "flaky"
    if failing or any(r.exit_code != 0 for r in results):
        return "failing"
    return "stable"


# ------------------------------------------------------------------------------------------------- CPU pressure


@dataclass
class CpuPressure:
    """One busy-loop process per core, at the niceness of this process (which the suite inherits)."""

    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, count: int | None = None) -> None:
        for _ in range(count or cpu_count()):
            self.processes.append(subprocess.Popen(
                [sys.executable, "-c", _BUSY_LOOP, str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                # its own session: a Ctrl-C in the terminal reaches the soak, which stops the loops itself.
                start_new_session=True,
            ))

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
                pass
        self.processes.clear()

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


@contextmanager
def cpu_pressure(enabled: bool, count: int | None = None) -> Iterator[CpuPressure]:
    pressure = CpuPressure()
    try:
        if enabled:
            pressure.start(count)
        yield pressure
    finally:
        pressure.stop()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the soak like Ctrl-C does, so the `finally` blocks (busy loops, the current run) run."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------- one run


def run_argv(reports: Path, *, only: Sequence[str], workers: str | None, quantlab_root: str | None, runbook: str | None,
             extra: Sequence[str] = ()) -> list[str]:
    """The `quantlab-chaos run` command line of one soak run."""
    argv = [sys.executable, "-m", "harness.cli", "run", *(["-n", workers] if workers else []), "--reports", str(reports)]
    argv += ["--quantlab-root", quantlab_root] if quantlab_root else []
    argv += ["--runbook", runbook] if runbook else []
    for item in only:
        argv += ["--only", item]
    return argv + list(extra)


def run_once(argv: list[str], log_path: Path, timeout_s: float) -> int:
    """Runs one suite with its output in log_path; on a deadline or Ctrl-C asks it to stop, then makes sure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.write(f"\nquantlab-chaos soak: run exceeded {timeout_s:.0f} s; stopped\n".encode())
            _stop(process)
            return 124
        except BaseException:
            _stop(process)
            raise


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT first, as a Ctrl-C would: `quantlab-chaos run` passes it to pytest, which then runs every fixture's
    teardown (services, toxiproxy, S3). SIGTERM after a grace period, SIGKILL of the whole group last."""
    for signum, grace in ((signal.SIGINT, 60.0), (signal.SIGTERM, 15.0)):
        if process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(timeout=grace)
            return
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # another Ctrl-C: the next, harder step now
            continue
    procgroup.kill(process, kill_wait=10)


# ------------------------------------------------------------------------------------------------- the soak


def soak(*, runs: int, cpu_pressure_on: bool, only: Sequence[str], reports_dir: Path, workers: str | None = None,
         quantlab_root: str | None = None, runbook: str | None = None, extra_run_args: Sequence[str] = (),
         run_timeout_s: float = DEFAULT_RUN_TIMEOUT_S) -> int:
    """Runs the suite `runs` times; writes soak.json and soak.md; 0 when every test had one outcome and passed."""
    if runs < 2:
        raise ConfigError(f"-N {runs}: a soak compares runs, so it needs at least 2. Pass -N 2 or more.")
    reports_dir = reports_dir.resolve()
    runs_dir = reports_dir / "soak"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)
    started_at, t0 = datetime.now(UTC), time.monotonic()
    results: list[RunResult] = []
    interrupted = False
    refused = ""
    pressure_info: dict[str, Any] = {"enabled": cpu_pressure_on, "processes": 0,
                                     "nice": os.getpriority(os.PRIO_PROCESS, 0)}
    with _sigterm_as_interrupt(), cpu_pressure(cpu_pressure_on) as pressure:
        pressure_info["processes"] = len(pressure.processes)
        if cpu_pressure_on:
            print(f"quantlab-chaos soak: CPU pressure: {len(pressure.processes)} busy loop(s) at nice "
                  f"{pressure_info['nice']} (pids {', '.join(map(str, pressure.pids()))})", flush=True)
        try:
            for number in range(1, runs + 1):
                results.append(_one_run(number, runs, runs_dir, only=only, workers=workers, quantlab_root=quantlab_root,
                                        runbook=runbook, extra=extra_run_args, timeout_s=run_timeout_s))
                if results[-1].exit_code == EXIT_USAGE and results[-1].source == "none":
                    refused = _refusal(Path(results[-1].reports) / "output.log")
                    break
        except KeyboardInterrupt:
            interrupted = True
            print("\nquantlab-chaos soak: interrupted; stopping", file=sys.stderr, flush=True)
    data = report(results, runs_requested=runs, pressure=pressure_info, only=only, started_at=started_at,
                  duration_s=time.monotonic() - t0, interrupted=interrupted)
    write_report(data, reports_dir)
    if refused:
        # Every further run would be refused the same way: the user's input is what needs fixing.
        print(f"quantlab-chaos soak: the run refused to start, so the soak stopped: {refused}", file=sys.stderr)
        return EXIT_USAGE
    _print_verdict(data, reports_dir)
    if interrupted:
        return 130
    return 0 if data["verdict"] == "stable" else EXIT_FAILED


def _refusal(log: Path) -> str:
    """The run's own one-paragraph reason (its last line starting with 'quantlab-chaos:')."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("quantlab-chaos:")]
    return lines[-1].removeprefix("quantlab-chaos:").strip() if lines else f"see {log}"


def _one_run(number: int, total: int, runs_dir: Path, *, only: Sequence[str], workers: str | None, quantlab_root: str | None,
             runbook: str | None, extra: Sequence[str], timeout_s: float) -> RunResult:
    reports = runs_dir / f"run-{number:02d}"
    argv = run_argv(reports, only=only, workers=workers, quantlab_root=quantlab_root, runbook=runbook, extra=extra)
    print(f"quantlab-chaos soak: run {number}/{total} ...", end="", flush=True)
    t0 = time.monotonic()
    code = run_once(argv, reports / "output.log", timeout_s)
    result = collect_run(number, code, time.monotonic() - t0, reports)
    counts: dict[str, int] = {}
    for outcome in result.outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    shown = ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) or "no test outcomes"
    print(f" exit {code}, {shown} ({result.duration_s:.0f} s)", flush=True)
    for test, outcome in sorted(result.outcomes.items()):
        if outcome in FAILED_OUTCOMES:
            print(f"    {outcome}: {test}: {result.messages.get(test, '')[:200]}", flush=True)
    return result


def report(results: Sequence[RunResult], *, runs_requested: int, pressure: dict[str, Any], only: Sequence[str],
           started_at: datetime, duration_s: float, interrupted: bool = False) -> dict[str, Any]:
    """The soak.json document for these runs."""
    flakes = find_flakes(results)
    failing = find_failing(results)
    return {
        "runs_requested": runs_requested,
        "runs_completed": len(results),
        "cpu_pressure": pressure,
        "only": list(only),
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_s": round(duration_s, 2),
        "verdict": verdict(results, flakes, failing, interrupted),
        "runs": [r.to_dict() for r in results],
        "flaky": [f.to_dict() for f in flakes],
        "failing": failing,
        "tests": per_test_table(results),
    }


def write_report(data: dict[str, Any], reports_dir: Path) -> None:
    reports_dir.mkdir(parents=True, exist_ok=True)
    (reports_dir / SOAK_JSON).write_text(json.dumps(data, indent=2) + "\n")
    (reports_dir / SOAK_MD).write_text(markdown(data))


def markdown(data: dict[str, Any]) -> str:
    pressure = data["cpu_pressure"]
    load = (f"{pressure['processes']} busy loop(s) at nice {pressure['nice']}" if pressure["enabled"] else "none")
    lines = [
        "# Soak", "",
        f"- Verdict: **{data['verdict']}**",
        f"- Runs: {data['runs_completed']} of {data['runs_requested']}, started {data['started_at']}, "
        f"took {data['duration_s']} s",
        f"- CPU pressure: {load}",
        f"- Items: {', '.join(data['only']) or 'all'}", "",
    ]
    if data["flaky"]:
        lines += ["## Flaky tests (outcome differed between runs)", ""]
        for flake in data["flaky"]:
            runs = "; ".join(f"{o} in run {_runs_text(n)}" for o, n in flake["outcomes"].items())
            lines.append(f"- `{flake['test']}`: {runs}")
            lines += [f"  - run {run}: {message}" for run, message in flake["messages"].items()]
        lines.append("")
    if data["failing"]:
        lines += ["## Failing in every run", ""]
        lines += [f"- `{f['test']}` ({f['outcome']}): {f['message']}" for f in data["failing"]]
        lines.append("")
    lines += ["## Runs", "", "| run | exit | took (s) | outcomes from | reports |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['run']} | {r['exit_code']} | {r['duration_s']} | {r['source']} | `{r['reports']}` |"
              for r in data["runs"]]
    lines += ["", "## Tests", "", "| test | outcomes | duration min / median / max (s) |", "| --- | --- | --- |"]
    for row in data["tests"]:
        outcomes = ", ".join(f"{o} x{n}" for o, n in sorted(row["outcomes"].items()))
        spread = row["duration_s"]
        times = f"{spread['min']} / {spread['median']} / {spread['max']}" if spread else "-"
        lines.append(f"| `{row['test']}` | {outcomes} | {times} |")
    return "\n".join(lines) + "\n"


def _print_verdict(data: dict[str, Any], reports_dir: Path) -> None:
    print(f"\nquantlab-chaos soak: {data['verdict']} after {data['runs_completed']} run(s) "
          f"({data['duration_s']:.0f} s). Reports: {reports_dir / SOAK_MD}", flush=True)
    for flake in data["flaky"]:
        runs = "; ".join(f"{o} in run {_runs_text(n)}" for o, n in flake["outcomes"].items())
        print(f"  FLAKY  {flake['test']}: {runs}", flush=True)
    for failing in data["failing"]:
        print(f"  FAILS  {failing['test']} in every run: {failing['message'][:200]}", flush=True)
