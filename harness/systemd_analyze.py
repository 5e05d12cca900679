"""systemd's own judgement of the target's units: `systemd-analyze verify` (would systemd load it?) and
`systemd-analyze security --offline=yes` (how exposed would the service be?), run on copies whose deploy root points
at the checkout. Used by the safety-defaults item and by `quantlab-chaos runbook check`.

Both are systemd's words, reported as they are: a complaint is its message, the exposure its 0-10 score and rating.
A complaint about a binary this host lacks at the unit's absolute path (/usr/bin/node) is about the host, not the
unit: the supervisor looks such binaries up on PATH.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.sysd.deploy import DEPLOY_ROOT, RESOLVABLE_BINARIES
from harness.sysd.unitfile import dropin_files
from harness.target import Target

TIMEOUT_S = 60.0
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "LANG": "C.UTF-8"}
_OVERALL = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\S+)")


def tool() -> str | None:
    """The systemd-analyze binary, or None where systemd is not installed."""
    return shutil.which("systemd-analyze")


@dataclass
class UnitAnalysis:
    """What systemd-analyze says about one unit."""

    unit: str
    complaints: list[str] = field(default_factory=list)  # verify's messages about the unit itself
    host_complaints: list[str] = field(default_factory=list)  # ... about a binary this host lacks
    exposure: float | None = None  # security's overall exposure, 0 (safe) to 10 (unsafe); None for timers
    rating: str = ""  # systemd's word for it: OK, MEDIUM, EXPOSED, UNSAFE
    exposed_by: list[str] = field(default_factory=list)  # the settings that cost the most exposure

    @property
    def verifies(self) -> bool:
        return not self.complaints

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def copies_with_checkout_root(target: Target, folder: Path) -> dict[str, Path]:
    """Every unit of the checkout copied into one folder (so a timer finds its service), with the drop-ins it reads
    in `<unit>.d/` beside it (systemd-analyze reads them there), deploy root rewritten."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = {}
    for name, path in target.units.items():
        copy = folder / name
        copy.write_text(path.read_text().replace(DEPLOY_ROOT, str(target.root)))
        for index, dropin in enumerate(dropin_files(path)):
            # One folder and one order for every level of drop-in: the index keeps systemd's order of application.
            (folder / f"{name}.d").mkdir(exist_ok=True)
            (folder / f"{name}.d" / f"{index:02d}-{dropin.name}").write_text(
                dropin.read_text().replace(DEPLOY_ROOT, str(target.root)))
        copies[name] = copy
    return copies


def verify(binary: str, unit: Path) -> list[str]:
    """systemd-analyze verify's complaints about one unit (it warns on stderr, often with exit status 0)."""
    for extra in (["--man=no"], []):
        try:
            done = subprocess.run([binary, "verify", *extra, str(unit)], capture_output=True, text=True,
                                  timeout=TIMEOUT_S, env=_ENV, cwd=unit.parent)
        except subprocess.TimeoutExpired:
            return [f"systemd-analyze verify did not finish within {TIMEOUT_S:.0f} s"]
        output = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        if extra and any("--man" in line and ("unrecognized" in line or "unknown" in line) for line in output):
            continue  # an old systemd without --man=: verify without it
        if done.returncode != 0 and not output:
            output = [f"systemd-analyze verify exited {done.returncode}"]
        return output
    return []


def about_this_host(complaint: str) -> bool:
    """A complaint about a binary this host lacks at the unit's absolute path (the supervisor looks it up on PATH)."""
    return "is not executable" in complaint and any(binary in complaint for binary in RESOLVABLE_BINARIES)


def security(binary: str, unit: Path, worst: int = 3) -> tuple[float | None, str, list[str]]:
    """(exposure, rating, the `worst` settings that cost the most) from `systemd-analyze security --offline=yes`;
    (None, why, []) when it gives no score (an old systemd without --offline, or a unit that is no service)."""
    try:
        done = subprocess.run([binary, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True,
                              text=True, timeout=TIMEOUT_S, env=_ENV, cwd=unit.parent)
    except subprocess.TimeoutExpired:
        return None, f"systemd-analyze security did not finish within {TIMEOUT_S:.0f} s", []
    match = _OVERALL.search(done.stdout)
    if match is None:
        return None, (done.stderr.strip().splitlines() or [f"no exposure (exit {done.returncode})"])[-1], []
    costs: list[tuple[float, str]] = []
    for line in done.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == "✗":
            try:
                costs.append((float(parts[-1]), parts[1]))
            except (ValueError, IndexError):
                continue
    costs.sort(key=lambda cost: -cost[0])
    return float(match.group(1)), match.group(2), [f"{name} ({cost:g})" for cost, name in costs[:worst]]


def analyse(target: Target, folder: Path, binary: str, names: list[str] | None = None) -> list[UnitAnalysis]:
    """verify and (for services) security on each unit in `names` (default: every unit of the checkout)."""
    copies = copies_with_checkout_root(target, folder)
    found = []
    for name in names if names is not None else sorted(copies):
        copy = copies.get(name)
        if copy is None:
            found.append(UnitAnalysis(name, [f"{name}: no such unit file in the checkout"]))
            continue
        complaints = verify(binary, copy)
        analysis = UnitAnalysis(name, [c for c in complaints if not about_this_host(c)],
                                [c for c in complaints if about_this_host(c)])
        if name.endswith(".service"):
            analysis.exposure, analysis.rating, analysis.exposed_by = security(binary, copy)
        found.append(analysis)
    return found
