"""The journal of one runbook scenario: it runs the scenario's experiment (harness.experiment) and records it.

Every judged observation and action is a step with its evidence; the moments the fault was applied, the symptom
first held, the fix was applied and recovery first held give time to detect and time to recover; findings carry a
severity. The journal is saved into the test's report, and the summaries are made from it.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import allure

from harness.experiment import SEVERITIES, Experiment, ExperimentError, Run, Runner, said
from quantlab_chaos.runbook import RunbookItem, Source

T = TypeVar("T")


class RunbookViolation(AssertionError):
    """The system did not do what a runbook line says. The message names the line and what happened instead;
    `source`, `says` and `seen` keep the parts (None when raised with a plain message)."""

    source: Source | None = None
    says: str | None = None
    seen: str | None = None


def violation(source: Source | None, expected: str, actual: str) -> RunbookViolation:
    exc = RunbookViolation(said(source.line if source else None, expected, actual))
    exc.source, exc.says, exc.seen = source, expected, actual
    return exc


@dataclass
class Step:
    kind: str
    description: str
    started_s: float
    duration_s: float = 0.0
    ok: bool | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class Finding:
    """Something worth a human's attention beside the runbook's promises. Severity `info` or `warning` is reported;
    `defect` (the system does something harmful the runbook does not cover) fails the item it belongs to."""

    title: str
    detail: str
    severity: str = "warning"
    source: Source | None = None


@dataclass
class Snapshot:
    """What a target has written so far: audit spool files and bucket objects, each with a digest."""

    spool: dict[str, str]
    bucket: dict[str, str]


class Journal:
    """Records one scenario for one runbook item."""

    def __init__(self, item: RunbookItem) -> None:
        self.item = item
        self.steps: list[Step] = []
        self.findings: list[Finding] = []
        self.measurements: dict[str, Any] = {}
        self.waits: list[tuple[str, float]] = []  # waits the scenario needs by nature, with what sets each
        self.symptom_observed: bool | None = None
        self.fix_verified: bool | None = None
        self._t0 = time.monotonic()
        self._injected_at: float | None = None
        self._detected_at: float | None = None
        self._fixed_at: float | None = None
        self._recovered_at: float | None = None
        self.experiment: str | None = None
        self.deviations: list[dict[str, Any]] = []
        self._runner: Runner | None = None

    # -- experiments ---------------------------------------------------------------------------------

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            self._runner = Runner(self)
        return self._runner

    def run(self, experiment: Experiment) -> Run:
        """Runs the experiment: every phase evaluated, every deviation reported, rollbacks always."""
        try:
            return self.runner.run(experiment)
        finally:
            self.deviations = [{"phase": d.phase, "says": d.says, "seen": d.seen,
                                "line": d.source.line if d.source else None}
                               for d in self.runner.last_deviations]

    def enter(self, context: AbstractContextManager[T]) -> T:
        """Enters a context (a live run) that the experiment's rollbacks leave, whatever happens."""
        return self.runner.enter(context)

    def note_wait(self, reason: str, seconds: float) -> None:
        """A wait the scenario cannot do without (a runbook value, a deadline of ours), and what sets it: the
        reports say what bounds a run's longest scenario."""
        self.waits.append((reason, float(seconds)))

    def mark(self, moment: str, at: float | None) -> None:
        """The monotonic time of a moment of the experiment: fault, detected, fix, recovered."""
        setattr(self, {"fault": "_injected_at", "detected": "_detected_at", "fix": "_fixed_at",
                       "recovered": "_recovered_at"}[moment], at)

    # -- steps ---------------------------------------------------------------------------------------

    @contextmanager
    def step(self, kind: str, description: str) -> Iterator[Step]:
        step = Step(kind, description, time.monotonic() - self._t0)
        self.steps.append(step)
        started = time.monotonic()
        try:
            with allure.step(f"{kind.replace('_', ' ')}: {description}"):
                yield step
            step.ok = True if step.ok is None else step.ok
        except BaseException:
            step.ok = False
            raise
        finally:
            step.duration_s = time.monotonic() - started

    # -- outcomes ------------------------------------------------------------------------------------

    def finding(self, title: str, detail: str, severity: str = "warning", source: Source | None = None) -> None:
        if severity not in SEVERITIES:
            raise ExperimentError(f"finding {title!r} has severity {severity!r}; use one of {', '.join(SEVERITIES)}")
        self.findings.append(Finding(title, detail, severity, source))

    def measure(self, name: str, value: Any) -> None:
        self.measurements[name] = value

    def record(self, kind: str, description: str, ok: bool, evidence: Mapping[str, Any] | None, *,
               seen: str | None = None, duration_s: float = 0.0) -> None:
        """One judged observation or action of the scenario, in the journal and as an allure step."""
        now = time.monotonic() - self._t0
        details = dict(evidence or {})
        if seen is not None:
            details = {"seen": seen, **details}
        self.steps.append(Step(kind, description, round(now - duration_s, 3), round(duration_s, 3), ok, details))
        verdict = "ok" if ok else ("NOT as the runbook says" if kind != "rollback" else "FAILED")
        with allure.step(f"{kind.replace('_', ' ')}: {description} -> {verdict}"):
            if details:
                allure.attach(json.dumps(details, indent=2, default=str), name=f"{kind} evidence",
                              attachment_type=allure.attachment_type.JSON)

    # -- results -------------------------------------------------------------------------------------

    @property
    def time_to_detect_s(self) -> float | None:
        if self._injected_at is None or self._detected_at is None:
            return None
        return round(self._detected_at - self._injected_at, 3)

    @property
    def time_to_recover_s(self) -> float | None:
        if self._fixed_at is None or self._recovered_at is None:
            return None
        return round(self._recovered_at - self._fixed_at, 3)

    def to_dict(self) -> dict[str, Any]:
        return {
            "item": asdict(self.item),
            "experiment": self.experiment,
            "deviations": self.deviations,
            "symptom_observed": self.symptom_observed,
            "fix_verified": self.fix_verified,
            "time_to_detect_s": self.time_to_detect_s,
            "time_to_recover_s": self.time_to_recover_s,
            "steps": [asdict(step) for step in self.steps],
            "findings": [asdict(finding) for finding in self.findings],
            "measurements": self.measurements,
        }


def snapshot(spool_dir: Path, bucket: Any | None) -> Snapshot:
    """Digests of every spool file and every bucket object (bucket may be None when S3 is not in play)."""
    spool = {
        str(path.relative_to(spool_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(spool_dir.rglob("*.jsonl")) if path.is_file()
    } if spool_dir.is_dir() else {}
    return Snapshot(spool=spool, bucket=bucket.snapshot() if bucket is not None else {})
