"""summary.md: the run's verdicts as a page an operator reads, one sentence per runbook item and per row beyond it."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from harness.experiment import SEVERITIES, said
from harness.outcomes import BLOCKED, FAIL, OUTCOMES, PASS, SKIPPED, one_sentence
from harness.remedy.report import table

MAX_LISTED_LEAKS = 30  # in summary.md; summary.json lists them all
SEVERITY_ORDER = tuple(reversed(SEVERITIES))  # most severe first


def short_test_name(nodeid: str) -> str:
    return nodeid.split("::")[-1]


def severity_rank(finding: Mapping[str, Any]) -> int:
    severity = finding.get("severity", "warning")
    return SEVERITY_ORDER.index(severity) if severity in SEVERITY_ORDER else len(SEVERITY_ORDER)


def markdown(data: dict[str, Any]) -> str:
    totals, beyond = data["totals"], data.get("beyond") or []
    lines = [
        "# Runbook verification summary", "",
        f"- Target: `{data['target']}`", f"- Runbook: `{data['runbook']}`",
        f"- Started: {data['started_at']}, took {data['duration_s']} s",
        f"- Isolation: {data.get('isolation') or '-'}",
        f"- Longest scenario: {longest_sentence((data.get('timing') or {}).get('longest')) or '-'}",
        "- Items: " + ", ".join(f"{totals.get(o, 0)} {o}" for o in OUTCOMES) + f" (exit code {data.get('exit_code')})",
    ]
    if beyond:
        counts = {o: sum(1 for row in beyond if row["outcome"] == o) for o in (*OUTCOMES, SKIPPED)}
        lines.append("- Beyond the runbook: " + ", ".join(f"{n} {o}" for o, n in counts.items() if n))
    lines += ["", "| item | line | outcome | symptom seen | fix verified | detect (s) | recover (s) | findings | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    mark = {True: "yes", False: "no", None: "-"}
    for row in data["items"]:
        lines.append(f"| {row['id']} | {row['line']} | **{row['outcome']}** | {mark[row['symptom_observed']]} | "
                     f"{mark[row['fix_verified']]} | {row['time_to_detect_s'] if row['time_to_detect_s'] is not None else '-'} | "
                     f"{row['time_to_recover_s'] if row['time_to_recover_s'] is not None else '-'} | "
                     f"{_cell(_findings_cell(row['findings']))} | {_cell(item_sentence(row))} |")
    lines += _beyond_markdown(beyond)
    deviations = [(row["id"], d) for row in data["items"] for d in row.get("deviations", [])]
    if deviations:
        lines += ["", "## Deviations (every runbook promise the system did not keep)", ""]
        lines += [f"- {item} [{d['phase']}]: {said(d.get('line'), d['says'], d['seen'])}"
                  .replace("\n", " ") for item, d in deviations]
    lines += _beyond_findings_markdown(beyond)
    findings = [(row["id"], f) for row in data["items"] for f in row["findings"]]
    if findings:
        lines += ["", "## Findings", ""]
        lines += [f"- {item} ({f.get('severity', 'warning')}): **{f['title']}**: {f['detail']}" for item, f in findings]
    if data["drift"]:
        lines += ["", "## Runbook drift", ""]
        lines += [f"- [{d['kind']}] {d['item']}: runbook line {d.get('line') or '-'} says `{d['runbook']}`; "
                  f"the system: {d['system']}" for d in data["drift"]]
    lines += _remedy_markdown(data.get("remedy"), data["items"])
    lines += _security_markdown(data.get("security"))
    lines += _secrets_markdown(data.get("secrets"))
    return "\n".join(lines) + "\n"


def longest_sentence(longest: Mapping[str, Any] | None) -> str | None:
    """What bounds a run however many workers it has: its longest scenario, and what sets that one's length."""
    if not longest:
        return None
    waits = longest.get("waits") or []
    said_waits = "; ".join(f"{w['reason']} ({float(w['seconds']):g} s)" for w in waits)
    why = (f"{float(longest.get('inherent_wait_s', 0.0)):g} s of it are waits it needs: {said_waits}" if waits
           else "it declares no waits of its own")
    return f"{short_test_name(str(longest['nodeid']))} took {float(longest['wall_s']):g} s; {why}"


def _remedy_markdown(block: dict[str, Any] | None, rows: list[dict[str, Any]]) -> list[str]:
    """What the remedy proposes for each item (reports/remedy/ has the patch, the drop-ins and REMEDY.md)."""
    if not block:
        return []
    if block.get("error"):
        return ["", "## Remedy", "", f"No remedy could be drawn: {block['error']}"]
    return ["", "## Remedy (reports/remedy/: runbook.patch, systemd/ drop-ins, REMEDY.md)", "", *table(block, rows)]


SENTENCE_LIMIT = 240  # characters of a verdict in summary.md; summary.json keeps the whole text
# What the outcome column already says, at the start of a scenario's message: the outcome's tag.
MESSAGE_PREFIXES = re.compile(r"^(?:\[(?:drift|error)\] |\[blocked\] steady state not reached before any fault"
                              r"(?: \(blocked by runbook item [^)]*\))?: )")


