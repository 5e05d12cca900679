"""Reports people read: a summary per runbook item (JSON and Markdown) beside pytest's JUnit XML and allure results.

The plugin here runs in the pytest controller (with or without xdist). Scenarios carry their runbook item and
journal in `user_properties`, which xdist ships from the workers, so the controller sees every result.
Schema of summary.json (stable, documented in reports/README.md):
{"target", "runbook", "started_at", "duration_s",
 "items": [{"id", "section", "title", "line", "outcome": "pass"|"fail"|"drift"|"blocked"|"error", "message" (one
            sentence), "blocked_by", "symptom_observed", "fix_verified", "time_to_detect_s", "time_to_recover_s",
            "tests": [{"nodeid", "outcome", "message", "blocked_by", "detail"}], "drift",
            "findings": [{"title", "detail", "severity": "info"|"warning"|"defect", "source"}],
            "deviations": [{"phase", "says", "seen", "line"}], "measurements"}],
 "beyond": [{"id": "beyond:hostile-exchange"|"beyond:security-probes"|"beyond:target-secrets", "title", "outcome",
             "message", "tests", "findings": [{"name", "title", "detail", "severity", "accepted": {"by", "reason"}}]}],
 "drift": [{"kind", "item", "runbook", "system", "line", "subject", "want", "have", "where"}],
 "remedy": {"source", "verified_with", "proposals": [...], "unproposed": [...]}   (harness.remedy; reports/remedy/),
 "totals": {"pass", "fail", "drift", "blocked", "error"},
 "exit_code", "isolation",
 "security": {"tests", "probes", "findings", "failures", "ports"},
 "secrets": {"checked", "harness_leaks", "target_leaks", ...}}   (secrets: added by harness.secrets_scan)
"""
from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from harness import schedule
from harness.annotated import JOURNALS_JSON, write_annotated
from harness.outcomes import DRIFT, ERROR, FAIL, OUTCOMES, PASS, SKIPPED, exit_code, one_sentence, worst
from harness.summary_markdown import markdown, severity_rank, short_test_name
from harness.target import PROFILE_FILE, Acceptance
from quantlab_chaos.errors import HarnessError
from quantlab_chaos.runbook import Runbook, RunbookItem

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
SECURITY_MARKER = "security"
SECURITY_PROPERTY = "security_probes"
SECURITY_ROW, HOSTILE_ROW, SECRETS_ROW = "beyond:security-probes", "beyond:hostile-exchange", "beyond:target-secrets"
# Rows beyond the runbook that tests feed, by the marker their tests carry.
BEYOND_MARKERS = {
    HOSTILE_ROW: ("hostile", "Hostile exchange (junk, repeats, out-of-order events, drops, stalls)"),
    SECURITY_ROW: (SECURITY_MARKER, "Security probes (open ports, credentials, rate limits)"),
}
# The allure parents: the runbook's items under one, each row beyond the runbook under its own (reports/README.md).
RUNBOOK_PARENT, BEYOND_PARENT = "QuantLab runbook", "Beyond the runbook"
BEYOND_PARENTS = {
    HOSTILE_ROW: "Beyond the runbook: hostile exchange",
    SECURITY_ROW: "Beyond the runbook: security",
    SECRETS_ROW: "Beyond the runbook: target secrets",
}
DRIFT_PARENT = "Runbook drift"
ALLURE_CATEGORIES = [
    {"name": "Runbook drift (the runbook's text no longer matches the system)", "messageRegex": r"(?s).*\[drift\].*",
     "matchedStatuses": ["failed", "broken"]},
    {"name": "Blocked (the steady state could not be reached before any fault)", "messageRegex": r"(?s).*\[blocked\].*",
     "matchedStatuses": ["failed", "broken"]},
    {"name": "System defect (the system disagrees with the runbook)", "matchedStatuses": ["failed"]},
    {"name": "Harness error (the harness or its environment broke)", "matchedStatuses": ["broken"]},
]


