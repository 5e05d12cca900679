"""Adding a sixth failure to the runbook takes a recogniser in quantlab_chaos.items and a scenario module, nothing
else: in a copied twin whose runbook gains the failure, the coverage check reports it without a scenario until a
scenario module marked with its item exists, and the vocabulary ties a failing check's identifier to it."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from harness.drift import SCENARIOS_DIR, Drift, check_drift, scenario_items
from harness.target import Target
from quantlab_chaos import items
from quantlab_chaos.runbook import load_runbook
from tests.twin_copy import twin_copy

SIXTH = """\
6. **Order book cache down**
   - Symptom: the live run stops with `BOOK_CACHE_UNAVAILABLE`.
   - Fix: restart the cache, then check `BOOK_CACHE_URL` in the live runner's env file.
"""
SCENARIO = '''\
import pytest


@pytest.mark.runbook("failure:book-cache-down")
def test_book_cache_down() -> None:
    assert True
'''


def _with_sixth_failure(tmp_path: Path) -> Target:
    """A twin copy whose runbook lists the sixth failure and whose code raises and reads what the runbook names."""
    root = twin_copy(tmp_path / "twin")
    runbook = root / "docs" / "runbook.md"
    text = runbook.read_text()
    fifth = re.search(r"^5[.)] .*?(?=^\S|\Z)", text, re.M | re.S)
    assert fifth, "the twin's runbook has no fifth failure to append a sixth after"
    sixth = SIXTH.replace("6.", "6" + fifth.group(0)[1], 1)  # numbered the way the runbook numbers its failures
    runbook.write_text(text[:fifth.end()] + sixth + "\n" + text[fifth.end():])
    (root / "core" / "live" / "bookCache.js").write_text(textwrap.dedent("""\
        export function bookCache(env) {
          if (!env.BOOK_CACHE_URL) throw new Error('BOOK_CACHE_UNAVAILABLE');
          return env.BOOK_CACHE_URL;
        }
        """))
    return Target.load(root)


@pytest.fixture(scope="module")
def shipped_scenarios() -> dict[str, list[str]]:
    return scenario_items(SCENARIOS_DIR)


def _about(drifts: list[Drift], item: str) -> list[str]:
    return [str(drift) for drift in drifts if drift.item == item]


def test_without_a_recogniser_the_failure_is_an_item_no_scenario_proves(
        tmp_path: Path, shipped_scenarios: dict[str, list[str]]) -> None:
    target = _with_sixth_failure(tmp_path)
    runbook = load_runbook(target.runbook)
    assert [failure.id for failure in runbook.failures][-1] == "order-book-cache-down", "a slug of its title"
    drifts = check_drift(runbook, target, shipped_scenarios)
    assert _about(drifts, "failure:order-book-cache-down") == [
        f"[no-scenario] failure:order-book-cache-down: runbook line {runbook.failures[-1].source.line} says "
        "'Order book cache down'; the system: no scenario proves this item"]
    assert not [d for d in drifts if d.kind == "no-scenario" and d.item != "failure:order-book-cache-down"]


def test_a_recogniser_and_a_scenario_module_are_all_it_takes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shipped_scenarios: dict[str, list[str]]) -> None:
    kind = items.FailureKind("book-cache-down", re.compile(r"book cache|BOOK_CACHE_", re.I),
                             "restart the cache, then check `BOOK_CACHE_URL` in the live runner's env file.",
                             frozenset({"BOOK_CACHE_UNAVAILABLE"}), ("BOOK_CACHE_",))
    monkeypatch.setattr(items, "FAILURES", (*items.FAILURES, kind))
    target = _with_sixth_failure(tmp_path)
    runbook = load_runbook(target.runbook)
    assert runbook.failure("book-cache-down").number == 6
    assert "failure:book-cache-down" in [item.id for item in runbook.items()]

    before = check_drift(runbook, target, shipped_scenarios)
    assert [d.kind for d in before if d.item == "failure:book-cache-down"] == ["no-scenario"]

    scenarios = tmp_path / "scenarios"
    scenarios.mkdir()
    (scenarios / "test_failure_book_cache_down.py").write_text(SCENARIO)
    added = scenario_items(scenarios)
    assert added == {"failure:book-cache-down": ["test_failure_book_cache_down.py::test_book_cache_down"]}
    after = check_drift(runbook, target, {**shipped_scenarios, **added})
    assert _about(after, "failure:book-cache-down") == [], "covered, and its code and env name exist in the code"
    assert [str(d) for d in after] == [str(d) for d in before if d.item != "failure:book-cache-down"]

    # A failing check that reports the new failure's identifiers points at it, with the runbook's fix.
    assert items.item_for(items.identifiers_in("live run failed: BOOK_CACHE_UNAVAILABLE")) == "failure:book-cache-down"
    assert items.item_for(["BOOK_CACHE_URL"]) == "failure:book-cache-down"
    assert "BOOK_CACHE_URL" in items.fix_for("failure:book-cache-down", {kind.item: kind.fix})


def test_the_vocabulary_s_fixes_are_the_shipped_runbook_s_words() -> None:
    """The built-in fixes (used when no runbook is configured) are the production runbook's words; the twin words
    them differently, but each of its failures has one that names the same env names, paths and headers."""
    twin = load_runbook(Target.load().runbook)
    assert {items.failure_item(failure.id) for failure in twin.failures} == set(items.DEFAULT_FIXES)
    for failure in twin.failures:
        kind = next(kind for kind in items.FAILURES if kind.id == failure.id)
        assert set(re.findall(r"`([^`]+)`", kind.fix)) == set(re.findall(r"`([^`]+)`", failure.fix)), \
            f"{failure.id}: the built-in fix names what the runbook's fix names"
