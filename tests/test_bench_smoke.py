"""Smoke test of the benchmarks (not a benchmark): the exchange part runs briefly and bench.json keeps its shape."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.common import Goal
from bench.run import PARTS, SCHEMA, TABLE_END, TABLE_START, markdown_table, update_readme

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bench.run", "--only", "exchange", "--exchange-seconds", "0.2",
                           "--warmup", "0.05", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "frames/s one conn:" in done.stdout
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_bench_json_has_every_part_with_status_and_reason(bench_json: dict[str, Any]) -> None:
    assert bench_json["schema"] == SCHEMA
    assert set(bench_json["parts"]) == set(PARTS)
    assert bench_json["parts"]["exchange"]["status"] == "ok"
    assert bench_json["parts"]["suite"]["status"] == "skipped" and "BENCH_SUITE=1" in bench_json["parts"]["suite"]["reason"]
    assert bench_json["machine"]["cpus"] >= 1


def test_exchange_part_measured_frames_delays_and_goals(bench_json: dict[str, Any]) -> None:
    part = bench_json["parts"]["exchange"]
    one, paced = part["raw"]["one_connection"], part["raw"]["paced_one"]
    assert one["total_fps"] > 1000 and sum(one["frames_per_connection"]) > 0
    assert len(part["raw"]["ten_connections"]["frames_per_connection"]) == 10
    assert paced["delay_ms"]["count"] > 0 and 0 <= paced["delay_ms"]["p50"] <= paced["delay_ms"]["p99"]
    assert part["ratios"]["one_conn_vs_goal"] == pytest.approx(one["total_fps"] / 20_000, rel=1e-3)
    goals = {goal["id"]: goal for goal in bench_json["goals"]}
    assert set(goals) == {"exchange.frames_per_s_one_conn", "exchange.delay_p99_ms_at_1000"}
    for goal in goals.values():
        assert goal["part"] == "exchange" and goal["verdict"] in ("pass", "miss") and goal["ratio"] > 0
    assert sum(bench_json["verdicts"].values()) == len(goals)


def test_goal_verdicts_follow_their_direction() -> None:
    assert Goal("a", "fps", 24_300, 20_000, "frames/s", "min").verdict == "pass"
    assert Goal("b", "fps", 19_999, 20_000, "frames/s", "min").verdict == "miss"
    assert Goal("c", "p99", 6.0, 5.0, "ms", "max").verdict == "miss"
    assert Goal("d", "p99", None, 5.0, "ms", "max").verdict == "n/a"
    assert "1.22x" in Goal("e", "frames/s one conn", 24_300, 20_000, "frames/s", "min").line()


def test_readme_table_is_replaced_between_its_markers(bench_json: dict[str, Any], tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Bench\n\n{TABLE_START}\nold table\n{TABLE_END}\n\nafter\n")
    update_readme(readme, bench_json)
    text = readme.read_text()
    assert "old table" not in text and markdown_table(bench_json) in text and text.endswith("after\n")
