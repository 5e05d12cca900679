"""Scheduling by cost: longest first, duration-balanced shards that are the same on every machine, a worker count
from waits, CPU and memory; and end to end, two shards run one after the other and merged give the verdicts of one
unsharded run."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Literal

import pytest

from harness import schedule
from harness.drift import collect_scenarios
from harness.reporting import RunbookReport
from harness.schedule import Timing
from harness.summary_markdown import longest_sentence
from harness.target import PROJECT_ROOT, TWIN_ROOT
from quantlab_chaos.errors import ConfigError
from quantlab_chaos.runbook import load_runbook

CLI = str(Path(sys.executable).with_name("quantlab-chaos"))
TIMINGS = {"a": Timing(17.0, 1.0), "b": Timing(2.0, 0.5), "c": Timing(9.0, 1.0), "d": Timing(8.0, 0.5),
           "e": Timing(1.0, 0.2)}


def test_longest_first_and_unknown_scenarios_weigh_the_mean() -> None:
    assert schedule.longest_first(["e", "b", "a", "d", "c"], TIMINGS) == ["a", "c", "d", "b", "e"]
    assert schedule.weights(["new"], TIMINGS) == {"new": pytest.approx(37.0 / 5)}
    assert schedule.longest_first(["z", "y"], {}) == ["y", "z"]  # nothing recorded: by test id


def test_shards_cover_every_scenario_once_balanced_and_in_any_input_order() -> None:
    one = schedule.shards(["a", "b", "c", "d", "e"], TIMINGS, 2)
    assert one == [["a", "b"], ["c", "d", "e"]]  # 19 s and 18 s
    assert schedule.shards(["e", "d", "c", "b", "a"], TIMINGS, 2) == one
    assert sorted(x for shard in schedule.shards(list(TIMINGS), TIMINGS, 3) for x in shard) == sorted(TIMINGS)
    assert schedule.shards(["a"], TIMINGS, 3) == [["a"], [], []]


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0", ""])
def test_a_bad_shard_is_refused_saying_how_to_write_it(text: str) -> None:
    with pytest.raises(ConfigError, match="write K/N with 1 <= K <= N"):
        schedule.parse_shard(text)


def test_workers_come_from_waits_cpu_and_memory() -> None:
    ids = list(TIMINGS)
    # 37 s of scenarios, the longest 17 s: three workers are as many as the waits allow.
    assert schedule.fit_workers(ids, TIMINGS, cores=2, available_bytes=64 * 2**30).workers == 3
    busy = {n: Timing(t.wall_s, t.wall_s) for n, t in TIMINGS.items()}  # every scenario keeps a core busy
    assert schedule.fit_workers(ids, busy, cores=2, available_bytes=64 * 2**30).workers == 1
    big = {n: Timing(t.wall_s, 0.1, 3 * 2**30) for n, t in TIMINGS.items()}
    fit = schedule.fit_workers(ids, big, cores=2, available_bytes=8 * 2**30)
    assert fit.workers == 1 and "memory holds 1 at 3072 MiB each" in fit.why
    unknown = schedule.fit_workers(["x", "y", "z"], {}, cores=2)
    assert unknown.workers == 2 and "no durations recorded" in unknown.why


def test_a_durations_file_round_trips_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "durations.json"
    schedule.save(path, TIMINGS)
    assert schedule.load(path) == TIMINGS
    path.write_text('{"format": 1, "scenarios": {"a": {}}}')
    with pytest.raises(ConfigError, match="is not a durations file"):
        schedule.load(path)
    assert schedule.load(tmp_path / "absent.json") == {}


def test_the_shipped_baseline_knows_every_scenario() -> None:
    baseline = schedule.load(schedule.BASELINE)
    missing = [nodeid for nodeid, _ in collect_scenarios() if nodeid not in baseline]
    assert not missing, f"{schedule.BASELINE} lacks {missing}: record it again (see its README section)"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)


def _summary(folder: Path) -> dict[str, str]:
    data = json.loads((folder / "summary.json").read_text())
    return {row["id"]: row["outcome"] for row in data["items"]}


def _tests(folder: Path) -> list[str]:
    data = json.loads((folder / "summary.json").read_text())
    return sorted(t["nodeid"] for row in data["items"] for t in row["tests"] if t["outcome"] != "skipped")


def _phase(nodeid: str, when: Literal["setup", "call", "teardown"], duration: float, props: list[tuple[str, object]]) -> pytest.TestReport:
    return pytest.TestReport(nodeid, ("f.py", 0, nodeid), {}, "passed", None, when, duration=duration,
                             user_properties=props)


def test_the_longest_scenario_is_named_with_the_waits_that_set_it(tmp_path: Path) -> None:
    report = RunbookReport(tmp_path, load_runbook(TWIN_ROOT / "docs" / "runbook.md"), TWIN_ROOT)
    assert report.longest() is None and longest_sentence(None) is None
    waits = json.dumps([["RestartSec=5s (runbook line 74) before each of the 4 restarts", 20.0], ["a deadline of ours", 6.0]])
    phases: list[tuple[Literal["setup", "call", "teardown"], float]] = [("setup", 0.5), ("call", 30.0), ("teardown", 0.5)]
    for when, duration in phases:
        report.pytest_runtest_logreport(_phase("t.py::leak", when, duration, [("inherent_waits", waits)] if when == "call" else []))
    report.pytest_runtest_logreport(_phase("t.py::quick", "call", 29.0, []))
    longest = report.longest()
    assert longest == {"nodeid": "t.py::leak", "wall_s": 31.0, "inherent_wait_s": 26.0,
                       "waits": [{"reason": "RestartSec=5s (runbook line 74) before each of the 4 restarts", "seconds": 20.0},
                                 {"reason": "a deadline of ours", "seconds": 6.0}]}
    assert longest_sentence(longest) == ("leak took 31 s; 26 s of it are waits it needs: RestartSec=5s (runbook line 74) "
                                         "before each of the 4 restarts (20 s); a deadline of ours (6 s)")
    assert report.summary()["timing"]["longest"] == longest
    plain = {"nodeid": "t.py::quick", "wall_s": 29.0, "inherent_wait_s": 0.0, "waits": []}
    assert longest_sentence(plain) == "quick took 29 s; it declares no waits of its own"


def test_two_shards_merged_give_the_verdicts_of_one_run(tmp_path: Path) -> None:
    only = ["--only", "self-test", "--only", "health-checks", "--only", "failure:observer-unauthorized"]
    whole = _run("run", *only, "-n", "2", "--reports", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-2000:]
    for k in (1, 2):
        done = _run("run", *only, "--shard", f"{k}/2", "--reports", str(tmp_path / f"s{k}"))
        assert done.returncode == 0 and f"shard {k}/2:" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    first, second = _tests(tmp_path / "s1"), _tests(tmp_path / "s2")
    assert first and second and not set(first) & set(second), "every scenario in exactly one shard"
    merged = _run("report", "merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stdout[-3000:] + merged.stderr[-2000:]
    assert _summary(tmp_path / "merged") == _summary(tmp_path / "whole")
    assert "Longest scenario (no worker count makes a run shorter): " in whole.stdout
    shard_longest = [json.loads((tmp_path / f"s{k}" / "summary.json").read_text())["timing"]["longest"] for k in (1, 2)]
    merged_longest = json.loads((tmp_path / "merged" / "summary.json").read_text())["timing"]["longest"]
    assert merged_longest == max(shard_longest, key=lambda longest: longest["wall_s"])
    assert _tests(tmp_path / "merged") == sorted(first + second) == _tests(tmp_path / "whole")
    cases = ET.parse(tmp_path / "merged" / "junit.xml").getroot().iter("testcase")
    assert sorted(case.get("name", "") for case in cases) == sorted(n.rsplit("::", 1)[-1] for n in first + second)
    assert (tmp_path / "merged" / "runbook.html").is_file() and schedule.load(tmp_path / "merged" / "durations.json")
    # The shards are of one run: a folder without a summary, or the merged folder itself as --out, is refused.
    bad = _run("report", "merge", str(tmp_path / "s1"), str(tmp_path), "--out", str(tmp_path / "m2"))
    assert bad.returncode == 2 and "is not a run's reports folder" in bad.stderr
    into = _run("report", "merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "s1"))
    assert into.returncode == 2 and "merge into a new folder" in into.stderr
