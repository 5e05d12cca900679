"""runbook.html: the runbook itself, in its own order and words, annotated with what the harness proved on each line.

The on-call engineer reads the runbook, not a test report; so the report is the runbook. Each line a runbook item
starts at carries the item's outcome and its time to detect and to recover; under it a <details> block unfolds the
evidence from the scenarios' journals: steps, deviations, measurements. Findings and drift stand on the line they
concern. One file, no network: inline CSS, one tiny script (it opens the block named in the URL fragment), and a
Content-Security-Policy that forbids every fetch, so it works opened from disk.

Only the summary and the journals feed it (both pass the harness's secret scan); allure attachments never do.
Every value from them, and the runbook's own text (markdown-it with raw HTML off), is escaped.
"""
from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.token import Token

from harness.experiment import said
from harness.outcomes import OUTCOMES
from quantlab_chaos.errors import ConfigError
from quantlab_chaos.runbook import load_runbook

RUNBOOK_HTML = "runbook.html"
JOURNALS_JSON = "journals.json"  # the scenarios' journals beside summary.json, so the page can be drawn again later
NOT_RUN = "not-run"
GIT_TIMEOUT_S = 5.0
MAX_EVIDENCE_CHARS = 3000  # per evidence value; the whole value stays in junit.xml
# The block an item's line opens, in order of preference: a list item or heading rather than the list around it.
ANCHOR_TYPES = ("list_item_open", "heading_open", "paragraph_open", "fence", "code_block", "table_open")
MOMENTS = (("fault", "fault"), ("detected", "symptom"), ("fix", "fix"), ("recovered", "recovery"))


def write_annotated(out_dir: Path, summary: Mapping[str, Any], journals: Mapping[str, Mapping[str, Any] | None],
                    runbook_path: Path | str) -> Path:
    """Writes runbook.html into `out_dir` and returns its path."""
    path = Path(runbook_path)
    try:
        text: str | None = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = None
    try:
        all_items = [(i.id, i.title, i.source.line) for i in load_runbook(path).items()]
    except ConfigError:
        all_items = [(row["id"], row["title"], row["line"]) for row in summary.get("items", [])]
    page = render(summary, journals, text, all_items, git_commit(Path(str(summary.get("target", "")))))
    out = out_dir / RUNBOOK_HTML
    out.write_text(page, encoding="utf-8")
    return out


def git_commit(root: Path) -> str | None:
    """The short commit of the checkout at `root`, naming the enclosing repository when `root` is inside one;
    None when it is no git checkout (or git is missing or hangs)."""
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD", "--show-toplevel"],
                              capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != 2:
        return None
    top, commit = sorted(lines, key=lambda line: not line.startswith("/"))  # the toplevel: the absolute path of the two
    return commit if Path(top).resolve() == root.resolve() else f"{commit} (of the enclosing repository {top})"


def render(summary: Mapping[str, Any], journals: Mapping[str, Mapping[str, Any] | None], runbook_text: str | None,
           all_items: Sequence[tuple[str, str, int]], commit: str | None) -> str:
    """The whole page. `all_items` are the runbook's items (id, title, line), run or not."""
    rows = {row["id"]: row for row in summary.get("items", [])}
    known = {item_id for item_id, _, _ in all_items}
    items = [*all_items, *((r["id"], r["title"], r["line"]) for r in rows.values() if r["id"] not in known)]
    notes: dict[int, list[str]] = {}
    for item_id, title, line in items:
        notes.setdefault(line, []).append(_item_note(item_id, title, rows.get(item_id), journals))
    for line, extra in _line_extras(summary, rows).items():
        notes.setdefault(line, []).extend(extra)
    body, placed = _runbook_body(runbook_text, notes)
    left = [note for line, group in sorted(notes.items()) if line not in placed for note in group]
    return _page(summary, commit, len(items) - len(rows), body, left, journals)


# -- the runbook's text ------------------------------------------------------------------------------------------


