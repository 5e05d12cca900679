"""The runbook items' vocabulary: the one place that knows what the runbook's items are.

An item is one provable thing the runbook says: a section (start-stop, health-checks, ...), one of its common
failures (`failure:<id>`) or one of its break-glass steps (`break-glass:<id>`). For each failure this module holds
how the runbook's text is recognised (by its words or the identifiers it names, never by its number), the runbook's
own fix (the words the shipped runbook uses, for when no runbook is at hand) and the identifiers that belong to it:
the env names, error codes, self-test steps and archive objects a failing check reports in its structured fields.
A failing canary check is tied to an item through those identifiers (`item_for`), not through words in a message.

To add a runbook item: a recogniser here (and identifiers, if checks should point at it) and a scenario module marked
`@pytest.mark.runbook("<id>")`; the coverage check (harness/drift.py) reports any item without a scenario.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Recognisers = tuple[tuple[str, "re.Pattern[str]"], ...]

# Section items, in the runbook's order. Sections are recognised by their headings, tested in SECTION_PATTERNS' order
# (first match wins).
START_STOP = "start-stop"
HEALTH_CHECKS = "health-checks"
SELF_TEST = "self-test"
KILL_SWITCH = "kill-switch"
CANARY = "canary"
SAFETY_DEFAULTS = "safety-defaults"

SECTION_PATTERNS: Recognisers = (
    ("kill_switch", re.compile(r"kill[- ]?switch", re.I)),
    ("safety_defaults", re.compile(r"safety|defaults|limits", re.I)),
    ("failures", re.compile(r"fail", re.I)),
    ("break_glass", re.compile(r"break[- ]?glass|emergency", re.I)),
    ("canary", re.compile(r"canary", re.I)),
    ("health_checks", re.compile(r"health|self[- ]?test", re.I)),
    ("start_stop", re.compile(r"start|stop|systemd|services", re.I)),
)

FAILURE_PREFIX = "failure:"
BREAK_GLASS_PREFIX = "break-glass:"


@dataclass(frozen=True)
class FailureKind:
    """One of the runbook's common failures, as the harness and the canary know it."""

    id: str
    recogniser: re.Pattern[str]  # tested against the failure's title and symptom
    fix: str  # the runbook's own words, used when the runbook itself is not at hand
    identifiers: frozenset[str] = frozenset()  # env names, codes, self-test steps, archive objects it owns
    prefixes: tuple[str, ...] = ()  # env-name prefixes it owns (RUN_ARCHIVE_S3_ for RUN_ARCHIVE_S3_BUCKET, ...)

    @property
    def item(self) -> str:
        return FAILURE_PREFIX + self.id

    def owns(self, identifier: str) -> bool:
        return identifier in self.identifiers or identifier.startswith(self.prefixes)


ARCHIVE_OBJECTS = ("manifest.json", "decisions.jsonl", "stats.json")

FAILURES: tuple[FailureKind, ...] = (
    FailureKind("s3-archive-unreachable", re.compile(r"s3.*(unreachable|down|unavailable)|RUN_ARCHIVE_S3_", re.I),
                "verify `RUN_ARCHIVE_S3_*` env, endpoint reachability, and bucket permissions.",
                frozenset({"s3_reachable", "index_readable", "S3Timeout"}), ("RUN_ARCHIVE_S3_",)),
    FailureKind("observer-unauthorized", re.compile(r"unauthori[sz]ed|\b401\b", re.I),
                "set `OBSERVER_TOKEN` and use `Authorization: Bearer <token>`.",
                frozenset({"OBSERVER_TOKEN", "observer_auth", "UNAUTHORIZED", "401"})),
    FailureKind("live-ws-disabled", re.compile(r"live\s*ws.*disabled|CORE_LIVE_WS_DISABLED", re.I),
                "set `CORE_LIVE_WS_ENABLED=1`.",
                frozenset({"CORE_LIVE_WS_ENABLED", "CORE_LIVE_WS_DISABLED"})),
    FailureKind("budget-guard-stops", re.compile(r"budget|guard|BUDGET_EXCEEDED|PROMOTION_GUARD_FAIL", re.I),
                "review guard/budget configs and audit trail in `/tmp/quantlab-audit/`.",
                frozenset({"BUDGET_EXCEEDED", "PROMOTION_GUARD_FAIL"})),
    FailureKind("archive-missing", re.compile(r"archive.*missing|missing.*archive|archive check", re.I),
                "confirm `RUN_ARCHIVE_ENABLED=1`, check S3 permissions, and verify RunArchiveWriter logs.",
                frozenset({"RUN_ARCHIVE_ENABLED", *ARCHIVE_OBJECTS})),
)

