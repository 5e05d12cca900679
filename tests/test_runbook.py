"""The runbook model: what it extracts from the twin's runbook, and that it survives edits an operator makes."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.target import TWIN_ROOT
from quantlab_chaos.errors import ConfigError
from quantlab_chaos.runbook import extract_identifiers, load_runbook, parse_runbook

RUNBOOK = TWIN_ROOT / "docs" / "runbook.md"
EXPECTED_ITEMS = [
    "start-stop", "health-checks", "self-test", "kill-switch", "canary",
    "failure:s3-archive-unreachable", "failure:observer-unauthorized", "failure:live-ws-disabled",
    "failure:budget-guard-stops", "failure:archive-missing",
    "break-glass:stop-live-runs", "break-glass:rotate-observer-token", "break-glass:disable-live-ws",
    "safety-defaults",
]


@pytest.fixture(scope="module")
def text() -> str:
    return RUNBOOK.read_text()


def _sections(text: str) -> tuple[str, list[str]]:
    head, *rest = re.split(r"(?m)^(?=## )", text)
    return head, rest


def test_every_item_of_the_twin_runbook(text: str) -> None:
    runbook = parse_runbook(text, RUNBOOK)
    assert [item.id for item in runbook.items()] == EXPECTED_ITEMS
    assert runbook.title.startswith("QuantLab Prod Runbook")


def test_units_and_systemctl_commands(text: str) -> None:
    runbook = parse_runbook(text)
    assert "core/observer-api/quantlab-observer.service" in [path for path, _ in runbook.unit_files]
    assert {c.action for c in runbook.systemctl} == {"start", "stop", "restart", "status"}
    assert all(c.sudo and c.unit.endswith(".service") for c in runbook.systemctl)


def test_health_checks_are_requests_with_headers(text: str) -> None:
    runbook = parse_runbook(text)
    paths = [(r.method, r.port, r.path) for r in runbook.health_checks]
    assert paths == [("GET", 9150, "/observer/health"), ("GET", 9150, "/observer/runs")]
    headers = runbook.health_checks[0].header_values({"OBSERVER_TOKEN": "t0k"})
    assert headers == {"Authorization": "Bearer t0k"}
    assert runbook.health_checks[0].url_for("http://127.0.0.1:5555") == "http://127.0.0.1:5555/observer/health"
    assert [c.argv[1] for c in runbook.self_tests] == ["core/release/ConfigCheck.js", "core/release/SelfTest.js"]


def test_kill_switch_and_canary(text: str) -> None:
    runbook = parse_runbook(text)
    assert runbook.kill_switch is not None and runbook.kill_switch.method == "POST"
    assert runbook.kill_switch.placeholders() == ["live_run_id"]
    assert runbook.kill_switch.url_for("http://h:1", live_run_id="abc") == "http://h:1/observer/runs/abc/stop"
    assert runbook.canary is not None and runbook.canary.argv[1] == "tools/run-canary-live.js"
    assert "--symbols" in runbook.canary.argv and len(runbook.canary_expected) == 3


def test_failures_carry_their_identifiers(text: str) -> None:
    runbook = parse_runbook(text)
    assert runbook.failure("live-ws-disabled").symptom_ids.codes == ("CORE_LIVE_WS_DISABLED",)
    assert runbook.failure("live-ws-disabled").fix_ids.env() == {"CORE_LIVE_WS_ENABLED": "1"}
    assert set(runbook.failure("budget-guard-stops").symptom_ids.codes) == {"BUDGET_EXCEEDED", "PROMOTION_GUARD_FAIL"}
    assert 401 in runbook.failure("observer-unauthorized").symptom_ids.http_statuses
    assert "OBSERVER_TOKEN" in runbook.failure("observer-unauthorized").fix_ids.env_names
    assert "RUN_ARCHIVE_S3_*" in runbook.failure("s3-archive-unreachable").fix_ids.env_names
    assert runbook.failure("archive-missing").fix_ids.env() == {"RUN_ARCHIVE_ENABLED": "1"}
    assert "/tmp/quantlab-audit/" in runbook.failure("budget-guard-stops").fix_ids.paths
    assert [f.number for f in runbook.failures] == [1, 2, 3, 4, 5]
    assert "Symptom" in str(runbook.failure("live-ws-disabled").symptom_source)


def test_break_glass_and_safety_defaults(text: str) -> None:
    runbook = parse_runbook(text)
    assert runbook.break_glass_step("rotate-observer-token").systemctl[0].unit == "quantlab-observer.service"
    assert runbook.break_glass_step("disable-live-ws").ids.env() == {"CORE_LIVE_WS_ENABLED": "0"}
    assert runbook.break_glass_step("stop-live-runs").requests[0].method == "POST"
    assert {s.name: s.value for s in runbook.unit_directives} == {
        "Restart": "on-failure", "RestartSec": "5s", "StartLimitIntervalSec": "60s",
        "StartLimitBurst": "5", "MemoryMax": "2G", "CPUQuota": "80%",
    }
    assert runbook.env_limit("RUN_BUDGET_MAX_EVENTS").value == "1000000"


def test_reordered_sections_and_extra_prose_parse_the_same(text: str) -> None:
    head, sections = _sections(text)
    shuffled = head + "Some introduction an operator added.\n\n" + "".join(reversed(sections))
    shuffled += "\n## Contacts\nPage the on-call SRE.\n"
    runbook = parse_runbook(shuffled)
    assert sorted(item.id for item in runbook.items()) == sorted(EXPECTED_ITEMS)
    assert [name for name, _ in runbook.unknown_sections] == ["Contacts"]


def test_renumbered_failures_keep_their_ids(text: str) -> None:
    renumbered = re.sub(r"(?m)^(\d)\) ", lambda m: f"{int(m.group(1)) + 4}) ", text)
    runbook = parse_runbook(renumbered)
    assert [f.number for f in runbook.failures] == [5, 6, 7, 8, 9]
    assert runbook.failure("live-ws-disabled").number == 7


def test_an_edited_code_changes_the_model(text: str) -> None:
    edited = text.replace("`CORE_LIVE_WS_DISABLED`", "`LIVE_WS_OFF`")
    assert parse_runbook(edited).failure("live-ws-disabled").symptom_ids.codes == ("LIVE_WS_OFF",)


def test_lines_point_at_the_runbook(text: str) -> None:
    runbook = parse_runbook(text)
    failure = runbook.failure("live-ws-disabled")
    assert text.splitlines()[failure.symptom_source.line - 1].strip().startswith("- Symptom:")


def test_failure_without_fix_is_a_clear_error(text: str) -> None:
    broken = re.sub(r"(?m)^\s*- Fix: turn live ingest.*$", "", text)
    broken = re.sub(r"(?m)^\s*- Fix:.*CORE_LIVE_WS_ENABLED=1.*$", "", broken)
    with pytest.raises(ConfigError, match="has no 'Fix:' bullet"):
        parse_runbook(broken, "rb.md")


def test_not_a_runbook_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("# Notes\n\nnothing here\n")
    with pytest.raises(ConfigError, match="no runbook sections"):
        load_runbook(tmp_path / "notes.md")
    with pytest.raises(ConfigError, match="does not exist"):
        load_runbook(tmp_path / "missing.md")
    (tmp_path / "binary.md").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_runbook(tmp_path / "binary.md")


def test_identifier_extraction() -> None:
    ids = extract_identifiers("set `FOO_BAR=1`, see `/var/log/x.log`, run `sudo systemctl restart a.service`; 503 or 429.")
    assert ids.env() == {"FOO_BAR": "1"} and ids.paths == ("/var/log/x.log",)
    assert ids.units == ("a.service",) and ids.http_statuses == (503, 429)


def test_json_dump_is_complete(text: str) -> None:
    data = parse_runbook(text).to_dict()
    assert len(data["items"]) == len(EXPECTED_ITEMS) and data["failures"][0]["symptom"]