def _markdown() -> MarkdownIt:
    """CommonMark with raw HTML off (the runbook's `<tags>` show as text) and images shown as links, never fetched."""
    md = MarkdownIt("commonmark", {"html": False})

    def image(self: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
        token = tokens[idx]
        alt = escape(token.content or "image")
        return f'<a href="{escape(str(token.attrGet("src") or ""))}">[image: {alt}]</a>'

    md.add_render_rule("image", image)
    return md


def _runbook_body(text: str | None, notes: Mapping[int, list[str]]) -> tuple[str, set[int]]:
    """The runbook rendered, each note placed under the block its line opens; the lines placed."""
    if text is None:
        return '<p class="missing">The runbook could not be read; its items follow without its text.</p>', set()
    md = _markdown()
    tokens = md.parse(text)
    anchors = _anchors(tokens, set(notes))
    out: list[Token] = []
    closing: dict[int, list[str]] = {}  # token index after which a line's notes go
    for index, token in enumerate(tokens):
        line = anchors.get(index)
        if line is not None:
            token.attrJoin("class", "item-line")
            token.attrSet("id", f"line-{line}")
            closing.setdefault(_close_index(tokens, index), []).extend(notes[line])
        if token.type == "list_item_close" and index in closing:
            out.append(_html(closing.pop(index)))
        out.append(token)
        if index in closing:
            out.append(_html(closing.pop(index)))
    return md.renderer.render(out, md.options, {}), set(anchors.values())


def _anchors(tokens: Sequence[Token], lines: set[int]) -> dict[int, int]:
    """Token index -> runbook line (1-based) for the block each wanted line opens."""
    found: dict[int, tuple[int, int]] = {}  # line -> (preference, token index)
    for index, token in enumerate(tokens):
        if token.map is None or token.type not in ANCHOR_TYPES or token.map[0] + 1 not in lines:
            continue
        line, rank = token.map[0] + 1, ANCHOR_TYPES.index(token.type)
        if line not in found or rank < found[line][0]:
            found[line] = (rank, index)
    return {index: line for line, (_, index) in found.items()}


def _close_index(tokens: Sequence[Token], index: int) -> int:
    """The index of the token that closes the block opened at `index` (itself for a fence or code block); a list
    item's notes go just before its close, inside the item."""
    if tokens[index].nesting != 1:
        return index
    depth = 0
    for later in range(index, len(tokens)):
        depth += tokens[later].nesting
        if depth == 0:
            return later
    return len(tokens) - 1


def _html(parts: Iterable[str]) -> Token:
    token = Token("html_block", "", 0)
    token.content = "".join(parts)
    return token


# -- one item ----------------------------------------------------------------------------------------------------


def _item_note(item_id: str, title: str, row: Mapping[str, Any] | None,
               journals: Mapping[str, Mapping[str, Any] | None]) -> str:
    """The item's outcome, timings and one-sentence message, always shown; its evidence folded under them."""
    if row is None:
        return (f'<div class="note {NOT_RUN}">{_verdict(item_id, NOT_RUN)} <b>{escape(title)}</b> '
                f'<span class="why">not run: this run selected other items</span></div>')
    timing = f'detect {_seconds(row.get("time_to_detect_s"))} · recover {_seconds(row.get("time_to_recover_s"))}'
    message = f'<div class="message">{escape(row.get("message") or "")}</div>' if row.get("message") else ""
    scenarios = "".join(_scenario(test, journals.get(test["nodeid"])) for test in row.get("tests", []))
    measurements = _pairs(row.get("measurements") or {})
    return (f'<details class="note {escape(row["outcome"])}" id="evidence-{slug(item_id)}" '
            f'data-item="{escape(item_id)}">'
            f'<summary>{_verdict(item_id, row["outcome"])} <b>{escape(title)}</b> <span class="timing">{timing}</span>'
            f' <span class="where">runbook line {int(row["line"])} · {escape(item_id)}</span>{message}</summary>'
            f'{scenarios or "<p>No scenario ran for this item.</p>"}'
            f'{"<h4>Measurements</h4>" + measurements if measurements else ""}</details>')


def _verdict(item_id: str, outcome: str) -> str:
    label = "not run" if outcome == NOT_RUN else outcome
    return (f'<span class="verdict {escape(outcome)}" data-item="{escape(item_id)}" '
            f'data-outcome="{escape(outcome)}">{escape(label.upper())}</span>')


def _scenario(test: Mapping[str, Any], journal: Mapping[str, Any] | None) -> str:
    head = (f'<h4><span class="verdict {escape(test["outcome"])}">{escape(test["outcome"].upper())}</span> '
            f'<code>{escape(test["nodeid"])}</code></h4>')
    message = f'<p class="message">{escape(test["message"])}</p>' if test.get("message") else ""
    if not journal:
        return f'<section class="scenario">{head}{message}<p>This scenario kept no journal.</p></section>'
    deviations = "".join(f'<li>{escape(_deviation(d))}</li>' for d in journal.get("deviations", []))
    return (f'<section class="scenario">{head}{message}'
            f'{"<h4>Deviations</h4><ul class=deviations>" + deviations + "</ul>" if deviations else ""}'
            f'{_steps(journal.get("steps", []))}</section>')


def _deviation(deviation: Mapping[str, Any]) -> str:
    return said(deviation.get("line"), str(deviation.get("says")), str(deviation.get("seen")))


def _steps(steps: Sequence[Mapping[str, Any]]) -> str:
    if not steps:
        return "<p>The journal holds no step.</p>"
    rows = []
    for step in steps:
        evidence = dict(step.get("evidence") or {})
        seen = evidence.pop("seen", "")
        ok = step.get("ok")
        mark = "ok" if ok else ("not ok" if ok is False else "–")
        rows.append(f'<tr class="{"bad" if ok is False else ""}"><td>{_seconds(step.get("started_s"))}</td>'
                    f'<td>{escape(str(step.get("kind", "")).replace("_", " "))}</td>'
                    f'<td>{escape(str(step.get("description", "")))}</td><td>{mark}</td>'
                    f'<td>{escape(str(seen))}</td><td>{_pairs(evidence)}</td></tr>')
    return ('<table class="steps"><thead><tr><th>at</th><th>phase</th><th>what was judged or done</th><th>ok</th>'
            f'<th>what was seen</th><th>evidence</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _pairs(values: Mapping[str, Any]) -> str:
    if not values:
        return ""
    return "<dl>" + "".join(f"<dt>{escape(str(k))}</dt><dd>{_value(v)}</dd>" for k, v in values.items()) + "</dl>"


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    if len(text) > MAX_EVIDENCE_CHARS:
        text = f"{text[:MAX_EVIDENCE_CHARS]}… ({len(text) - MAX_EVIDENCE_CHARS} more characters in junit.xml)"
    return f"<code>{escape(text)}</code>"


# -- findings and drift, on their lines --------------------------------------------------------------------------


def _line_extras(summary: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]]) -> dict[int, list[str]]:
    extras: dict[int, list[str]] = {}
    for row in rows.values():
        for finding in row.get("findings", []):
            line = (finding.get("source") or {}).get("line") or row["line"]
            extras.setdefault(int(line), []).append(_finding(finding))
    lines = {item_id: row["line"] for item_id, row in rows.items()}
    for drift in summary.get("drift", []):
        line = drift.get("line") or lines.get(drift.get("item"))
        if line:
            extras.setdefault(int(line), []).append(_drift(drift))
    for proposal in (summary.get("remedy") or {}).get("proposals", []):
        for index, line in enumerate(proposal.get("lines") or []):
            extras.setdefault(int(line), []).append(_proposal(proposal, line, first=index == 0))
    return extras


