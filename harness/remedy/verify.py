"""Proof by rerun: the proposals applied to copies (the drop-ins beside the units of a copy of the checkout, the
patch to a copy of the runbook), the items they concern run again, and each proposal judged by what the rerun saw.

- verified: the mismatches it answers are gone from the rerun (static drift and the scenarios' deviations), and the
  scenarios that judge them ran;
- not verified: some remain, or the rerun showed something else wrong on its lines (the first is quoted);
- not applicable: nothing in the rerun could judge it (its items were blocked by another item, or skipped).

The checkout and the runbook are never written to: the copy shares only the checkout's installed packages
(node_modules, linked).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.outcomes import BLOCKED, DRIFT, ERROR, FAIL, PASS, one_sentence
from harness.remedy import dropins
from harness.remedy.model import (
    NOT_APPLICABLE,
    NOT_VERIFIED,
    RUNBOOK,
    SYSTEM,
    VERIFIED,
    Proposal,
    Remedy,
    Verification,
)
from harness.remedy.report import VERIFY_DIR
from harness.remedy.runbook_patch import apply_edits, apply_patch
from harness.target import Target

Row = Mapping[str, Any]
LINKED = {"node_modules"}  # installed packages: linked into the copy, never copied
SKIPPED = {".git"}
JUDGED = (PASS, FAIL, DRIFT)


def checkout_copy(root: Path, dest: Path) -> Path:
    """A copy of the checkout at `dest` whose node_modules folders are links to the checkout's (Node resolves
    packages through the link to their real place, as in the checkout)."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {name for name in names if name in LINKED | SKIPPED}

    shutil.copytree(root, dest, symlinks=True, ignore=ignore)
    for folder, names, _ in os.walk(root):
        for name in [n for n in names if n in LINKED | SKIPPED]:
            names.remove(name)  # never descend into them
            if name in LINKED:
                (dest / Path(folder).relative_to(root) / name).symlink_to(Path(folder) / name)
    return dest


def prepare(remedy: Remedy, target: Target, out_dir: Path, scratch: Path) -> tuple[Path, Path, str]:
    """The copies the rerun uses: (checkout copy with the drop-ins, patched runbook copy, how the patch went on)."""
    checkout = checkout_copy(target.root, scratch / "checkout")
    for proposal in remedy.by_change(SYSTEM):
        assert proposal.dropin is not None
        dropins.install(proposal.dropin, (out_dir / "systemd" / proposal.dropin.relative).read_text(), checkout)
    runbook_copy = out_dir / VERIFY_DIR / "runbook.md"
    runbook_copy.parent.mkdir(parents=True, exist_ok=True)
    original = Path(remedy.runbook).read_text(encoding="utf-8")
    runbook_copy.write_text(original, encoding="utf-8")
    how = "no runbook proposal"
    if remedy.by_change(RUNBOOK):
        try:
            how = apply_patch(out_dir / "runbook.patch", runbook_copy)
        except FileNotFoundError:  # no GNU patch here: the same edits, made directly
            runbook_copy.write_text(apply_edits(original, remedy.by_change(RUNBOOK)), encoding="utf-8")
            how = "patch is not installed: the same edits made by the harness"
    return checkout, runbook_copy, how


def judge(remedy: Remedy, before: Sequence[Row] | None, after: Mapping[str, Any]) -> None:
    """Sets each proposal's verification from the rerun's summary (`after`); `before` is the run the remedy was
    drawn from (None: the static check alone)."""
    rows = {str(row["id"]): row for row in after.get("items", [])}
    earlier = {str(row["id"]): row for row in before or []}
    for proposal in remedy.proposals:
        proposal.verification = _judge(proposal, rows, earlier, after.get("drift", []))


def not_run(remedy: Remedy, why: str) -> None:
    """Every proposal not verified, for one reason (the rerun failed)."""
    for proposal in remedy.proposals:
        proposal.verification = Verification(NOT_VERIFIED, why)


