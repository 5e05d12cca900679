"""The five outcomes a scenario or a runbook item ends in, and how a scenario's end is read as one.

- `pass`: the system did what the runbook says.
- `fail`: the system did not (a `RunbookViolation`, or a plain assertion about the system).
- `drift`: the runbook's text disagrees with the checkout's units or code (`DriftFound`, or the static check).
- `blocked`: the steady state the scenario needs could not be reached before any fault (`SteadyStateNotReached`);
  it says why and names the runbook item whose own failure blocks it, when one does.
- `error`: the harness itself failed (its bug, a missing tool, an environment it could not build).

Chaos Toolkit's run statuses map onto these: completed -> pass, deviated -> fail, aborted before the method ->
blocked, failed (the toolkit's own trouble) -> error.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

PASS, FAIL, DRIFT, BLOCKED, ERROR = "pass", "fail", "drift", "blocked", "error"
OUTCOMES = (PASS, FAIL, DRIFT, BLOCKED, ERROR)
SKIPPED = "skipped"  # a scenario that did not run (pytest.skip); never an item's outcome by itself
# Which outcome an item takes when its scenarios disagree: a proven defect outweighs everything, then the harness's
# own failure (the item's verdict is unknown), then a steady state that could not be reached, then text drift.
PRECEDENCE = (FAIL, ERROR, BLOCKED, DRIFT, PASS)
EXIT_CODES = {PASS: 0, FAIL: 1, DRIFT: 1, BLOCKED: 1, ERROR: 3}


class SteadyStateNotReached(Exception):
    """The steady state a scenario needs could not be reached before any fault: the scenario is `blocked`.

    `blocked_by` is the runbook item whose own failure blocks it (for example `canary` when no healthy canary run
    can be had), or None when the cause is not a runbook item (the checkout is not installed completely)."""

    def __init__(self, why: str, *, blocked_by: str | None = None) -> None:
        self.why = " ".join(why.split())
        self.blocked_by = blocked_by
        by = f" (blocked by runbook item {blocked_by})" if blocked_by else ""
        super().__init__(f"[blocked] steady state not reached before any fault{by}: {self.why}")


class DriftFound(Exception):
    """The runbook names something the checkout does not have (a unit, a route, a command): the scenario is `drift`."""

    def __init__(self, what: str) -> None:
        self.what = " ".join(what.split())
        super().__init__(f"[drift] {self.what}")


@dataclass(frozen=True)
class Verdict:
    """One scenario's outcome, with a one-sentence message and, for `blocked`, the item that blocks it."""

    outcome: str
    message: str = ""
    blocked_by: str | None = None


def classify(exc: BaseException | None) -> Verdict:
    """The outcome of a scenario that ended with `exc` (None: it passed)."""
    from canary.checks import TargetUnreachable
    from harness.journal import RunbookViolation

    if exc is None:
        return Verdict(PASS)
    if isinstance(exc, SteadyStateNotReached):
        return Verdict(BLOCKED, one_sentence(str(exc)), exc.blocked_by)
    if isinstance(exc, DriftFound):
        return Verdict(DRIFT, one_sentence(str(exc)))
    if isinstance(exc, (RunbookViolation, AssertionError)):
        return Verdict(FAIL, one_sentence(str(exc)))
    if isinstance(exc, TargetUnreachable):  # the observer gave no answer where the runbook says it listens
        return Verdict(FAIL, one_sentence(f"the observer did not answer: {exc}"))
    return Verdict(ERROR, one_sentence(f"[error] the harness failed: {type(exc).__name__}: {exc}"))


def worst(outcomes: Iterable[str]) -> str | None:
    """The outcome that wins by PRECEDENCE, or None when there is none (skipped only)."""
    seen = set(outcomes)
    return next((outcome for outcome in PRECEDENCE if outcome in seen), None)


def exit_code(outcomes: Iterable[str]) -> int:
    """0 when everything passed, 3 when anything is `error`, else 1 when anything is fail, drift or blocked."""
    seen = set(outcomes)
    if ERROR in seen:
        return EXIT_CODES[ERROR]
    return 1 if seen - {PASS} else 0


def one_sentence(text: str, limit: int = 400) -> str:
    """`text` on one line, cut at a word boundary to at most `limit` characters (full text stays in the JSON)."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    return flat[: flat.rfind(" ", 0, limit - 1) if " " in flat[:limit] else limit - 1].rstrip(" ,;:") + "…"
