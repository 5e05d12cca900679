"""A unit drop-in as systemd reads it (systemd.unit(5)): `[Section]` blocks of the directives it overrides, each
commented with what the unit had and the runbook line it comes from."""
from __future__ import annotations

from pathlib import Path

from harness.remedy.model import Dropin

SECTION_ORDER = ("Unit", "Service", "Install")


def render(dropin: Dropin, runbook: str) -> str:
    lines = [f"# {dropin.relative}: the Safety Defaults of {runbook} for {dropin.unit} ({dropin.unit_path}).",
             "# Written by `quantlab-chaos remedy`; it sets exactly the runbook's values and nothing else.",
             f"# Install: copy it to /etc/systemd/system/{dropin.unit}.d/, then `systemctl daemon-reload` and restart "
             f"{dropin.unit}."]
    sections = sorted({s.section for s in dropin.settings}, key=lambda s: (SECTION_ORDER + (s,)).index(s))
    for section in sections:
        lines += ["", f"[{section}]"]
        for setting in (s for s in dropin.settings if s.section == section):
            had = f"has {setting.key}={setting.current}" if setting.current else f"lacks {setting.key}="
            lines += [f"# runbook line {setting.runbook_line}; the unit {had} ({setting.current_where})",
                      f"{setting.key}={setting.value}"]
    return "\n".join(lines) + "\n"


def install(dropin: Dropin, text: str, checkout: Path) -> Path:
    """Writes the drop-in beside its unit in `checkout` (a copy: never the operator's checkout) and returns it."""
    path = checkout / dropin.unit_path
    target = path.parent / f"{dropin.unit}.d" / dropin.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target