BREAK_GLASS_RECOGNISERS: Recognisers = (
    ("stop-live-runs", re.compile(r"stop.*run", re.I)),
    ("rotate-observer-token", re.compile(r"rotate|token", re.I)),
    ("disable-live-ws", re.compile(r"disable.*(ws|ingest)|CORE_LIVE_WS_ENABLED=0", re.I)),
)


def failure_item(failure_id: str) -> str:
    return FAILURE_PREFIX + failure_id


def break_glass_item(step_id: str) -> str:
    return BREAK_GLASS_PREFIX + step_id


def section_item(kind: str) -> str:
    """The item of a section kind that is one item (`start_stop` -> `start-stop`)."""
    return kind.replace("_", "-")


S3_ARCHIVE_UNREACHABLE = failure_item("s3-archive-unreachable")
OBSERVER_UNAUTHORIZED = failure_item("observer-unauthorized")
LIVE_WS_DISABLED = failure_item("live-ws-disabled")
BUDGET_GUARD_STOPS = failure_item("budget-guard-stops")
ARCHIVE_MISSING = failure_item("archive-missing")
STOP_LIVE_RUNS = break_glass_item("stop-live-runs")
ROTATE_OBSERVER_TOKEN = break_glass_item("rotate-observer-token")
DISABLE_LIVE_WS = break_glass_item("disable-live-ws")

DEFAULT_FIXES: Mapping[str, str] = {kind.item: kind.fix for kind in FAILURES}
_IDENTIFIER = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|[a-z]+\.(?:json|jsonl)|S3Timeout|\b[1-5]\d\d\b")


def recognise(recognisers: Recognisers, text: str) -> str | None:
    """The id of the first recogniser that matches `text`, or None."""
    for item_id, pattern in recognisers:
        if pattern.search(text):
            return item_id
    return None


def recognise_failure(text: str) -> str | None:
    """The failure id of a runbook failure's title and symptom, or None (it then parses with a slug of its title)."""
    return recognise(tuple((kind.id, kind.recogniser) for kind in FAILURES), text)


def item_for(identifiers: Iterable[str]) -> str | None:
    """The failure item that owns the first identifier any failure owns, or None: how a failing check's structured
    fields (a missing env name, a failed self-test step, a stop reason, a missing archive object) name an item."""
    for identifier in identifiers:
        for kind in FAILURES:
            if kind.owns(identifier):
                return kind.item
    return None


def identifiers_in(text: str) -> list[str]:
    """The identifiers a message names (UPPER_SNAKE env names and codes, archive object names, HTTP statuses), in
    order: a message's structured part, for messages that have no other (the canary's `error` field)."""
    return _IDENTIFIER.findall(text)


def item_for_message(message: str) -> str | None:
    """The failure item a message with no structured fields names (the canary's FAIL line carries only `error`): the
    failure whose runbook words it uses (its recogniser: "archive check", "live WS disabled"), else the one that owns
    an identifier it names (an env name, a code, an archive object)."""
    found = recognise_failure(message)
    return failure_item(found) if found else item_for(identifiers_in(message))


def fix_for(item: str | None, fixes: Mapping[str, str] | None = None) -> str:
    """The runbook's fix for `item`: from `fixes` (the configured runbook's words) first, else the built-in words."""
    if item is None:
        return ""
    return (fixes or {}).get(item) or DEFAULT_FIXES.get(item, "")