def _judge(proposal: Proposal, rows: Mapping[str, Row], earlier: Mapping[str, Row],
           drift: Sequence[Row]) -> Verification:
    own = [rows[item] for item in proposal.items if item in rows]
    errors = [row for row in own if row.get("outcome") == ERROR]
    if errors:
        return Verification(NOT_VERIFIED, f"the harness itself failed on {errors[0]['id']} in the rerun: "
                                          f"{one_sentence(str(errors[0].get('message')), 300)}")
    left = [f"[{d.get('kind')}] the runbook says {d.get('runbook')!r}; the system: {d.get('system')}"
            for d in drift if _answers(proposal, d)]
    left += [f"runbook line {d.get('line')}: {d.get('says')}; seen: {d.get('seen')}"
             for row in own for d in row.get("deviations", []) if _concerns(proposal, d)]
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        meaning = ("changing the text is not enough, the system does not do there what the runbook says, so the "
                   "system is what must change: " if proposal.change == RUNBOOK else "")
        return Verification(NOT_VERIFIED, one_sentence(f"{meaning}still wrong after the change: {left[0]}{more}", 500),
                            left)
    judged, unjudged = [], []
    for row in own:
        tests = [t for t in row.get("tests", []) if t.get("outcome") in JUDGED]
        needed = {t["nodeid"] for t in (earlier.get(str(row["id"])) or {}).get("tests", []) if t.get("outcome") in JUDGED}
        missing = needed - {t["nodeid"] for t in tests}
        if tests and not missing:
            judged.append(row)
        else:
            unjudged.append(row)
    if not judged:
        first = unjudged[0] if unjudged else None
        reason = (f"{first['id']} is {first.get('outcome')}: {one_sentence(str(first.get('message')), 300)}" if first
                  else "the rerun has none of its items")
        return Verification(NOT_APPLICABLE, f"the rerun could not judge it: {reason}")
    return Verification(VERIFIED, _verified_why(proposal, judged, unjudged, rows, earlier))


def _verified_why(proposal: Proposal, judged: list[Row], unjudged: list[Row], rows: Mapping[str, Row],
                  earlier: Mapping[str, Row]) -> str:
    parts = []
    passing = [str(row["id"]) for row in judged if row.get("outcome") == PASS]
    if passing:
        parts.append(f"{', '.join(passing)} now pass{'es' if len(passing) == 1 else ''}")
    for row in judged:
        if row.get("outcome") != PASS:
            failed_before = {t["nodeid"] for t in (earlier.get(str(row["id"])) or {}).get("tests", [])
                             if t.get("outcome") in (FAIL, DRIFT)}
            held = [_short(t["nodeid"]) for t in row.get("tests", []) if t.get("outcome") == PASS
                    and (not failed_before or t["nodeid"] in failed_before)]
            said = "failed before and pass with it" if failed_before else "pass with it"
            parts.append(f"in {row['id']}, {', '.join(held) or 'its checks'} {said}; {row['id']} is still "
                         f"{row.get('outcome')} for a reason it does not touch: "
                         f"{one_sentence(str(row.get('message')), 200)}")
    for row in unjudged:
        parts.append(f"{row['id']} could not judge its lines ({row.get('outcome')}: "
                     f"{one_sentence(str(row.get('message')), 160)})")
    unblocked = [item for item in proposal.unblocks if rows.get(item, {}).get("outcome") not in (None, BLOCKED)]
    if unblocked:
        parts.append(f"it unblocks {', '.join(unblocked)}")
    return "; ".join(parts)


def _short(nodeid: str) -> str:
    return str(nodeid).rsplit("::", 1)[-1]


def _answers(proposal: Proposal, drift: Row) -> bool:
    """Whether a static drift entry of the rerun is one of those the proposal answers, still there."""
    kinds = {str(entry.get("kind")) for entry in proposal.answers}
    if drift.get("kind") not in kinds:
        return False
    if proposal.change == SYSTEM:
        return drift.get("subject") == proposal.subject
    return drift.get("line") in proposal.lines


def _concerns(proposal: Proposal, deviation: Row) -> bool:
    """Whether a deviation of the rerun is about what the proposal changed: the unit it names, or its lines."""
    if proposal.change == SYSTEM:
        return proposal.subject in f"{deviation.get('says', '')} {deviation.get('seen', '')}"
    return deviation.get("line") in proposal.lines


def rerun(remedy: Remedy, target: Target, out_dir: Path, run_options: Mapping[str, Any]) -> tuple[int, dict[str, Any] | None]:
    """Applies the proposals to copies and runs their items again; (run's exit code, its summary or None)."""
    from harness.run import run

    items = list(dict.fromkeys(item for proposal in remedy.proposals for item in proposal.rerun))
    reports = out_dir / VERIFY_DIR / "reports"
    with tempfile.TemporaryDirectory(prefix="quantlab-remedy-") as scratch:
        checkout, runbook_copy, how = prepare(remedy, target, out_dir, Path(scratch))
        print(f"quantlab-chaos remedy: rerunning {', '.join(items)} on a copy of the checkout with "
              f"{len(remedy.by_change(SYSTEM))} drop-in(s) and on a copy of the runbook ({how})", flush=True)
        code = run(quantlab_root=str(checkout), runbook=str(runbook_copy), only=items, reports_dir=reports, html=False,
                   **run_options)
    summary_path = reports / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return code, summary
