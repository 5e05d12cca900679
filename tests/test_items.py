"""The runbook items' vocabulary ties each failing check to the runbook failure its structured fields name."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from canary.checks import CanaryOutcome, check_canary_line
from canary.process import CommandResult
from quantlab_chaos import items


@pytest.mark.parametrize(("identifiers", "item"), [
    (["OBSERVER_TOKEN"], items.OBSERVER_UNAUTHORIZED),
    (["RUN_ARCHIVE_S3_ENDPOINT"], items.S3_ARCHIVE_UNREACHABLE),
    (["s3_reachable"], items.S3_ARCHIVE_UNREACHABLE),
    (["index_readable"], items.S3_ARCHIVE_UNREACHABLE),
    (["observer_auth"], items.OBSERVER_UNAUTHORIZED),
    (["401"], items.OBSERVER_UNAUTHORIZED),
    (["BUDGET_EXCEEDED"], items.BUDGET_GUARD_STOPS),
    (["PROMOTION_GUARD_FAIL"], items.BUDGET_GUARD_STOPS),
    (["RUN_ARCHIVE_ENABLED"], items.ARCHIVE_MISSING),
    (["stats.json"], items.ARCHIVE_MISSING),
    (["CORE_LIVE_WS_ENABLED"], items.LIVE_WS_DISABLED),
    (["audit_spool", "PORT", "500"], None),
    (["PORT", "OBSERVER_TOKEN"], items.OBSERVER_UNAUTHORIZED),
])
def test_structured_fields_name_the_item(identifiers: list[str], item: str | None) -> None:
    assert items.item_for(identifiers) == item


@pytest.mark.parametrize(("message", "item"), [  # the canary's FAIL messages (CONTRACT section 5)
    ("CORE_LIVE_WS_ENABLED=0 (live WS disabled)", items.LIVE_WS_DISABLED),
    ("RUN_ARCHIVE_ENABLED=0 (archive check skipped)", items.ARCHIVE_MISSING),
    ("Archive objects missing for live run: manifest.json, stats.json", items.ARCHIVE_MISSING),
    ("Archive check failed: connect ECONNREFUSED 127.0.0.1:9000", items.ARCHIVE_MISSING),
    ("S3Timeout: PutObject did not answer in 3000 ms", items.S3_ARCHIVE_UNREACHABLE),
    ("Audit entries not found for live run", None),
    ("profile file is unreadable", None),
])
def test_a_message_without_fields_is_read_with_the_vocabulary(message: str, item: str | None) -> None:
    assert items.item_for_message(message) == item


def test_a_hung_canary_names_no_item() -> None:
    """A hang says nothing about which failure it is: it is not pinned on S3 (or anything else)."""
    now = datetime.now(UTC)
    hung = CanaryOutcome(CommandResult(("node", "tools/run-canary-live.js"), None, "", "", 60.0, True), None, now, now)
    verdict = check_canary_line(hung)
    assert not verdict.ok and verdict.runbook_item is None and verdict.fix == ""
    assert "did not finish before its deadline" in verdict.message


def test_fixes_come_from_the_configured_runbook_first() -> None:
    assert items.fix_for(items.LIVE_WS_DISABLED) == "set `CORE_LIVE_WS_ENABLED=1`."
    assert items.fix_for(items.LIVE_WS_DISABLED, {items.LIVE_WS_DISABLED: "our words"}) == "our words"
    assert items.fix_for(None) == "" and items.fix_for("failure:unknown") == ""


def test_item_ids_are_the_runbook_s() -> None:
    assert [kind.item for kind in items.FAILURES] == [
        "failure:s3-archive-unreachable", "failure:observer-unauthorized", "failure:live-ws-disabled",
        "failure:budget-guard-stops", "failure:archive-missing"]
    assert items.section_item("safety_defaults") == items.SAFETY_DEFAULTS == "safety-defaults"
    assert items.break_glass_item("stop-live-runs") == items.STOP_LIVE_RUNS