def _proposal(proposal: Mapping[str, Any], line: int, *, first: bool) -> str:
    """A remedy's proposal on a line it concerns, with its verification: in full on its first line, named on the
    others."""
    verification = proposal.get("verification") or {}
    status = str(verification.get("status", "not run"))
    change = "change the runbook's text" if proposal.get("change") == "runbook" else "change the system"
    head = (f'<span class="badge">{escape(change)}</span> <b>{escape(str(proposal.get("title", "")))}</b> '
            f'<span class="verification" data-status="{escape(status)}">{escape(status)}</span>')
    attrs = (f'class="proposal {escape(slug(status))}" data-proposal="{escape(str(proposal.get("id", "")))}" '
             f'data-verification="{escape(status)}"')
    if not first:
        return f'<div {attrs}>{head} <span class="why">(in full at line {int(proposal["lines"][0])})</span></div>'
    edits = "".join(f'<li>line {int(e["line"])}: <code>{escape(str(e["old"]))}</code> becomes '
                    f'<code>{escape(str(e["new"]))}</code></li>' for e in proposal.get("edits") or [])
    dropin = proposal.get("dropin") or {}
    settings = "".join(f'<li>[{escape(str(s["section"]))}] <code>{escape(str(s["key"]))}={escape(str(s["value"]))}'
                       f'</code> (the unit: {escape(str(s["current"]) or "none")})</li>'
                       for s in dropin.get("settings") or [])
    where = f'<p>drop-in <code>remedy/systemd/{escape(str(dropin["path"]))}</code></p>' if dropin else ""
    evidence = "".join(f"<li>{escape(str(e))}</li>" for e in proposal.get("evidence") or [])
    return (f'<details {attrs}><summary>{head}<div class="why">{escape(str(verification.get("why", "")))}</div>'
            f'</summary><p>{escape(str(proposal.get("why", "")))}</p>{where}'
            f'{"<ul class=edits>" + edits + settings + "</ul>" if edits or settings else ""}'
            f'{"<h4>Evidence</h4><ul>" + evidence + "</ul>" if evidence else ""}</details>')