@dataclass
class TestOutcome:
    nodeid: str
    item: str
    outcome: str = PASS  # one of harness.outcomes.OUTCOMES, or SKIPPED
    message: str = ""  # one sentence
    detail: str = ""  # the full text of what ended the scenario
    blocked_by: str | None = None
    journal: dict[str, Any] | None = None
    inherent_wait_s: float = 0.0
    duration_s: float = 0.0

    def note(self, report: pytest.TestReport) -> None:
        """Takes in one phase's report; the worst outcome of setup, call and teardown stands."""
        self.duration_s += report.duration
        verdict = getattr(report, "verdict", None)
        if not isinstance(verdict, dict):
            return
        outcome = verdict.get("outcome") or PASS
        current = [self.outcome] if self.outcome != SKIPPED else []
        if outcome == SKIPPED and self.outcome == PASS:
            self.outcome, self.message = SKIPPED, verdict.get("message") or ""
        elif outcome != SKIPPED and worst(current + [outcome]) == outcome and outcome != self.outcome:
            self.outcome, self.message = outcome, verdict.get("message") or ""
            self.blocked_by = verdict.get("blocked_by")
            self.detail = _failure_message(report) if report.failed else ""


@dataclass
class ItemSummary:
    item: RunbookItem
    tests: list[TestOutcome] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)

    def verdict(self) -> tuple[str, str, str | None]:
        """The item's outcome, its one-sentence message and the item blocking it (PRECEDENCE decides)."""
        ran = [t for t in self.tests if t.outcome != SKIPPED]
        if not self.tests:
            return ERROR, "[error] no scenario proves this item: the harness has no test for it", None
        if not ran:
            return ERROR, one_sentence("[error] no scenario of this item could run: "
                                       + "; ".join(sorted({t.message for t in self.tests}))), None
        outcome = worst([t.outcome for t in ran] + ([DRIFT] if self.drift else []))
        assert outcome is not None
        if outcome == PASS:
            return PASS, "", None
        if outcome == DRIFT and not any(t.outcome == DRIFT for t in ran):
            first = self.drift[0]
            more = f" (and {len(self.drift) - 1} more drift finding(s))" if len(self.drift) > 1 else ""
            return DRIFT, one_sentence(f"[drift] runbook line {first.get('line') or '-'} says {first['runbook']!r}; "
                                       f"the system: {first['system']}{more}"), None
        first_test = next(t for t in ran if t.outcome == outcome)
        others = sum(1 for t in ran if t.outcome == outcome) - 1
        more = f" (and {others} more scenario(s) {outcome})" if others else ""
        return outcome, one_sentence(f"{short_test_name(first_test.nodeid)}: {first_test.message}{more}"), first_test.blocked_by

    def to_dict(self) -> dict[str, Any]:
        journals = [t.journal for t in self.tests if t.journal]
        outcome, message, blocked_by = self.verdict()
        return {
            "id": self.item.id,
            "section": self.item.section,
            "title": self.item.title,
            "line": self.item.source.line,
            "outcome": outcome,
            "message": message,
            "blocked_by": blocked_by,
            "symptom_observed": _all_of(j.get("symptom_observed") for j in journals),
            "fix_verified": _all_of(j.get("fix_verified") for j in journals),
            "time_to_detect_s": _max_of(j.get("time_to_detect_s") for j in journals),
            "time_to_recover_s": _max_of(j.get("time_to_recover_s") for j in journals),
            "tests": [{"nodeid": t.nodeid, "outcome": t.outcome, "message": t.message, "blocked_by": t.blocked_by,
                       "detail": t.detail} for t in self.tests],
            "drift": self.drift,
            "findings": [f for j in journals for f in j.get("findings", [])],
            "deviations": [d for j in journals for d in j.get("deviations", [])],
            "measurements": {k: v for j in journals for k, v in j.get("measurements", {}).items()},
        }


def _all_of(values: Any) -> bool | None:
    seen = [v for v in values if v is not None]
    return all(seen) if seen else None


def _max_of(values: Any) -> float | None:
    seen = [v for v in values if isinstance(v, (int, float))]
    return max(seen) if seen else None


