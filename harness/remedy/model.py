"""What a remedy is: proposals (change the runbook's text, or change the system with a unit drop-in), the items it
could propose nothing for, and each proposal's verification by a rerun.

A proposal keeps the mismatches it answers (`answers`: static drift, deviations of the scenarios) and what names them
(`subject`: a unit's name, or the runbook's old value), so a rerun can tell whether they are gone.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

RUNBOOK = "runbook"  # the runbook's text is what is wrong: a unified diff of it
SYSTEM = "system"  # the system is what is wrong: a drop-in for a unit
CHANGES = (RUNBOOK, SYSTEM)

VERIFIED, NOT_VERIFIED, NOT_APPLICABLE, NOT_RUN = "verified", "not verified", "not applicable", "not run"
VERIFICATIONS = (VERIFIED, NOT_VERIFIED, NOT_APPLICABLE, NOT_RUN)


@dataclass(frozen=True)
class LineEdit:
    """One replacement in one runbook line: `old` (text that stands in the line) becomes `new`."""

    line: int
    old: str
    new: str


@dataclass(frozen=True)
class DropinSetting:
    """One directive a drop-in sets: the runbook's value, and what the unit has now ("" where it lacks it)."""

    section: str
    key: str
    value: str
    runbook_line: int | None
    current: str
    current_where: str


@dataclass(frozen=True)
class Dropin:
    """`<unit>.d/<name>` for one unit of the checkout (`unit_path` relative to it)."""

    unit: str
    unit_path: str
    settings: tuple[DropinSetting, ...]
    name: str = "10-runbook-safety.conf"

    @property
    def relative(self) -> str:
        """Where the drop-in goes, relative to the remedy's systemd/ folder (and, in a checkout, beside the unit)."""
        return f"{self.unit}.d/{self.name}"


@dataclass
class Verification:
    status: str  # one of VERIFICATIONS
    why: str  # one or two sentences: what the rerun showed
    evidence: list[str] = field(default_factory=list)


@dataclass
class Proposal:
    id: str
    change: str  # RUNBOOK or SYSTEM
    item: str  # the runbook item it answers first
    items: tuple[str, ...]  # the items whose lines or checks it changes
    lines: tuple[int, ...]  # the runbook lines it concerns
    title: str  # what it proposes, in one line
    says: str  # what the runbook says
    system: str  # what the system does
    why: str  # why this side and not the other
    evidence: list[str] = field(default_factory=list)
    edits: list[LineEdit] = field(default_factory=list)  # RUNBOOK: the runbook's lines as they should read
    dropin: Dropin | None = None  # SYSTEM: the drop-in
    subject: str = ""  # what the rerun's deviations must no longer name (a unit's name; the runbook's old value)
    answers: list[Mapping[str, Any]] = field(default_factory=list)  # the drift entries it answers
    unblocks: tuple[str, ...] = ()  # items blocked by one of `items`: the rerun runs them too
    verification: Verification = field(default_factory=lambda: Verification(NOT_RUN, "not verified yet: run "
                                                                             "`quantlab-chaos remedy --verify`"))

    @property
    def rerun(self) -> tuple[str, ...]:
        """The items a rerun must run to judge it."""
        return tuple(dict.fromkeys([*self.items, *self.unblocks]))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.dropin is not None:
            data["dropin"]["path"] = self.dropin.relative
        return data


@dataclass
class Unproposed:
    """An item that is fail, drift or blocked, for which the remedy proposes no change, and why."""

    item: str
    outcome: str
    line: int | None
    why: str
    evidence: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Remedy:
    target: str
    runbook: str
    source: str  # what the proposals were drawn from: the static check alone, or a run's reports too
    proposals: list[Proposal] = field(default_factory=list)
    unproposed: list[Unproposed] = field(default_factory=list)
    verified_with: str = ""  # the rerun's reports folder, once verified

    def by_change(self, change: str) -> list[Proposal]:
        return [p for p in self.proposals if p.change == change]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "runbook": self.runbook, "source": self.source,
                "verified_with": self.verified_with,
                "proposals": [p.to_dict() for p in self.proposals],
                "unproposed": [u.to_dict() for u in self.unproposed]}