def _finding(finding: Mapping[str, Any]) -> str:
    severity = str(finding.get("severity", "warning"))
    return (f'<div class="finding {escape(severity)}" data-severity="{escape(severity)}">'
            f'<span class="severity">{escape(severity)}</span> <b>{escape(str(finding.get("title", "")))}</b>: '
            f'{escape(str(finding.get("detail", "")))}</div>')


def _drift(drift: Mapping[str, Any]) -> str:
    item, kind, line = (escape(str(drift.get(key) or "-")) for key in ("item", "kind", "line"))
    return (f'<table class="drift" data-item="{item}"><tr><th>drift ({kind})</th><th>the runbook (line {line})</th>'
            f'<th>the system</th></tr><tr><td>{item}</td><td><code>{escape(str(drift.get("runbook", "")))}</code></td>'
            f'<td>{escape(str(drift.get("system", "")))}</td></tr></table>')


# -- the top: what ran, the counts, the timeline -----------------------------------------------------------------


def _page(summary: Mapping[str, Any], commit: str | None, not_run: int, body: str, unplaced: list[str],
          journals: Mapping[str, Mapping[str, Any] | None]) -> str:
    title = f'The runbook, annotated: {Path(str(summary.get("runbook", "runbook"))).name}'
    left = (f'<section class="unplaced"><h2>Items not found at their line in this runbook text</h2>{"".join(unplaced)}'
            '</section>') if unplaced else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'\">"
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
            f'<style>{CSS}</style></head><body><header><h1>{escape(title)}</h1>{_facts(summary, commit)}'
            f'{_counts(summary, not_run)}{_timeline(summary, journals)}</header>'
            f'<main class="runbook">{body}</main>{left}{_beyond(summary.get("beyond") or [])}'
            f'<script>{SCRIPT}</script></body></html>\n')


def _facts(summary: Mapping[str, Any], commit: str | None) -> str:
    facts = [("target", summary.get("target")), ("commit", commit), ("runbook", summary.get("runbook")),
             ("when", f'{summary.get("started_at", "")} ({_seconds(summary.get("duration_s"))})'),
             ("exit code", summary.get("exit_code")), ("isolation", summary.get("isolation") or None)]
    secrets = summary.get("secrets")
    if isinstance(secrets, Mapping):
        facts.append(("secret scan", f'{secrets.get("checked", 0)} artifact(s) read; '
                                     f'{len(secrets.get("harness_leaks", []))} harness leak(s), '
                                     f'{len(secrets.get("target_leaks", []))} target leak(s)'))
    return '<dl class="facts">' + "".join(f"<dt>{escape(name)}</dt><dd>{escape(str(value))}</dd>"
                                          for name, value in facts if value is not None) + "</dl>"


