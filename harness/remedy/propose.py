"""Proposals from what the harness found: which side of each mismatch to change, and how.

The rule for choosing a side:
- Identifiers the runbook tells an operator to type (a port, a unit's name or path, a script, an error code, an env
  name) must be what the checkout has: the runbook itself calls the unit files the source of truth. Where the
  checkout has the thing under another name, the runbook's text is what is wrong, and a line of the patch says so.
  Whether the renamed thing really does what the runbook says is for the rerun to prove (a port is not verified when
  the routes the runbook names do not answer there).
- The Safety Defaults are the operators' policy for every unit. Where a unit lacks one, the unit is what is wrong:
  a drop-in carrying exactly the runbook's values changes the packaged unit without editing it.
- Everything else is not proposed, with the reason: a defect in the code (reported with its evidence, never
  patched), a checkout not completely installed here, an item blocked by another, a name with nothing like it in the
  checkout.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.drift import DIRECTIVE_SECTIONS, SourceIndex
from harness.outcomes import BLOCKED, DRIFT, ERROR, FAIL
from harness.remedy.model import RUNBOOK, SYSTEM, Dropin, DropinSetting, LineEdit, Proposal, Remedy, Unproposed
from harness.target import Target
from quantlab_chaos import items
from quantlab_chaos.runbook import HttpRequest, Runbook

Row = Mapping[str, Any]
RENAMED_KINDS = ("unit-file", "unit", "script", "code", "env")
CLOSE_ENOUGH = 0.8  # difflib ratio for "the checkout has it under this name" (CORE_LIVE_WS_DISABLED ~ LIVE_WS_DISABLED)
CLEARLY_CLOSER = 0.05  # how much closer the best name must be than the next one
MAX_EVIDENCE = 6
IDENTIFIER = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")
NOT_SOURCE = {"node_modules", ".git", "dist", "coverage"}

WHY_SAFETY = ("The Safety Defaults are the operators' policy for every service unit, so the unit is what is wrong, "
              "not the runbook; a drop-in sets exactly the runbook's values on the packaged unit without editing it "
              "(install it in /etc/systemd/system/<unit>.d/, then systemctl daemon-reload).")
WHY_PORT = ("The runbook calls the unit files the source of truth and the unit sets the observer's port, so the "
            "runbook's port is what is wrong, provided the routes the runbook names answer on the unit's port: the "
            "rerun proves that.")
WHY_RENAME = ("The runbook names what an operator types; the checkout has it under another name, so the runbook's "
              "text is what is wrong (the rerun proves the renamed thing does what the runbook says).")


def propose(runbook: Runbook, target: Target, drift: Sequence[Row], rows: Sequence[Row] | None,
            source: str) -> Remedy:
    """Every proposal the mismatches allow, and every fail, drift or blocked item (or static mismatch) that gets
    none, with the reason. `rows` are a run's item rows (summary.json `items`); None: the static check alone."""
    lines = runbook.path.read_text(encoding="utf-8").splitlines()
    checkout = _Checkout(target)
    proposals = [*_dropins(drift, target, rows or ()), *_ports(drift, runbook, lines, rows or ()),
                 *_renames(drift, runbook, lines, checkout)]
    _add_dependents(proposals, rows or ())
    answered = {id(entry) for proposal in proposals for entry in proposal.answers}
    unproposed = [*_unproposed_rows(rows or (), proposals), *_unproposed_drift(drift, answered)]
    return Remedy(target=str(target.root), runbook=str(runbook.path), source=source, proposals=proposals,
                  unproposed=unproposed)


# -- the system's side: drop-ins ------------------------------------------------------------------------------------