class RunbookReport:
    """Collects results per runbook item and writes summary.json / summary.md at the end of the session."""

    def __init__(self, out_dir: Path, runbook: Runbook, target_root: Path, drift: list[dict[str, Any]] | None = None,
                 allure_dir: Path | None = None, selected: list[str] | None = None,
                 accepted: Mapping[str, Acceptance] | None = None) -> None:
        self.selected = set(selected or [])
        self.accepted = dict(accepted or {})
        self.out_dir = out_dir
        self.runbook = runbook
        self.target_root = target_root
        self.drift = drift or []
        self.allure_dir = allure_dir
        self.started_at = datetime.now(UTC)
        self._t0 = time.monotonic()
        self.outcomes: dict[str, TestOutcome] = {}
        self.security: dict[str, dict[str, Any]] = {}  # nodeid -> {"outcome", "report"} of each security scenario
        self.blocks: dict[str, Any] = {}  # further top-level blocks other plugins add (e.g. "secrets")
        self.isolation: str = ""  # how environments are kept apart (network namespaces or port locks)
        self.beyond_tests: dict[str, dict[str, TestOutcome]] = {}  # row id -> nodeid -> outcome
        self.shard: str | None = None  # K/N when this run is one shard of the scenarios
        self.walls: dict[str, float] = {}  # nodeid -> wall time of its three phases
        self.costs: dict[str, dict[str, Any]] = {}  # nodeid -> {"cpu_s", "rss_bytes"} its process measured
        self.waits: dict[str, list[list[Any]]] = {}  # nodeid -> [reason, seconds] of each wait it needs by nature

    def set_block(self, name: str, data: Any) -> None:
        """Adds (or replaces) a top-level block of summary.json; the next write() includes it."""
        self.blocks[name] = data

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        self._note_cost(report, props)
        self._note_security(report, props)
        for row_id, (marker, _) in BEYOND_MARKERS.items():
            if marker in report.keywords:
                tests = self.beyond_tests.setdefault(row_id, {})
                tests.setdefault(report.nodeid, TestOutcome(report.nodeid, row_id)).note(report)
        item = props.get("runbook_item")
        if not item:
            return
        outcome = self.outcomes.setdefault(report.nodeid, TestOutcome(report.nodeid, str(item)))
        if "runbook_journal" in props:
            outcome.journal = json.loads(str(props["runbook_journal"]))
        outcome.inherent_wait_s = sum(float(seconds) for _, seconds in self.waits.get(report.nodeid, []))
        outcome.note(report)

    def _note_cost(self, report: pytest.TestReport, props: dict[str, Any]) -> None:
        """Every test's wall time (its three phases) and the cost its process measured (plugin.CostMeter)."""
        self.walls[report.nodeid] = self.walls.get(report.nodeid, 0.0) + report.duration
        if "cost" in props:
            self.costs[report.nodeid] = json.loads(str(props["cost"]))
        if "inherent_waits" in props:
            self.waits[report.nodeid] = json.loads(str(props["inherent_waits"]))

    def longest(self) -> dict[str, Any] | None:
        """The run's longest scenario, which bounds the run however many workers it has, with the waits that set
        its length (a runbook value, a deadline of ours) where the scenario declared them."""
        if not self.walls:
            return None
        nodeid = max(self.walls, key=lambda n: (self.walls[n], n))
        waits = [(str(reason), float(seconds)) for reason, seconds in self.waits.get(nodeid, [])]
        return {"nodeid": nodeid, "wall_s": round(self.walls[nodeid], 2),
                "inherent_wait_s": round(sum(seconds for _, seconds in waits), 2),
                "waits": [{"reason": reason, "seconds": seconds} for reason, seconds in waits]}

    def timings(self) -> dict[str, schedule.Timing]:
        return {nodeid: schedule.Timing(round(wall, 3), float(self.costs.get(nodeid, {}).get("cpu_s", 0.0)),
                                        int(self.costs.get(nodeid, {}).get("rss_bytes", 0)))
                for nodeid, wall in self.walls.items()}

    def _save_durations(self) -> None:
        """durations.json beside the reports: this run's timings over those of earlier runs (a run of some items
        keeps the others'), for the next run's order, worker count and shards (harness.schedule)."""
        path = self.out_dir / schedule.DURATIONS_JSON
        try:
            earlier = schedule.load(path)
        except HarnessError:
            earlier = {}
        schedule.save(path, {**earlier, **self.timings()})

    def _note_security(self, report: pytest.TestReport, props: dict[str, Any]) -> None:
        """Security scenarios (marker `security`) carry their probes and findings in user_properties."""
        if SECURITY_MARKER not in report.keywords and SECURITY_PROPERTY not in props:
            return
        entry = self.security.setdefault(report.nodeid, {"outcome": "passed", "report": None, "message": ""})
        if SECURITY_PROPERTY in props:
            entry["report"] = json.loads(props[SECURITY_PROPERTY])
        if report.failed:
            entry["outcome"], entry["message"] = "failed", _failure_message(report)
        elif report.skipped and entry["outcome"] != "failed":
            entry["outcome"], entry["message"] = "skipped", skip_reason(report)

    def security_block(self) -> dict[str, Any]:
        """Every security scenario's probes, findings and failures; target secret leaks are findings too."""
        reports = [entry["report"] or {} for entry in self.security.values()]
        findings = [f for r in reports for f in r.get("findings", [])]
        return {
            "tests": [{"nodeid": nodeid, "outcome": e["outcome"], "message": e["message"]} for nodeid, e in self.security.items()],
            "probes": [p for r in reports for p in r.get("probes", [])],
            "findings": findings,
            "failures": [f for r in reports for f in r.get("failures", [])],
            "ports": {service: sockets for r in reports for service, sockets in r.get("ports", {}).items()},
        }

    def beyond_rows(self) -> list[dict[str, Any]]:
        """Rows beyond the runbook: the hostile-exchange checks, the security probes and the secrets the target
        wrote. A defect among their findings fails its row unless the checkout's profile accepts it by name."""
        rows = []
        security = self.security_block()
        leaks = (self.blocks.get("secrets") or {}).get("target_leaks")
        for row_id, (_, title) in BEYOND_MARKERS.items():
            tests = list(self.beyond_tests.get(row_id, {}).values())
            findings = security["findings"] if row_id == SECURITY_ROW else []
            if tests:
                rows.append(_beyond_row(row_id, title, tests, findings, self.accepted))
        if leaks is not None:
            rows.append(_beyond_row(SECRETS_ROW, "Secrets the target writes (audit trail, spool, archive, journals)",
                                    [], target_leak_findings(leaks), self.accepted))
        return rows

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(session.config, "workerinput"):
            return
        self.write()

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """JUnit says `error`, not `failure`, for a scenario the harness itself could not run (junitxml has written
        its file by now: it writes at session finish)."""
        xml_path = getattr(config.option, "xmlpath", None)
        if xml_path and not hasattr(config, "workerinput"):
            errored = {o.nodeid for o in self.outcomes.values() if o.outcome == ERROR}
            junit_errors(Path(xml_path), errored)

    def summary(self) -> dict[str, Any]:
        items = {item.id: ItemSummary(item) for item in self.runbook.items()
                 if not self.selected or item.id in self.selected}
        unknown: list[TestOutcome] = []
        for outcome in self.outcomes.values():
            (items[outcome.item].tests.append(outcome) if outcome.item in items else unknown.append(outcome))
        if self.shard:  # an item none of whose scenarios is in this shard gets its outcome in `report merge`
            items = {item_id: summary for item_id, summary in items.items() if summary.tests}
        for drift in self.drift:
            if drift.get("item") in items:
                items[drift["item"]].drift.append(drift)
        rows = [summary.to_dict() for summary in items.values()]
        totals = {outcome: sum(1 for row in rows if row["outcome"] == outcome) for outcome in OUTCOMES}
        beyond = self.beyond_rows()
        return {
            "target": str(self.target_root),
            "runbook": str(self.runbook.path),
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "duration_s": round(time.monotonic() - self._t0, 2),
            "items": rows,
            "drift": self.drift,
            "totals": totals,
            "exit_code": exit_code(row["outcome"] for row in [*rows, *beyond]),
            "beyond": beyond,
            "isolation": self.isolation,
            "scenarios_without_item": [o.nodeid for o in unknown],
            "timing": {
                "scenario_time_s": round(sum(o.duration_s for o in self.outcomes.values()), 2),
                "inherent_wait_s": round(sum(o.inherent_wait_s for o in self.outcomes.values()), 2),
                "longest": self.longest(),
            },
            "security": self.security_block(),
            "only": sorted(self.selected),
            "shard": self.shard,
            **self.blocks,
        }

    def write(self, allure_extras: bool = True) -> dict[str, Any]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        data = self.summary()
        data["remedy"] = self.remedy(data)
        journals = {nodeid: o.journal for nodeid, o in self.outcomes.items()}
        (self.out_dir / SUMMARY_JSON).write_text(json.dumps(data, indent=2, default=str) + "\n")
        (self.out_dir / JOURNALS_JSON).write_text(json.dumps(journals, default=str) + "\n")
        (self.out_dir / SUMMARY_MD).write_text(markdown(data))
        if self.allure_dir is not None and allure_extras:
            write_allure_extras(self.allure_dir, data)
        write_annotated(self.out_dir, data, journals, self.runbook.path)
        if self.walls:
            self._save_durations()
        return data

    def remedy(self, data: dict[str, Any]) -> dict[str, Any]:
        """What to change for each fail, drift or blocked item (reports/remedy/), as summary.json's `remedy` block;
        verified only by `quantlab-chaos remedy --verify`. A checkout the remedy cannot read says so in the block."""
        from harness.remedy import report
        from harness.remedy.propose import propose
        from harness.target import Target

        try:
            target = Target.load(self.target_root, self.runbook.path)
            found = propose(self.runbook, target, data["drift"], data["items"], "this run and the static check")
            report.write(self.out_dir / report.REMEDY_DIR, found, data["items"])
        except (HarnessError, OSError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}", "proposals": [], "unproposed": []}
        return found.to_dict()


