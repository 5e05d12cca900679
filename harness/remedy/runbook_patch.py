"""The runbook proposals as a unified diff that `patch` applies to a copy of the runbook, each proposal in a section
of its own, headed by comment lines with its evidence (patch skips text between sections).

Each section is the diff from the runbook with the proposals before it applied to the runbook with this one applied
too, so the sections apply in order with no offset and no fuzz. A proposal's edits replace text within a line, so the
runbook keeps its line numbers.
"""
from __future__ import annotations

import difflib
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from harness.remedy.model import LineEdit, Proposal
from quantlab_chaos.errors import HarnessError

PATCH_TIMEOUT_S = 30.0
CONTEXT_LINES = 1


def edited(lines: Sequence[str], edits: Sequence[LineEdit]) -> list[str]:
    """`lines` (with their line ends) with each edit made once in its line."""
    out = list(lines)
    for edit in edits:
        text = out[edit.line - 1]
        if edit.old not in text:
            raise HarnessError(f"runbook line {edit.line} no longer holds {edit.old!r}: the remedy was drawn from another "
                               "version of the runbook; run `quantlab-chaos remedy` again.")
        out[edit.line - 1] = text.replace(edit.old, edit.new, 1)
    return out


def unified_diff(runbook_text: str, label: str, proposals: Sequence[Proposal]) -> str:
    """The patch for `proposals` (the runbook-side ones, in the order given); "" when there are none."""
    state = runbook_text.splitlines(keepends=True)
    sections: list[str] = []
    for proposal in proposals:
        if not proposal.edits:
            continue
        after = edited(state, proposal.edits)
        comments = [f"# {proposal.id}: {proposal.title}", f"#   why: {proposal.why}",
                    *(f"#   evidence: {line}" for line in proposal.evidence)]
        hunks = difflib.unified_diff(state, after, f"a/{label}", f"b/{label}", n=CONTEXT_LINES)
        sections.append("\n".join(_one_line(c) for c in comments) + "\n" + "".join(_ended(hunks)))
        state = after
    return "".join(sections)


def apply_edits(runbook_text: str, proposals: Sequence[Proposal]) -> str:
    """What the runbook reads like with every proposal's edits made (the patch's result, without `patch`)."""
    lines = runbook_text.splitlines(keepends=True)
    for proposal in proposals:
        lines = edited(lines, proposal.edits)
    return "".join(lines)


def apply_patch(patch_file: Path, runbook_copy: Path) -> str:
    """Applies the patch to `runbook_copy` with GNU patch and returns how ("patch" or why it was done without it);
    HarnessError when patch refuses it."""
    binary = shutil.which("patch")
    if binary is None:
        raise FileNotFoundError("patch")
    done = subprocess.run([binary, "--batch", "--forward", "--no-backup-if-mismatch", "-r", "-", str(runbook_copy),
                           str(patch_file)], capture_output=True, text=True, timeout=PATCH_TIMEOUT_S)
    if done.returncode != 0:
        raise HarnessError(f"patch did not apply {patch_file} to {runbook_copy} (exit {done.returncode}): "
                           f"{(done.stdout + done.stderr).strip()[-400:]}")
    return f"applied with {binary}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _ended(lines: Iterable[str]) -> list[str]:
    """Diff lines each ending in a newline (the runbook's last line may have none: patch's marker says so)."""
    out = []
    for line in lines:
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return out