def _dropins(drift: Sequence[Row], target: Target, rows: Sequence[Row]) -> Iterable[Proposal]:
    by_unit: dict[str, list[Row]] = {}
    for entry in drift:
        if entry.get("kind") == "safety-default" and entry.get("subject") in target.units:
            by_unit.setdefault(str(entry["subject"]), []).append(entry)
    for unit, entries in by_unit.items():
        settings = tuple(DropinSetting(
            section=DIRECTIVE_SECTIONS.get(_key(entry), "Service"), key=_key(entry), value=str(entry["want"]),
            runbook_line=entry.get("line"), current=str(entry.get("have") or ""), current_where=str(entry.get("where") or ""))
            for entry in entries)
        path = str(target.units[unit].relative_to(target.root))
        dropin = Dropin(unit=unit, unit_path=path, settings=settings)
        deviations = [d for d in _deviations(rows, items.SAFETY_DEFAULTS) if _names(d, unit)]
        yield Proposal(
            id=f"dropin:{unit}", change=SYSTEM, item=items.SAFETY_DEFAULTS, items=(items.SAFETY_DEFAULTS,),
            lines=tuple(sorted({int(e["line"]) for e in entries if e.get("line")})),
            title=f"{unit}: a drop-in {dropin.relative} setting " + ", ".join(f"{s.key}={s.value}" for s in settings),
            says="every service unit carries " + ", ".join(f"{s.key}={s.value}" for s in settings),
            system="; ".join(str(e["system"]) for e in entries), why=WHY_SAFETY,
            evidence=[_setting_evidence(s) for s in settings] + [_deviation_text(d) for d in deviations][:MAX_EVIDENCE],
            dropin=dropin, subject=unit, answers=list(entries))


def _key(entry: Row) -> str:
    return str(entry["runbook"]).partition("=")[0]


def _setting_evidence(setting: DropinSetting) -> str:
    has = f"{setting.key}={setting.current}" if setting.current else f"no {setting.key}="
    return f"{setting.current_where}: {has} (the runbook, line {setting.runbook_line}: {setting.key}={setting.value})"


# -- the runbook's side: a port, and names the checkout has under another name -----------------------------------


def _requests(runbook: Runbook) -> list[tuple[HttpRequest, str]]:
    """Every request the runbook writes, with the item it belongs to."""
    found = [(request, items.HEALTH_CHECKS) for request in runbook.health_checks]
    found += [(runbook.kill_switch, items.KILL_SWITCH)] if runbook.kill_switch else []
    found += [(request, items.break_glass_item(step.id)) for step in runbook.break_glass for request in step.requests]
    return found


def _ports(drift: Sequence[Row], runbook: Runbook, lines: list[str], rows: Sequence[Row]) -> Iterable[Proposal]:
    for entry in drift:
        if entry.get("kind") != "port" or not entry.get("have"):
            continue
        old, new = str(entry["want"]), str(entry["have"])
        edits, owners = [], []
        for request, item in _requests(runbook):
            if str(request.port) != old:
                continue
            renamed = request.url.replace(f"{request.host}:{old}", f"{request.host}:{new}", 1)
            line = request.source.line
            if renamed != request.url and request.url in lines[line - 1]:
                edits.append(LineEdit(line, request.url, renamed))
                owners.append(item)
        if not edits:
            continue
        edits += _port_mentions(runbook, lines, old, new, {edit.line for edit in edits})
        touched = {edit.line for edit in edits}
        deviations = [d for row in rows for d in row.get("deviations", []) if d.get("line") in touched]
        yield Proposal(
            id=f"runbook:port:{old}->{new}", change=RUNBOOK, item=owners[0], items=tuple(dict.fromkeys(owners)),
            lines=tuple(sorted(touched)), title=f"say port {new} where the runbook says {old} (lines "
                                                f"{', '.join(map(str, sorted(touched)))})",
            says=str(entry["runbook"]), system=str(entry["system"]), why=WHY_PORT,
            evidence=[f"{entry.get('where')}: OBSERVER_PORT={new}", *(_deviation_text(d) for d in deviations)][:MAX_EVIDENCE],
            edits=edits, subject=old, answers=[entry])


def _port_mentions(runbook: Runbook, lines: list[str], old: str, new: str, urls: set[int]) -> list[LineEdit]:
    """The port said in words ("answers on 9150") on the other lines of the sections that hold the requests: once in
    the line, as a number of its own (not part of another number or a version)."""
    starts = sorted(source.line for _, _, source in runbook.sections) + [len(lines) + 1]
    spans = [(start, end) for start, end in zip(starts, starts[1:], strict=False) if any(start <= u < end for u in urls)]
    alone = re.compile(rf"(?<![\d.:]){re.escape(old)}(?![\d.])")
    return [LineEdit(number, old, new) for start, end in spans for number in range(start, end)
            if number not in urls and len(alone.findall(lines[number - 1])) == 1 and lines[number - 1].count(old) == 1]


