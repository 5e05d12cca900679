"""`quantlab-chaos report merge DIR... --out DIR`: the reports of a run's shards (`run --shard K/N`) as one set.

Every scenario's outcome, message and journal come from the shard that ran it; the items' outcomes are computed again
over all of them by the same code that computes them in a run (harness.reporting), so an item whose scenarios were
split across shards gets its outcome here. JUnit suites and allure results are put side by side; the secrets block
adds up the shards' scans; durations.json keeps every scenario's timing for the next run's shards.
"""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import schedule
from harness.annotated import JOURNALS_JSON
from harness.reporting import SUMMARY_JSON, RunbookReport, TestOutcome
from harness.target import accepted_findings
from quantlab_chaos.errors import ConfigError
from quantlab_chaos.runbook import load_runbook

ALLURE = "allure-results"
REGENERATED = ("categories.json", "environment.properties")  # and drift-*/finding-* results: write() makes them anew


class MergedReport(RunbookReport):
    """A RunbookReport fed from shards' reports instead of live test reports."""

    merged_security: dict[str, Any]

    def security_block(self) -> dict[str, Any]:
        return self.merged_security


def merge_reports(dirs: Sequence[Path], out: Path, *, html: bool = False) -> int:
    from harness.run import _print_summary, render_html

    shards = [_read(d) for d in dirs]
    first = shards[0]
    for other in shards[1:]:
        for key in ("target", "runbook"):
            if other[key] != first[key]:
                raise ConfigError(f"the shards are of different runs: {other['_dir']} has {key} {other[key]}, "
                                  f"{first['_dir']} has {first[key]}; merge the shards of one run.")
    if out.resolve() in {Path(s["_dir"]).resolve() for s in shards}:
        raise ConfigError(f"--out {out} is one of the shards' folders; merge into a new folder.")
    out.mkdir(parents=True, exist_ok=True)
    for name in (SUMMARY_JSON, "summary.md", "junit.xml", JOURNALS_JSON, schedule.DURATIONS_JSON):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / ALLURE, ignore_errors=True)
    target_root = Path(first["target"])
    runbook = load_runbook(Path(first["runbook"]))
    selected = sorted({item for s in shards for item in s.get("only") or []})  # none: every item, as in one run
    report = MergedReport(out, runbook, target_root, first.get("drift", []), out / ALLURE, selected,
                          accepted_findings(target_root) if target_root.is_dir() else {})
    report.isolation = str(first.get("isolation", ""))
    for shard in shards:
        _take_shard(report, shard)
    report.merged_security = _security(shards)
    report.set_block("secrets", _secrets(shards))
    report.set_block("started_at", min(str(s.get("started_at", "")) for s in shards))
    report.set_block("duration_s", max(float(s.get("duration_s", 0.0)) for s in shards))
    report.set_block("timing", {key: round(sum(float((s.get("timing") or {}).get(key, 0.0)) for s in shards), 2)
                                for key in ("scenario_time_s", "inherent_wait_s")}
                     | {"longest": _longest(shards)})
    report.set_block("shards", [s["_dir"] for s in shards])
    _copy_allure(shards, out / ALLURE)
    _merge_junit(shards, out / "junit.xml")
    data = report.write()
    _print_summary(data, out)
    if html:
        render_html(out / ALLURE, out / "allure-report")
    return int(data["exit_code"])


def _longest(shards: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The longest scenario over all the shards."""
    found = [s["timing"]["longest"] for s in shards if (s.get("timing") or {}).get("longest")]
    return max(found, key=lambda longest: float(longest["wall_s"]), default=None)


def _read(folder: Path) -> dict[str, Any]:
    path = folder / SUMMARY_JSON
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder} is not a run's reports folder: {path} cannot be read ({exc}). Pass the folders "
                          "that `quantlab-chaos run --shard K/N --reports DIR` wrote.") from None
    if not isinstance(data, dict) or not isinstance(data.get("items"), list) or "target" not in data:
        raise ConfigError(f"{path} is not a run's summary (no items); pass the folders `quantlab-chaos run` wrote.")
    journals = folder / JOURNALS_JSON
    data["_journals"] = json.loads(journals.read_text()) if journals.is_file() else {}
    data["_timings"] = schedule.load(folder / schedule.DURATIONS_JSON)
    data["_dir"] = str(folder)
    return data


def _outcome(test: dict[str, Any], item: str, shard: dict[str, Any]) -> TestOutcome:
    timing = shard["_timings"].get(test["nodeid"])
    return TestOutcome(test["nodeid"], item, test["outcome"], test.get("message", ""), test.get("detail", ""),
                       test.get("blocked_by"), shard["_journals"].get(test["nodeid"]),
                       duration_s=timing.wall_s if timing else 0.0)


def _take_shard(report: MergedReport, shard: dict[str, Any]) -> None:
    for row in shard["items"]:
        for test in row.get("tests", []):
            report.outcomes[test["nodeid"]] = _outcome(test, row["id"], shard)
    for row in shard.get("beyond", []):
        for test in row.get("tests", []):
            report.beyond_tests.setdefault(row["id"], {})[test["nodeid"]] = _outcome(test, row["id"], shard)
    for nodeid, timing in shard["_timings"].items():
        if nodeid in report.outcomes or any(nodeid in tests for tests in report.beyond_tests.values()):
            report.walls[nodeid] = timing.wall_s
            report.costs[nodeid] = {"cpu_s": timing.cpu_s, "rss_bytes": timing.rss_bytes}


def _security(shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    blocks = [s.get("security") or {} for s in shards]
    merged: dict[str, Any] = {key: [x for b in blocks for x in b.get(key, [])]
                              for key in ("tests", "probes", "findings", "failures")}
    merged["ports"] = {service: sockets for b in blocks for service, sockets in (b.get("ports") or {}).items()}
    return merged


def _secrets(shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    blocks = [s["secrets"] for s in shards if isinstance(s.get("secrets"), dict)]
    if not blocks:
        return {}
    merged = dict(blocks[0])
    for key, value in blocks[0].items():
        if isinstance(value, list):
            merged[key] = [x for b in blocks for x in b.get(key, [])]
        elif isinstance(value, int) and not isinstance(value, bool):
            merged[key] = sum(int(b.get(key, 0)) for b in blocks)
    return merged


def _copy_allure(shards: Sequence[dict[str, Any]], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        source = Path(shard["_dir"]) / ALLURE
        for path in sorted(source.glob("*")) if source.is_dir() else []:
            generated = path.name.startswith(("drift-", "finding-")) and path.name.endswith("-result.json")
            if path.is_file() and path.name not in REGENERATED and not generated:
                shutil.copy2(path, dest / path.name)  # result and attachment names are uuids: no clashes


def _merge_junit(shards: Sequence[dict[str, Any]], dest: Path) -> None:
    root = ET.Element("testsuites")
    for shard in shards:
        path = Path(shard["_dir"]) / "junit.xml"
        if not path.is_file():
            continue
        tree = ET.parse(path).getroot()
        for suite in tree.iter("testsuite"):
            suite.set("name", f"{suite.get('name', 'pytest')} ({Path(shard['_dir']).name})")
            root.append(suite)
    ET.ElementTree(root).write(dest, encoding="utf-8", xml_declaration=True)
