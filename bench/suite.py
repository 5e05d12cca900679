"""Part 4 (opt-in, takes minutes): the whole chaos suite against the twin, serial versus `-n 2`, and versus the
waits the scenarios need by nature (run lengths, restart delays: summary.json's timing.inherent_wait_s); then the
worker count `run` chooses (harness.schedule) and two shards run one after the other and merged, each wall time
against the longest scenario and against the sum of the scenarios' times (from the run's durations.json).

Both runs are `quantlab-chaos run` with their own reports folder, one after the other, in one bench run, so the
ratios compare like with like on whatever the machine is doing. Whatever scenarios exist are run; a failing
scenario does not stop the measurement (its time still counts), but the verdicts are noted.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Goal, PartResult, fmt, ratio, say
from harness import schedule

SPEEDUP_GOAL = 1.6  # serial wall / `-n 2` wall, at least
OVERHEAD_GOAL = 1.5  # serial wall / inherent waits, at most
RUN_TIMEOUT_S = 3600.0
ROOT = Path(__file__).resolve().parents[1]


def run(out_dir: Path, workers: str = "2") -> PartResult:
    """Both runs write their reports and output under `out_dir` (serial/, n<workers>/, run-n*.log)."""
    part = PartResult("suite")
    serial = _suite(out_dir / "serial", "0")
    say(f"serial (-n 0): {fmt(serial['wall_s'])} s wall, {_totals(serial)}")
    parallel = _suite(out_dir / f"n{workers}", workers)
    say(f"-n {workers}: {fmt(parallel['wall_s'])} s wall, {_totals(parallel)}")
    inherent = serial["inherent_wait_s"]
    speedup = ratio(serial["wall_s"], parallel["wall_s"])
    overhead = ratio(serial["wall_s"], inherent) if inherent else None
    part.raw = {"serial": serial, "parallel": parallel, "workers": workers, "reports": str(out_dir)}
    part.ratios = {
        "serial_vs_parallel": speedup,
        "serial_wall_vs_inherent": overhead,
        "serial_scenario_time_vs_inherent": ratio(serial["scenario_time_s"], inherent) if inherent else None,
        "parallel_wall_vs_inherent": ratio(parallel["wall_s"], inherent) if inherent else None,
        "parallel_wall_vs_ideal": ratio(parallel["wall_s"], serial["wall_s"] / int(workers)) if workers.isdigit() else None,
    }
    say(f"-n {workers} is {speedup or 0:.2f}x faster than serial; serial wall is {overhead or 0:.2f}x the inherent waits "
        f"({fmt(inherent)} s), its scenarios' own time {part.ratios['serial_scenario_time_vs_inherent'] or 0:.2f}x")
    part.goals = [
        Goal("suite.parallel_speedup", f"serial wall / -n {workers} wall", speedup, SPEEDUP_GOAL, "x", "min"),
        Goal("suite.wall_vs_inherent", "serial wall / inherent waits", overhead, OVERHEAD_GOAL, "x", "max",
             note="" if inherent else "no scenario recorded an inherent wait (env.note_wait)"),
    ]
    if serial["exit_code"] or parallel["exit_code"]:
        part.notes.append(f"the suite did not pass in full (serial exit {serial['exit_code']}, -n {workers} exit "
                          f"{parallel['exit_code']}); failed items: {sorted(set(serial['failed']) | set(parallel['failed']))}")
    startup = serial["wall_s"] - (serial["scenario_time_s"] or 0.0)
    part.notes.append(f"serial: the scenarios' own time is {fmt(serial['scenario_time_s'])} s, of which {fmt(inherent)} s "
                      f"are inherent waits (the session's S3 and toxiproxy boots count in the first scenario's setup); the "
                      f"other {fmt(startup)} s of the wall are the bootstrap and drift checks, pytest's start-up and "
                      "collection, and writing the reports")
    _scheduled(part, out_dir, parallel)
    if part.ratios["parallel_wall_vs_ideal"] is not None:
        part.notes.append(f"-n {workers} takes {part.ratios['parallel_wall_vs_ideal']:.2f}x a perfect split of the serial "
                          "wall: the workers share 2 cores with the services they start, and the longest scenarios "
                          "do not divide evenly")
    return part


CHOSEN_GOAL = 1.5  # wall of the run with the chosen workers / its longest scenario, at most
SHARD_BALANCE_GOAL = 1.2  # the longer shard's wall / the shorter's, at most


def _scheduled(part: PartResult, out_dir: Path, parallel: dict[str, Any]) -> None:
    """The chosen worker count and two shards merged, each against the longest scenario and the scenarios' sum."""
    chosen = _suite(out_dir / "chosen", None)
    say(f"chosen workers: {fmt(chosen['wall_s'])} s wall ({chosen['plan']}), {_totals(chosen)}")
    shards = [_suite(out_dir / f"shard-{k}", None, ["--shard", f"{k}/2"]) for k in (1, 2)]
    started = time.perf_counter()
    merged_dir = out_dir / "merged"
    merge = subprocess.run([str(Path(sys.executable).with_name("quantlab-chaos")), "report", "merge",
                            *(str(out_dir / f"shard-{k}") for k in (1, 2)), "--out", str(merged_dir)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    merge_s = time.perf_counter() - started
    merged = json.loads((merged_dir / "summary.json").read_text()) if (merged_dir / "summary.json").is_file() else {}
    rows = [("-n " + str(parallel["workers"]), parallel["wall_s"], parallel),
            ("chosen", chosen["wall_s"], chosen),
            ("2 shards, one after the other, merged", sum(s["wall_s"] for s in shards) + merge_s, shards[0])]
    longest, total = chosen["longest_s"], chosen["sum_s"]
    for name, wall, _ in rows:
        say(f"{name}: wall {fmt(wall)} s = {wall / longest:.2f}x the longest scenario ({fmt(longest)} s), "
            f"{wall / total:.2f}x the scenarios' sum ({fmt(total)} s)")
    walls = sorted(s["wall_s"] for s in shards)
    outcomes = {row["id"]: row["outcome"] for row in merged.get("items", [])}
    whole = chosen["outcomes"]
    differing = sorted(item for item in set(outcomes) | set(whole) if outcomes.get(item) != whole.get(item))
    part.raw.update({"chosen": chosen, "shards": shards, "merge_s": merge_s, "merge_exit": merge.returncode,
                     "merged_vs_chosen_differing_items": differing})
    part.ratios.update({
        "n2_wall_vs_longest": ratio(parallel["wall_s"], longest), "n2_wall_vs_sum": ratio(parallel["wall_s"], total),
        "chosen_wall_vs_longest": ratio(chosen["wall_s"], longest), "chosen_wall_vs_sum": ratio(chosen["wall_s"], total),
        "shards_wall_vs_longest": ratio(rows[2][1], longest), "shards_wall_vs_sum": ratio(rows[2][1], total),
        "shard_balance": ratio(walls[1], walls[0]),
    })
    part.goals += [
        Goal("suite.chosen_wall_vs_longest", "chosen workers' wall / longest scenario", part.ratios["chosen_wall_vs_longest"],
             CHOSEN_GOAL, "x", "max"),
        Goal("suite.shard_balance", "longer shard's wall / shorter's", part.ratios["shard_balance"], SHARD_BALANCE_GOAL,
             "x", "max"),
    ]
    cores = os.cpu_count() or 1
    floor = chosen["cpu_s"] / cores
    part.ratios["chosen_cpu_floor_vs_longest"] = ratio(floor, longest)
    part.notes.append(f"chosen: the run and everything it started used {fmt(chosen['cpu_s'])} CPU-seconds, so {cores} "
                      f"core(s) need at least {fmt(floor)} s of wall for it ({floor / longest:.2f}x the longest scenario), "
                      f"before the start-up and the reports; the wall was {chosen['wall_s'] / floor:.2f}x that floor")
    part.notes.append(f"2 shards merged vs one run with the chosen workers: {len(differing)} item(s) differ"
                      + (f" ({', '.join(differing)})" if differing else ""))


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _totals(result: dict[str, Any]) -> str:
    totals = result["totals"]
    return (f"{result['tests']} scenarios, items {totals.get('pass', 0)} pass / {totals.get('fail', 0)} fail / "
            f"{totals.get('skip', 0)} skip, inherent waits {fmt(result['inherent_wait_s'])} s")


def _suite(reports: Path, workers: str | None, extra: list[str] | None = None) -> dict[str, Any]:
    """One `quantlab-chaos run [-n WORKERS] --reports REPORTS`, timed; its output goes to <REPORTS>.log."""
    cli = Path(sys.executable).with_name("quantlab-chaos")
    argv = [str(cli), "run", *(["-n", workers] if workers is not None else []), "--reports", str(reports), *(extra or [])]
    reports.mkdir(parents=True, exist_ok=True)
    log_path = reports.parent / f"run-{reports.name}.log"
    with open(log_path, "w") as log:
        before = _children_cpu_s()
        started = time.perf_counter()
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if process.poll() is None:  # timed out or interrupted: the whole run's group goes, workers included
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        wall = time.perf_counter() - started
        cpu_s = _children_cpu_s() - before  # the run and everything it reaped: workers, services, tools
    summary_path = reports / "summary.json"
    if not summary_path.is_file():
        tail = log_path.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"quantlab-chaos run -n {workers} wrote no summary.json (exit {code}); its output ends:\n{tail}")
    summary = json.loads(summary_path.read_text())
    timing = summary.get("timing", {})
    walls = [t.wall_s for t in schedule.load(reports / schedule.DURATIONS_JSON).values()]
    plan = next((line.removeprefix("quantlab-chaos: ") for line in log_path.read_text(errors="replace").splitlines()
                 if "workers:" in line), "")
    return {
        "workers": workers, "plan": plan, "longest_s": max(walls, default=0.0), "sum_s": sum(walls),
        "outcomes": {row["id"]: row["outcome"] for row in summary.get("items", [])},
        "argv": argv[1:], "exit_code": code, "wall_s": wall, "cpu_s": cpu_s, "pytest_duration_s": summary.get("duration_s"),
        "scenario_time_s": timing.get("scenario_time_s"), "inherent_wait_s": timing.get("inherent_wait_s") or 0.0,
        "tests": sum(len(row.get("tests", [])) for row in summary.get("items", [])),
        "totals": summary.get("totals", {}),
        "failed": [row["id"] for row in summary.get("items", []) if row.get("outcome") != "pass"],
    }