def junit_errors(path: Path, nodeids: set[str]) -> None:
    """Turns the <failure> of each scenario in `nodeids` into an <error> in the JUnit file, counts updated."""
    import xml.etree.ElementTree as ET

    if not nodeids or not path.is_file():
        return
    wanted = {_junit_address(nodeid) for nodeid in nodeids}
    tree = ET.parse(path)
    for suite in tree.getroot().iter("testsuite"):
        moved = 0
        for case in suite.iter("testcase"):
            failure = case.find("failure")
            if failure is not None and (case.get("classname"), case.get("name")) in wanted:
                failure.tag = "error"
                moved += 1
        if moved:
            suite.set("failures", str(int(suite.get("failures", "0")) - moved))
            suite.set("errors", str(int(suite.get("errors", "0")) + moved))
    tree.write(path, encoding="utf-8", xml_declaration=True)


def _junit_address(nodeid: str) -> tuple[str, str]:
    """(classname, name) as pytest's junitxml writes a test id."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = names[0].replace("/", ".").removesuffix(".py")
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def target_leak_findings(leaks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One defect finding per secret and kind of place the target wrote it to (the places are in secrets.target_leaks)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for leak in leaks:
        groups.setdefault((leak["secret"], leak["kind"]), []).append(leak)
    return [{"name": f"target-secret:{secret}:{kind}", "title": f"the target wrote the secret {secret} into its {kind}",
             "detail": f"{len(found)} place(s), e.g. {found[0]['where']} (during {found[0].get('test') or '-'}); "
                       "see secrets.target_leaks", "severity": "defect"}
            for (secret, kind), found in groups.items()]


def finding_name(finding: Mapping[str, Any]) -> str:
    """The name an operator accepts a finding by: its own name, else its title."""
    return str(finding.get("name") or finding.get("title"))


def _beyond_row(row_id: str, title: str, tests: list[TestOutcome], findings: list[dict[str, Any]],
                accepted: Mapping[str, Acceptance]) -> dict[str, Any]:
    """One row beyond the runbook: the worst of its tests, failed by any defect finding the operator has not
    accepted (each accepted one says by which line of the profile)."""
    marked = []
    for finding in findings:
        acceptance = accepted.get(finding_name(finding))
        entry = {**finding, "name": finding_name(finding)}
        if acceptance is not None:
            entry["accepted"] = {"by": acceptance.where, "reason": acceptance.reason}
        marked.append(entry)
    defects = [f for f in marked if f.get("severity") == "defect" and "accepted" not in f]
    ran = [t for t in tests if t.outcome != SKIPPED]
    outcome = worst([t.outcome for t in ran] + ([FAIL] if defects else [])) or (SKIPPED if tests else PASS)
    if outcome in (PASS, SKIPPED):
        message = ""
    elif defects and not any(t.outcome == FAIL for t in ran):
        more = f" (and {len(defects) - 1} more)" if len(defects) > 1 else ""
        message = one_sentence(f"defect: {defects[0]['title']}: {defects[0]['detail']}{more}; accept it by name in "
                               f"{PROFILE_FILE} [accept] only if it is known and tracked")
    else:
        first = next(t for t in ran if t.outcome == outcome)
        message = one_sentence(f"{short_test_name(first.nodeid)}: {first.message}")
    return {"id": row_id, "title": title, "outcome": outcome, "message": message,
            "tests": [{"nodeid": t.nodeid, "outcome": t.outcome, "message": t.message} for t in tests],
            "findings": marked}


def allure_group_labels(parent: str, group: str, subgroup: str) -> list[tuple[str, str]]:
    """The labels that place a result in allure's tree: feature and story, which tools/allure/allurerc.json groups
    by (under the epic), and the same as parentSuite, suite and subSuite, allure's default tree."""
    return [("epic", parent), ("feature", group), ("story", subgroup),
            ("parentSuite", parent), ("suite", group), ("subSuite", subgroup)]


