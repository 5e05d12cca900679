"""`python -m bench.run [--suite] [--out reports/bench.json]`: measures every moving part, compares with the goals.

Parts, in order: exchange, boot, faults, canary (quick, about a minute together) and, with --suite, the whole
chaos suite twice (minutes). Each part prints its numbers as ratios; reports/bench.json keeps raw numbers,
ratios and goal verdicts, and --update-readme rewrites the table of the last run in bench/README.md.
Exit 0 when every part ran (a missed goal is a finding, not a crash), 1 when a part could not run, 2 on usage.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import boot, canary, exchange, faults, suite
from bench.common import PartResult, machine, with_unit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "reports" / "bench.json"
README = Path(__file__).with_name("README.md")
PARTS = ("exchange", "boot", "faults", "suite", "canary")
QUICK_PARTS = ("exchange", "boot", "faults", "canary")
SCHEMA = "quantlab-chaos-bench/1"
TABLE_START = "<!-- bench:last-run:start -->"
TABLE_END = "<!-- bench:last-run:end -->"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description="Benchmarks of the harness's moving parts.")
    p.add_argument("--suite", action="store_true", help="also run the whole chaos suite serially and with -n 2 (minutes)")
    p.add_argument("--only", action="append", choices=PARTS, metavar="PART",
                   help=f"run only this part (repeatable): {', '.join(PARTS)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where bench.json goes (default reports/bench.json)")
    p.add_argument("--exchange-seconds", type=float, default=3.0, help="measuring window per exchange phase (default 3)")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up before each exchange window (default 0.5)")
    p.add_argument("--boot-repeats", type=int, default=3, help="boots per kind; the median counts (default 3)")
    p.add_argument("--fault-trials", type=int, default=5, help="trials per fault kind; the median counts (default 5)")
    p.add_argument("--canary-seconds", type=int, default=canary.RUN_SECONDS, help="live run length (default 3)")
    p.add_argument("--workers", default="2", help="xdist workers for the parallel suite run (default 2)")
    p.add_argument("--update-readme", action="store_true", help="rewrite the last-run table in bench/README.md")
    p.add_argument("--readme-from", type=Path, metavar="BENCH_JSON",
                   help="only rewrite the README's table from an existing bench.json, then exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.exchange_seconds <= 0 or args.warmup < 0 or args.boot_repeats < 1 or args.fault_trials < 1 \
            or args.canary_seconds < 1:
        print("bench: --exchange-seconds must be above 0, --warmup at least 0, and --boot-repeats, --fault-trials "
              "and --canary-seconds at least 1.", file=sys.stderr)
        return 2
    if args.readme_from:
        try:
            data = json.loads(args.readme_from.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"bench: cannot read {args.readme_from} ({exc}); pass a bench.json written by python -m bench.run.",
                  file=sys.stderr)
            return 2
        update_readme(README, data)
        print(f"bench: the last-run table in {README} is rewritten from {args.readme_from}")
        return 0
    wanted = list(args.only) if args.only else [*QUICK_PARTS[:3], *(["suite"] if args.suite else []), "canary"]
    runners: dict[str, Callable[[], PartResult]] = {
        "exchange": lambda: exchange.run(args.exchange_seconds, args.warmup),
        "boot": lambda: boot.run(args.boot_repeats),
        "faults": lambda: faults.run(args.fault_trials),
        "suite": lambda: suite.run(args.out.resolve().parent / "bench-suite", args.workers),
        "canary": lambda: canary.run(args.canary_seconds),
    }
    started = datetime.now(UTC)
    clock = time.perf_counter()
    results: dict[str, PartResult] = {}
    for name in PARTS:
        if name not in wanted:
            reason = ("opt-in: make bench BENCH_SUITE=1, or python -m bench.run --suite" if name == "suite"
                      else "not selected (--only)")
            results[name] = PartResult(name, status="skipped", reason=reason)
            continue
        results[name] = _run_part(name, runners[name])
    data = bench_json(results, started, time.perf_counter() - clock, list(argv or sys.argv[1:]))
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print("\n" + markdown_table(data))
    print(f"\nbench: {data['verdicts']['pass']} goal(s) passed, {data['verdicts']['miss']} missed, "
          f"{data['verdicts']['n/a']} not measured; raw numbers in {out}")
    if args.update_readme:
        update_readme(README, data)
        print(f"bench: the last-run table in {README} is updated")
    return 1 if any(r.status == "error" for r in results.values()) else 0


def _run_part(name: str, runner: Callable[[], PartResult]) -> PartResult:
    print(f"\n== {name} ==", flush=True)
    clock = time.perf_counter()
    try:
        result = runner()
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - one broken part must not hide the others' numbers
        traceback.print_exc()
        result = PartResult(name, status="error", reason=f"{type(exc).__name__}: {exc}"[:1000])
        print(f"  {name} could not run: {result.reason}", flush=True)
    result.duration_s = time.perf_counter() - clock
    for goal in result.goals:
        print(f"  -> {goal.line()}", flush=True)
    for note in result.notes:
        print(f"  note: {note}", flush=True)
    return result


def bench_json(results: dict[str, PartResult], started: datetime, duration: float, argv: list[str]) -> dict[str, Any]:
    goals = [{"part": name, **goal.to_dict()} for name, part in results.items() for goal in part.goals]
    verdicts = {verdict: sum(1 for g in goals if g["verdict"] == verdict) for verdict in ("pass", "miss", "n/a")}
    return {
        "schema": SCHEMA, "started_at": started.isoformat(timespec="seconds"), "duration_s": round(duration, 1),
        "argv": argv, "machine": machine(),
        "parts": {name: part.to_dict() for name, part in results.items()},
        "goals": goals, "verdicts": verdicts,
    }


def markdown_table(data: dict[str, Any]) -> str:
    """The goals of one run as a Markdown table, with the parts that did not run and why."""
    host = data["machine"]
    lines = [f"Run of {data['started_at']} on {host['cpus']} CPUs (load {host['load_avg_1m']} at start), "
             f"{data['duration_s']} s:", "",
             "| part | goal | limit | measured | ratio | verdict |", "| --- | --- | --- | --- | --- | --- |"]
    for goal in data["goals"]:
        measured = "-" if goal["measured"] is None else with_unit(goal["measured"], goal["unit"])
        ratio = "-" if goal["ratio"] is None else f"{goal['ratio']:.2f}x"
        verdict = {"pass": "pass", "miss": "**miss**", "n/a": "n/a"}[goal["verdict"]]
        lines.append(f"| {goal['part']} | {goal['what']} | {goal['goal']} | {measured} | {ratio} | {verdict} |")
    with_ratios = [(name, part) for name, part in data["parts"].items() if part["status"] == "ok" and part["ratios"]]
    if with_ratios:
        lines += ["", "Ratios measured in the same run (see bench.json for the raw numbers):", ""]
        for name, part in with_ratios:
            shown = ", ".join(f"{key} {value:.2f}" for key, value in part["ratios"].items() if value is not None)
            lines.append(f"- {name}: {shown}")
    others = [(name, part) for name, part in data["parts"].items() if part["status"] != "ok"]
    if others:
        lines.append("")
        lines += [f"- {name}: {part['status']} ({part['reason']})" for name, part in others]
    return "\n".join(lines)


def update_readme(path: Path, data: dict[str, Any]) -> None:
    """Replaces the text between the last-run markers in the README with this run's table."""
    text = path.read_text(encoding="utf-8")
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"bench: {path} lacks the markers {TABLE_START} and {TABLE_END}; put them back around the "
                         "table and run again.")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    path.write_text(f"{head}{TABLE_START}\n{markdown_table(data)}\n{TABLE_END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
