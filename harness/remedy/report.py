"""reports/remedy/: runbook.patch, systemd/<unit>.d/10-runbook-safety.conf, REMEDY.md and remedy.json.

The folder is written whole each time (what an earlier remedy left is removed first), so its files always belong to
one remedy.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.remedy import dropins
from harness.remedy.model import NOT_RUN, RUNBOOK, SYSTEM, Proposal, Remedy
from harness.remedy.runbook_patch import unified_diff

REMEDY_DIR = "remedy"
REMEDY_MD, REMEDY_JSON, PATCH_FILE, SYSTEMD_DIR = "REMEDY.md", "remedy.json", "runbook.patch", "systemd"
VERIFY_DIR = "verify"


def runbook_label(remedy: Remedy) -> str:
    """The runbook's name in the patch: its path in the checkout (docs/runbook.md), else its file name."""
    runbook, root = Path(remedy.runbook), Path(remedy.target)
    return str(runbook.relative_to(root)) if runbook.is_relative_to(root) else runbook.name


def write(out_dir: Path, remedy: Remedy, rows: Sequence[Mapping[str, Any]] | None = None, *,
          keep_verify: bool = False) -> Path:
    """Writes the remedy folder `out_dir` (reports/remedy) and returns it; an earlier verification's `verify/` is
    removed unless `keep_verify` (the remedy being written is the one it verified)."""
    shutil.rmtree(out_dir / SYSTEMD_DIR, ignore_errors=True)
    if not keep_verify:
        shutil.rmtree(out_dir / VERIFY_DIR, ignore_errors=True)
    for name in (REMEDY_MD, REMEDY_JSON, PATCH_FILE):
        (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = runbook_label(remedy)
    patch = unified_diff(Path(remedy.runbook).read_text(encoding="utf-8"), label, remedy.by_change(RUNBOOK))
    if patch:
        (out_dir / PATCH_FILE).write_text(patch)
    for proposal in remedy.by_change(SYSTEM):
        assert proposal.dropin is not None
        path = out_dir / SYSTEMD_DIR / proposal.dropin.relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dropins.render(proposal.dropin, label))
    (out_dir / REMEDY_JSON).write_text(json.dumps(remedy.to_dict(), indent=2) + "\n")
    (out_dir / REMEDY_MD).write_text(markdown(remedy, rows, label))
    return out_dir


def table(block: Mapping[str, Any], rows: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """The one table, from a remedy as summary.json holds it (`Remedy.to_dict()`): a row per proposal and per item
    (or static mismatch) with nothing proposed."""
    outcomes = {str(row["id"]): str(row.get("outcome")) for row in rows or []}
    lines = ["| item | outcome | proposes | change | verification | why |", "| --- | --- | --- | --- | --- | --- |"]
    for p in block.get("proposals", []):
        verification = p["verification"]
        change = "runbook text" if p["change"] == RUNBOOK else f"drop-in {p['dropin']['path']}" if p.get("dropin") else "system"
        lines.append(_row(p["item"], outcomes.get(p["item"], "drift"), f"`{p['id']}`", change, verification["status"],
                          verification["why"] if verification["status"] != NOT_RUN else p["why"]))
    for u in block.get("unproposed", []):
        lines.append(_row(u["item"], u["outcome"], "nothing", "none", "not applicable", u["why"]))
    return lines


def markdown(remedy: Remedy, rows: Sequence[Mapping[str, Any]] | None, label: str) -> str:
    runbook_changes, system_changes = remedy.by_change(RUNBOOK), remedy.by_change(SYSTEM)
    out = [f"# Remedy: {label} against {remedy.target}", "",
           f"Drawn from {remedy.source}. {len(remedy.proposals)} proposal(s): {len(runbook_changes)} change(s) to the "
           f"runbook's text (`{PATCH_FILE}`), {len(system_changes)} unit drop-in(s) (`{SYSTEMD_DIR}/`); "
           f"{len(remedy.unproposed)} item(s) or mismatch(es) with nothing to propose.", "",
           ("Verified by a rerun of the affected items on copies of the checkout and the runbook with the proposals "
            f"applied (reports: `{remedy.verified_with}`)." if remedy.verified_with else
            "Not verified yet: `quantlab-chaos remedy --verify` applies the proposals to copies and reruns the "
            "affected items."), "", *table(remedy.to_dict(), rows), ""]
    if remedy.proposals:
        out += ["## Proposals", ""]
        for proposal in remedy.proposals:
            out += _proposal(proposal)
    if remedy.unproposed:
        out += ["## Nothing proposed", ""]
        for entry in remedy.unproposed:
            where = f", runbook line {entry.line}" if entry.line else ""
            out += [f"### {entry.item} ({entry.outcome}{where})", "", entry.why, ""]
            out += [f"- {_cell_text(e)}" for e in entry.evidence] + [""]
    out += ["## Applying them", "",
            f"- The runbook: `patch {label} < {PATCH_FILE}` in the checkout (or `patch COPY.md {PATCH_FILE}` on a copy)."
            if runbook_changes else "- The runbook: nothing to change.",
            f"- The units: `sudo cp -r {SYSTEMD_DIR}/* /etc/systemd/system/ && sudo systemctl daemon-reload`, then "
            "restart each unit." if system_changes else "- The units: nothing to change.", ""]
    return "\n".join(out)


def _proposal(p: Proposal) -> list[str]:
    change = (f"the runbook's text, lines {', '.join(map(str, p.lines))} (`{PATCH_FILE}`)" if p.change == RUNBOOK
              else f"the system: `{SYSTEMD_DIR}/{p.dropin.relative}`" if p.dropin else "the system")
    lines = [f"### `{p.id}`", "", p.title, "", f"- change: {change}", f"- the runbook says: {p.says}",
             f"- the system: {p.system}", f"- why this side: {p.why}",
             f"- verification: **{p.verification.status}**: {p.verification.why}"]
    if p.unblocks:
        lines.append(f"- rerun with it, as it may unblock them: {', '.join(p.unblocks)}")
    lines += ["- evidence:"] + [f"  - {_cell_text(e)}" for e in p.evidence]
    if p.edits:
        lines += ["- edits:"] + [f"  - line {e.line}: `{e.old}` becomes `{e.new}`" for e in p.edits]
    return [*lines, ""]


def _row(*cells: str) -> str:
    return "| " + " | ".join(_cell_text(cell).replace("|", "\\|") for cell in cells) + " |"


def _cell_text(text: str) -> str:
    return " ".join(str(text).split())