def _counts(summary: Mapping[str, Any], not_run: int) -> str:
    totals = summary.get("totals") or {}
    cells = [(outcome, int(totals.get(outcome, 0))) for outcome in OUTCOMES] + [(NOT_RUN, not_run)]
    return '<p class="counts">' + " ".join(
        f'<span class="count {o}" data-outcome="{o}">{n} {o.replace("-", " ")}</span>' for o, n in cells) + "</p>"


def moments(steps: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """When (seconds from the scenario's start) the fault was applied, the symptom held, the fix was applied and
    recovery held: the end of each phase's last step; a judged phase with a step that did not hold has no moment."""
    found: dict[str, float | None] = {}
    for moment, phase in MOMENTS:
        ends = [(float(s.get("started_s") or 0) + float(s.get("duration_s") or 0), s.get("ok") is not False)
                for s in steps if s.get("kind") == phase]
        if ends:
            found[moment] = max(end for end, _ in ends) if all(ok for _, ok in ends) else None
    return found


def _timeline(summary: Mapping[str, Any], journals: Mapping[str, Mapping[str, Any] | None]) -> str:
    rows = []
    for row in summary.get("items", []):
        for test in row.get("tests", []):
            steps = (journals.get(test["nodeid"]) or {}).get("steps") or []
            found = moments(steps)
            if found:
                rows.append(_timeline_row(row["id"], test["nodeid"], found, steps))
    if not rows:
        return '<p class="timeline">No scenario applied a fault or a fix in this run.</p>'
    return ('<h2>Faults and recoveries</h2><table class="timeline"><thead><tr><th>item</th><th>scenario</th>'
            '<th>fault</th><th>detected</th><th>fix</th><th>recovered</th><th>seconds from the scenario\'s start</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _timeline_row(item_id: str, nodeid: str, found: Mapping[str, float | None],
                  steps: Sequence[Mapping[str, Any]]) -> str:
    end = max([float(s.get("started_s") or 0) + float(s.get("duration_s") or 0) for s in steps] + [0.001])
    cells, marks = [], []
    for moment, _ in MOMENTS:
        if moment not in found:
            cells.append("<td>–</td>")
            continue
        at = found[moment]
        cells.append(f'<td class="{"" if at is not None else "bad"}">'
                     f'{_seconds(at) if at is not None else "never held"}</td>')
        if at is not None:
            marks.append(f'<span class="mark {moment}" style="left:{100 * at / end:.1f}%" title="{moment} at '
                         f'{at:.2f} s">{moment[0].upper()}</span>')
    track = f'<div class="track">{"".join(marks)}</div>'
    return (f'<tr><td><a href="#evidence-{slug(item_id)}">{escape(item_id)}</a></td>'
            f'<td><code>{escape(nodeid.split("::")[-1])}</code></td>{"".join(cells)}<td>{track}</td></tr>')


def _beyond(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    body = []
    for row in rows:
        findings = "".join(_finding(f) + _accepted(f.get("accepted")) for f in row.get("findings", []))
        tests = ", ".join(f'{escape(t["nodeid"].split("::")[-1])} ({escape(t["outcome"])})'
                          for t in row.get("tests", []))
        body.append(f'<tr><td>{_verdict(row["id"], row["outcome"])}</td><td>{escape(row["id"])}</td>'
                    f'<td>{escape(row.get("title", ""))}</td><td>{escape(row.get("message") or "")}'
                    f'{"<div class=tests>" + tests + "</div>" if tests else ""}{findings}</td></tr>')
    return ('<section class="beyond"><h2>Beyond the runbook</h2><table><thead><tr><th>outcome</th><th>row</th>'
            f'<th>what</th><th>message, scenarios and findings</th></tr></thead><tbody>{"".join(body)}</tbody></table>'
            '</section>')


def _accepted(accepted: Mapping[str, Any] | None) -> str:
    if not accepted:
        return ""
    return (f'<div class="accepted">accepted by {escape(str(accepted.get("by")))}: '
            f'{escape(str(accepted.get("reason")))}</div>')


def _seconds(value: Any) -> str:
    return f"{float(value):.2f} s" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def slug(item_id: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", item_id.lower()).strip("-")


# Opens the <details> the URL fragment names (a link from the timeline, or runbook.html#evidence-<item> from disk).
SCRIPT = ("function openFromHash(){var id=decodeURIComponent(location.hash.slice(1));"
          "var el=id&&document.getElementById(id);if(el&&el.tagName==='DETAILS'){el.open=true;}}"
          "window.addEventListener('hashchange',openFromHash);openFromHash();")

CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:78em;padding:1em 2em;color:#1d1d1f}
code{font:13px ui-monospace,monospace;background:#f3f3f3;padding:0 .2em;word-break:break-word}
header{border-bottom:2px solid #ccc;margin-bottom:1em}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em}dl.facts dt{font-weight:bold}
dl.facts dd{margin:0}
.count,.verdict,.severity{display:inline-block;border-radius:3px;padding:0 .45em;font-weight:bold;font-size:12px}
.pass{--c:#1a7f37}.fail{--c:#cf222e}.drift{--c:#8250df}.blocked{--c:#bf8700}.error{--c:#57606a}.not-run{--c:#aaa}
.verdict,.count{background:var(--c,#888);color:#fff}
.item-line{border-left:4px solid #999;padding-left:.5em}
.note{margin:.3em 0 .6em;border:1px solid var(--c,#ccc);border-left:6px solid var(--c,#ccc);border-radius:4px;
padding:.2em .6em;background:#fafafa}
.note summary{cursor:pointer}.note .timing,.note .where,.note .why{color:#555;font-size:13px}
.message{color:#6e1a1a}
table{border-collapse:collapse;margin:.4em 0;font-size:13px}td,th{border:1px solid #ddd;padding:.2em .4em;
vertical-align:top;text-align:left}tr.bad td{background:#fff0f0}td.bad{color:#cf222e}
table.steps dl{margin:0}table.steps dt{font-weight:bold;display:inline}
table.steps dd{display:inline;margin:0 .6em 0 .2em}table.steps td:first-child{white-space:nowrap}
.finding{margin:.3em 0;padding:.2em .5em;border-left:6px solid var(--s,#bf8700);background:#fffbe6}
.finding.defect{--s:#cf222e;background:#fff0f0}.finding.info{--s:#0969da;background:#f0f6ff}
.finding .severity{background:var(--s,#bf8700);color:#fff}
table.drift th{background:#f4efff}.accepted{font-size:12px;color:#555}
.track{position:relative;width:16em;height:1.2em;background:#eee;border-radius:3px}
.mark{position:absolute;top:0;font-size:11px;font-weight:bold;transform:translateX(-50%);color:#fff;
padding:0 .2em;border-radius:2px}.mark.fault{background:#cf222e}.mark.detected{background:#bf8700}
.mark.fix{background:#0969da}.mark.recovered{background:#1a7f37}
.proposal{margin:.3em 0;padding:.2em .5em;border-left:6px solid var(--v,#0969da);background:#f0f6ff}
.proposal summary{cursor:pointer}.proposal .badge{font-size:12px;font-weight:bold;color:#0969da}
.proposal .verification{display:inline-block;border-radius:3px;padding:0 .45em;font-weight:bold;font-size:12px;
color:#fff;background:var(--v,#57606a)}.proposal.verified{--v:#1a7f37}.proposal.not-verified{--v:#cf222e}
.proposal.not-applicable{--v:#bf8700}.proposal.not-run{--v:#888}.proposal .why{color:#555;font-size:13px}
"""