def runbook_groups(runbook: Runbook, item: RunbookItem) -> tuple[str, str]:
    """An item's allure groups, its section and itself, each numbered in runbook order: the report's tree is sorted
    by name, since allure would otherwise order groups by the time their first test started."""
    items = runbook.items()
    sections = list(dict.fromkeys(i.section for i in items))
    return (f"{sections.index(item.section) + 1:02d}. {item.section}",
            f"{items.index(item) + 1:02d}. {item.title} [{item.id}]")


def findings_markdown(findings: list[Mapping[str, Any]]) -> str:
    """Findings as a Markdown list for a test's allure description, the most severe first."""
    ranked = sorted(findings, key=severity_rank)
    return "\n".join(f"- **{f.get('severity', 'warning')}**: {f['title']}: {f['detail']}" for f in ranked)


def _failure_message(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return " ".join(text.split())[:1000]


def skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)[:300]


def write_allure_extras(allure_dir: Path, data: dict[str, Any]) -> None:
    """categories.json, environment.properties, and one result per drift entry, so allure shows drift too."""
    allure_dir.mkdir(parents=True, exist_ok=True)
    (allure_dir / "categories.json").write_text(json.dumps(ALLURE_CATEGORIES, indent=2))
    props = {
        "target": data["target"], "runbook": data["runbook"], "python": platform.python_version(),
        "node": _version(["node", "--version"]), "started_at": data["started_at"],
    }
    (allure_dir / "environment.properties").write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    now = int(time.time() * 1000)
    for index, drift in enumerate(data["drift"]):
        result = {
            "uuid": f"drift-{index:04d}-{now}", "historyId": f"drift-{drift['kind']}-{drift['item']}-{drift['runbook']}",
            "name": f"Runbook drift: {drift['item']} ({drift['kind']})", "fullName": f"runbook-drift.{index}",
            "status": "failed", "stage": "finished", "start": now, "stop": now,
            "statusDetails": {"message": f"[drift] runbook line {drift.get('line') or '-'} says {drift['runbook']!r}; "
                                         f"the system: {drift['system']}"},
            "labels": [*_labels(allure_group_labels(DRIFT_PARENT, DRIFT_PARENT, drift["item"])),
                       {"name": "runbook_item", "value": drift["item"]}],
        }
        (allure_dir / f"drift-{index:04d}-result.json").write_text(json.dumps(result))
    findings = [(row, f) for row in data.get("beyond") or [] for f in row["findings"] if f.get("severity") != "info"]
    for index, (row, finding) in enumerate(findings):
        accepted = finding.get("accepted")
        failed = finding.get("severity") == "defect" and not accepted
        result = {
            "uuid": f"finding-{index:04d}-{now}", "historyId": f"finding-{row['id']}-{finding['name']}",
            "name": f"{finding['severity']}: {finding['title']}", "fullName": f"{row['id']}.{index}",
            "status": "failed" if failed else "passed", "stage": "finished", "start": now, "stop": now,
            "statusDetails": {"message": finding["detail"] + (f" (accepted by {accepted['by']}: {accepted['reason']})"
                                                              if accepted else "")},
            "labels": [*_labels(allure_group_labels(BEYOND_PARENT, BEYOND_PARENTS[row["id"]], "findings")),
                       {"name": "severity", "value": "critical" if finding["severity"] == "defect" else "normal"},
                       {"name": "tag", "value": f"{finding['severity']} finding"}],
        }
        (allure_dir / f"finding-{index:04d}-result.json").write_text(json.dumps(result))


def _labels(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in pairs]


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