class _Checkout:
    """What the checkout holds under other names: its unit files, files by name, identifiers and env names read."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._source: SourceIndex | None = None

    @property
    def source(self) -> SourceIndex:
        if self._source is None:
            self._source = SourceIndex(self.target.root)
        return self._source

    def candidates(self, kind: str, name: str) -> list[str]:
        if kind == "unit":
            return list(self.target.units)
        if kind == "script":
            return [str(p.relative_to(self.target.root)) for p in self.target.root.rglob(Path(name).name)
                    if p.is_file() and not NOT_SOURCE & set(p.relative_to(self.target.root).parts)]
        # Codes and env names alike: the checkout's upper-case identifiers (the drift check, too, counts a mention
        # as a read: code reads env through helpers as often as through process.env).
        return sorted({found for text in self.source.files.values() for found in IDENTIFIER.findall(text)})

    def first_use(self, text: str) -> str:
        """`file line N` of the first source line that has `text`."""
        for name, content in self.source.files.items():
            for number, line in enumerate(content.splitlines(), start=1):
                if text in line:
                    return f"{name} line {number}"
        return "?"


def _renames(drift: Sequence[Row], runbook: Runbook, lines: list[str], checkout: _Checkout) -> Iterable[Proposal]:
    for entry in drift:
        kind, old, line = entry.get("kind"), str(entry.get("want") or ""), entry.get("line")
        if kind not in RENAMED_KINDS or not old or not line or old.endswith("*") or old not in lines[int(line) - 1]:
            continue
        new, evidence = _renamed(kind, old, str(entry.get("have") or ""), checkout)
        if not new:
            continue
        item = str(entry["item"])
        yield Proposal(
            id=f"runbook:{kind}:{old}->{new}", change=RUNBOOK, item=item, items=(item,), lines=(int(line),),
            title=f"say {new} where the runbook says {old} (line {line})", says=str(entry["runbook"]),
            system=str(entry["system"]), why=WHY_RENAME, evidence=[evidence], edits=[LineEdit(int(line), old, new)],
            subject=old, answers=[entry])


def _renamed(kind: str, old: str, have: str, checkout: _Checkout) -> tuple[str, str]:
    """(the name the checkout has, the evidence) or ("", "") when nothing in it is close enough."""
    if kind == "unit-file":
        return (have, f"{have}: the unit file is there") if have else ("", "")
    if kind == "script":
        found = checkout.candidates(kind, old)
        return (found[0], f"{found[0]}: the only file named {Path(old).name} in the checkout") if len(found) == 1 else ("", "")
    close = _closest(old, [c for c in checkout.candidates(kind, old) if c != old])
    if not close:
        return "", ""
    if kind == "unit":
        return close[0], f"{checkout.target.units[close[0]].relative_to(checkout.target.root)}: the unit file is there"
    what = "reads" if kind == "env" else "has"
    return close[0], f"{checkout.first_use(close[0])} {what} {close[0]}"


def _closest(name: str, candidates: Sequence[str]) -> list[str]:
    """The one candidate close enough to `name` and clearly closer than any other (CORE_LIVE_WS_DISABLD:
    CORE_LIVE_WS_DISABLED, not CORE_LIVE_WS_ENABLED); none when two are about as plausible: not the harness's pick."""
    scored = sorted(((difflib.SequenceMatcher(None, name, c).ratio(), c) for c in candidates), reverse=True)
    if not scored or scored[0][0] < CLOSE_ENOUGH:
        return []
    if len(scored) > 1 and scored[0][0] - scored[1][0] < CLEARLY_CLOSER:
        return []
    return [scored[0][1]]


# -- what gets no proposal --------------------------------------------------------------------------------------------


def _add_dependents(proposals: list[Proposal], rows: Sequence[Row]) -> None:
    """An item blocked by an item a proposal answers is rerun with it: the proposal may unblock it."""
    for proposal in proposals:
        proposal.unblocks = tuple(str(row["id"]) for row in rows if row.get("outcome") == BLOCKED
                                  and row.get("blocked_by") in proposal.items and row["id"] not in proposal.items)