def item_sentence(row: Mapping[str, Any]) -> str:
    """An item's verdict in one sentence: for a failure, the runbook line and what the system did instead (the
    first deviation), else the message of its first scenario with that outcome, without the prefixes the outcome
    column gives, and how many more scenarios ended so."""
    outcome, deviations = row["outcome"], row.get("deviations") or []
    if outcome == PASS:
        return f"as runbook line {row['line']} says"
    if outcome == FAIL and deviations:
        first = deviations[0]
        more = f" (and {len(deviations) - 1} more deviation(s), listed below)" if len(deviations) > 1 else ""
        return one_sentence(said(first.get("line"), first["says"], first["seen"]), SENTENCE_LIMIT) + more
    tests = [t for t in row.get("tests", []) if t["outcome"] == outcome]
    text = _bare(outcome, tests[0]["message"] if tests else row["message"], row.get("blocked_by"))
    return text + (f" (and {len(tests) - 1} more scenario(s) {outcome})" if len(tests) > 1 else "")


def _bare(outcome: str, message: str, blocked_by: str | None) -> str:
    """A scenario's message as a sentence, without its name and outcome tag; a blocked one says it was blocked."""
    text = one_sentence(MESSAGE_PREFIXES.sub("", message), SENTENCE_LIMIT)
    if outcome == BLOCKED:
        return f"steady state not reached{f' (blocked by {blocked_by})' if blocked_by else ''}: {text}"
    return text


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "-"


def _finding_counts(findings: list[dict[str, Any]]) -> str:
    counts = {severity: sum(1 for f in findings if f.get("severity") == severity) for severity in SEVERITY_ORDER}
    return ", ".join(f"{n} {severity}" for severity, n in counts.items() if n) or "-"


def _findings_cell(findings: list[dict[str, Any]]) -> str:
    """The counts by severity, and the title of the most severe finding, one not accepted first (the list below has
    them all)."""
    if not findings:
        return "-"
    worst_one = min(findings, key=lambda f: (severity_rank(f), bool(f.get("accepted"))))
    accepted = " (accepted)" if worst_one.get("accepted") else ""
    return (f"{_finding_counts(findings)}; {worst_one.get('severity', 'warning')}{accepted}: "
            f"{one_sentence(worst_one['title'], 80)}")


def _beyond_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The checks beyond the runbook, one row each, beside the runbook's items."""
    if not rows:
        return []
    lines = ["", "## Beyond the runbook (checks the runbook does not list)", "",
             "| check | outcome | tests | findings | verdict |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {_cell(row['title'])} (`{row['id']}`) | **{row['outcome']}** | {len(row['tests'])} | "
                     f"{_cell(_findings_cell(row['findings']))} | {_cell(beyond_sentence(row))} |")
    return lines


def beyond_sentence(row: Mapping[str, Any]) -> str:
    """A row beyond the runbook in one sentence: its first test with the row's outcome (by name: each test is a
    check of its own), its unaccepted defect, or what passed."""
    tests = [t for t in row["tests"] if t["outcome"] == row["outcome"]]
    if row["outcome"] not in (PASS, SKIPPED) and tests:
        more = f" (and {len(tests) - 1} more test(s) {row['outcome']})" if len(tests) > 1 else ""
        return f"{short_test_name(tests[0]['nodeid'])}: {_bare(row['outcome'], tests[0]['message'], None)}{more}"
    if row["message"]:
        return one_sentence(row["message"], SENTENCE_LIMIT)
    accepted = sum(1 for f in row["findings"] if f.get("accepted"))
    ended = {PASS: "passed"}.get(row["outcome"], row["outcome"])
    done = f"{len(row['tests'])} test(s) {ended}" if row["tests"] else "no defect found"
    return done + (f", {accepted} known defect(s) accepted" if accepted else "")


def _beyond_findings_markdown(rows: list[dict[str, Any]]) -> list[str]:
    findings = [(row, f) for row in rows for f in row["findings"]]
    if not findings:
        return []
    lines = ["", "## Findings beyond the runbook", ""]
    for row, f in findings:
        accepted = f" (accepted by {f['accepted']['by']}: {f['accepted']['reason']})" if f.get("accepted") else ""
        lines.append(f"- {row['id']} ({f.get('severity', 'warning')}{', accepted' if accepted else ''}): "
                     f"**{f['title']}**: {f['detail']}{accepted}")
    return lines


def _security_markdown(security: dict[str, Any] | None) -> list[str]:
    if not security or not (security.get("tests") or security.get("findings")):
        return []
    probes = security.get("probes", [])
    lines = ["", "## Security probes", "",
             f"- {len(probes)} probe(s), {sum(1 for p in probes if not p.get('ok', True))} not as expected; "
             f"tests: " + (", ".join(f"{t['nodeid'].split('::')[-1]} **{t['outcome']}**" for t in security["tests"]) or "none")]
    lines += [f"- FAILURE: {failure}" for failure in security.get("failures", [])]
    lines += [f"- finding ({f.get('severity', 'warning')}): **{f['title']}**: {f['detail']}" for f in security.get("findings", [])]
    return lines


def _secrets_markdown(secrets: dict[str, Any] | None) -> list[str]:
    if not secrets:
        return []
    harness, target = secrets.get("harness_leaks", []), secrets.get("target_leaks", [])
    lines = ["", "## Secret leak scan", "",
             f"- {secrets.get('checked', 0)} artifact(s) scanned for {len(secrets.get('secret_names', []))} secret name(s): "
             f"{len(harness)} harness leak(s), {len(target)} target leak(s)"]
    lines += [f"- HARNESS LEAK: `{leak['secret']}` in `{leak['where']}`" + (f" ({leak['detail']})" if leak.get("detail") else "")
              for leak in harness]
    lines += [f"- target leak (finding): `{leak['secret']}` in `{leak['where']}` ({leak.get('test', '-')})"
              for leak in target[:MAX_LISTED_LEAKS]]
    if len(target) > MAX_LISTED_LEAKS:
        lines.append(f"- ... and {len(target) - MAX_LISTED_LEAKS} more target leak(s) in summary.json")
    return lines
