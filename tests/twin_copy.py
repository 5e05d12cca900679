"""Copies of the twin with one behaviour changed, for proving that a check can fail."""
from __future__ import annotations

from pathlib import Path

from harness.remedy.verify import checkout_copy
from harness.target import TWIN_ROOT


def twin_copy(dest: Path, edits: dict[str, tuple[str, str]] | None = None) -> Path:
    """A copy of the twin at dest (node_modules linked, not copied) with each `path: (old, new)` replacement made."""
    checkout_copy(TWIN_ROOT, dest)
    for relative, (old, new) in (edits or {}).items():
        path = dest / relative
        text = path.read_text()
        assert old in text, f"{relative} no longer contains {old!r}; update the test's edit"
        path.write_text(text.replace(old, new, 1))
    return dest