def _unproposed_rows(rows: Sequence[Row], proposals: Sequence[Proposal]) -> Iterable[Unproposed]:
    """Every fail, drift or blocked item that is no proposal's own first item, with the reason (an item a proposal
    only touches, such as a line of a blocked item, still says why it is blocked)."""
    answered = {proposal.item for proposal in proposals}
    for row in rows:
        outcome = row.get("outcome")
        if outcome not in (FAIL, DRIFT, BLOCKED, ERROR) or row["id"] in answered:
            continue
        evidence = [str(row.get("message") or "")] + [_deviation_text(d) for d in row.get("deviations", [])]
        yield Unproposed(item=str(row["id"]), outcome=str(outcome), line=row.get("line"), why=_why_none(row, proposals),
                         evidence=[e for e in evidence if e][:MAX_EVIDENCE])


def _why_none(row: Row, proposals: Sequence[Proposal]) -> str:
    outcome, blocker = row.get("outcome"), row.get("blocked_by")
    if outcome == BLOCKED and blocker:
        touching = [p.id for p in proposals if row["id"] in p.items]
        unblocking = [p.id for p in proposals if row["id"] in p.unblocks]
        return (f"Blocked by {blocker}: its steady state needs {blocker} to pass first, so nothing here can be judged "
                f"until it does" + (f"; the rerun of {', '.join(unblocking)} shows whether that unblocks it"
                                    if unblocking else f"; see {blocker}")
                + (f" ({', '.join(touching)} also changes its lines)" if touching else "") + ".")
    if outcome == BLOCKED:
        return ("Blocked before any fault by the checkout as installed here (an install or build step the host lacks), "
                "not by the runbook or the units: install it and run again.")
    if outcome == FAIL:
        return ("The system does not do what the runbook says, and no unit setting or runbook wording explains it: a "
                "defect in the code, reported with its evidence and never patched; the runbook stays as it is.")
    if outcome == DRIFT:
        return ("The runbook names something the checkout does not have, and nothing in the checkout is close enough to "
                "say what the text should name instead: the operators must decide whether the checkout gains it or "
                "the runbook loses it.")
    return "The harness itself failed on this item: nothing can be proposed until it runs; fix the harness and run again."


DRIFT_WHY = {
    "no-scenario": "No scenario proves this item: that is the harness's to add, not the runbook's or the system's.",
    "no-runbook-item": "A scenario proves an item this runbook lacks: that is for the harness (or the runbook's "
                       "authors) to settle.",
    "env-limit": "The code reads the limit but its default is not the runbook's; a default in the code is the "
                 "system's to change (or the runbook's to restate), and the harness does not patch code.",
    "route": "No source file serves this route: the route is the observer's to serve (a defect) or the runbook's to "
             "drop; nothing in the checkout says which.",
    "path": "No source file uses this path, and nothing in the checkout is close enough to say what it should be.",
}


def _unproposed_drift(drift: Sequence[Row], answered: set[int]) -> Iterable[Unproposed]:
    for entry in drift:
        if id(entry) in answered:
            continue
        why = DRIFT_WHY.get(str(entry.get("kind")), "Nothing in the checkout is close enough to say what the runbook "
                                                        "should name instead: the operators must decide.")
        yield Unproposed(item=str(entry.get("item")), outcome=DRIFT, line=entry.get("line"), why=why,
                         evidence=[f"[{entry.get('kind')}] the runbook says {entry.get('runbook')!r}; the system: "
                                   f"{entry.get('system')}"])


def _deviations(rows: Sequence[Row], item: str) -> list[Row]:
    return [d for row in rows if row.get("id") == item for d in row.get("deviations", [])]


def _names(deviation: Row, subject: str) -> bool:
    return subject in str(deviation.get("says", "")) or subject in str(deviation.get("seen", ""))


def _deviation_text(deviation: Row) -> str:
    return f"runbook line {deviation.get('line') or '-'}: {deviation.get('says')}; seen: {deviation.get('seen')}"
