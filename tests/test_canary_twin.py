"""The production canary against the twin stack: every check passes on a healthy QuantLab, and each runbook
failure, injected the way it happens in production, fails the right check with the runbook's fix and exit 1."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from canary.checks import audit_entries
from harness.environment import QuantLabEnvironment
from quantlab_chaos.runbook import Runbook
from quantlab_chaos.waiting import eventually
from tests.canary_support import (
    CanaryRun,
    assert_no_secrets,
    calm_strategy,
    run_canary_cli,
    webhook_server,
    write_env_file,
    write_toml,
)

LIVE_CHECKS = {"canary_pass", "archive", "canary_run", "audit"}
ALL_CHECKS = {"observer_auth", "runs_listing", "health_fields", "config_check", "self_test"} | LIVE_CHECKS


def canary_config(quantlab: QuantLabEnvironment, tmp_path: Path, **sections: dict[str, Any]) -> Path:
    """The canary's TOML for this environment: the live runner's env file plus the harness's exchange plumbing."""
    plumbing = write_env_file(tmp_path / "plumbing.env", quantlab.plumbing_env())
    config: dict[str, dict[str, Any]] = {
        "target": {"quantlab_root": quantlab.target.root, "observer_url": quantlab.observer_url,
                   "runbook": quantlab.target.runbook},
        "auth": {"token_env": "OBSERVER_TOKEN"},
        "s3": {"endpoint": quantlab.s3_endpoint, "bucket": quantlab.bucket.name, "region": "auto"},
        "audit": {"spool_dir": quantlab.audit_dir},
        "live": {"symbols": ["BTCUSDT", "ETHUSDT"], "duration_s": 2, "strategy": calm_strategy(tmp_path),
                 "env_files": [quantlab.wiring("live").env_file, plumbing]},
        "run": {"timeout_s": 90},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return write_toml(tmp_path / "canary.toml", config)


def canary_env_file(quantlab: QuantLabEnvironment, tmp_path: Path, **override: str) -> Path:
    """What /etc/quantlab/canary.env holds: the token and the S3 keys (never the TOML)."""
    creds = quantlab.s3_server.credentials
    values = {"OBSERVER_TOKEN": quantlab.token, "RUN_ARCHIVE_S3_ACCESS_KEY": creds.access_key,
              "RUN_ARCHIVE_S3_SECRET_KEY": creds.secret_key, **override}
    return write_env_file(tmp_path / "canary.env", {k: v for k, v in values.items() if v})


def canary(quantlab: QuantLabEnvironment, tmp_path: Path, *args: str, env: Path | None = None, **sections: Any) -> CanaryRun:
    config = canary_config(quantlab, tmp_path, **sections)
    run = run_canary_cli(["--config", str(config), *args], env_file=env or canary_env_file(quantlab, tmp_path))
    assert_no_secrets(list(quantlab.secrets().values()), run.stdout, run.stderr)
    return run


def failed(run: CanaryRun) -> dict[str, dict[str, Any]]:
    return {name: check for name, check in run.checks().items() if not check["ok"]}


def start_live_runner(quantlab: QuantLabEnvironment) -> str:
    """The live runner service's own long run, which the canary must never touch; returns its id."""
    quantlab.start("live")
    assert eventually(lambda: quantlab.observer("GET", "/observer/health").json().get("ws_connected") is True, timeout=20)
    runs = quantlab.observer("GET", "/observer/runs").json()["runs"]
    run_id: str = next(r["live_run_id"] for r in runs if r["status"] == "RUNNING")
    return run_id


def test_every_check_passes_against_the_twin(quantlab: QuantLabEnvironment, tmp_path: Path,
                                            record_property: Callable[[str, object], None]) -> None:
    quantlab.start("observer")
    service_run = start_live_runner(quantlab)
    prom = tmp_path / "quantlab_canary.prom"

    with webhook_server() as hook:
        run = canary(quantlab, tmp_path, "--live", "--json", "--prom-file", str(prom), alert={"webhook_url": hook.url})

    assert run.code == 0, run.output()
    assert hook.bodies == [], "the webhook is for failures only"
    checks = run.checks()
    assert set(checks) == ALL_CHECKS and all(c["ok"] for c in checks.values()), run.stdout
    assert checks["health_fields"]["evidence"]["active_runs"] >= 1 and checks["health_fields"]["evidence"]["ws_connected"]
    assert set(checks["canary_run"]["evidence"]["symbols_seen"]) == {"BTCUSDT", "ETHUSDT"}
    record_property("canary_duration_s", run.json()["duration_s"])

    metrics = {(s.name, s.labels.get("check")): s.value for f in text_string_to_metric_families(prom.read_text())
               for s in f.samples}
    assert metrics[("quantlab_canary_success", None)] == 1
    assert {check for name, check in metrics if name == "quantlab_canary_check_success"} == ALL_CHECKS
    assert all(v == 1 for (name, _), v in metrics.items() if name == "quantlab_canary_check_success")
    assert metrics[("quantlab_canary_duration_seconds", None)] > 0
    assert abs(metrics[("quantlab_canary_last_success_timestamp_seconds", None)] - time.time()) < 60
    assert_no_secrets(list(quantlab.secrets().values()), prom.read_text())

    # Read-only: the archive and audit of a given run, as a table.
    run_id = checks["canary_pass"]["evidence"]["line"]["live_run_id"]
    table = canary(quantlab, tmp_path, "--run-id", run_id)
    assert table.code == 0, table.output()
    for name in ("observer_auth", "runs_listing", "health_fields", "config_check", "self_test", "archive", "audit"):
        assert any(line.split()[:2] == [name, "PASS"] for line in table.stdout.splitlines()), table.stdout
    assert_untouched(quantlab, service_run)
    quantlab.stop("live")


def test_without_or_with_a_wrong_token_observer_auth_fails_with_the_runbook_fix(
        quantlab: QuantLabEnvironment, runbook_model: Runbook, tmp_path: Path) -> None:
    fix = runbook_model.failure("observer-unauthorized").fix
    quantlab.start("observer")
    with webhook_server() as hook:
        no_token = canary(quantlab, tmp_path, "--check", "observer_auth", "--check", "runs_listing", "--json",
                          env=canary_env_file(quantlab, tmp_path, OBSERVER_TOKEN=""), alert={"webhook_url": hook.url})
        assert no_token.code == 1, no_token.output()
        assert set(failed(no_token)) == {"observer_auth", "runs_listing"}
        assert failed(no_token)["observer_auth"]["fix"] == fix
        assert failed(no_token)["observer_auth"]["runbook_item"] == "failure:observer-unauthorized"
        assert len(hook.bodies) == 1 and hook.bodies[0]["status"] == "FAIL"
        assert {f["check"] for f in hook.bodies[0]["failed"]} == {"observer_auth", "runs_listing"}
        assert hook.bodies[0]["failed"][0]["fix"] == fix
        assert_no_secrets(list(quantlab.secrets().values()), *hook.raw)

    wrong = canary(quantlab, tmp_path, "--check", "observer_auth",
                   env=canary_env_file(quantlab, tmp_path, OBSERVER_TOKEN="not-the-token-" + "x" * 12))
    assert wrong.code == 1, wrong.output()
    assert "observer_auth  FAIL" in wrong.stdout and f"fix: {fix}" in wrong.stdout


def test_s3_unreachable_fails_self_test_and_archive_with_the_runbook_fix(
        quantlab: QuantLabEnvironment, runbook_model: Runbook, tmp_path: Path) -> None:
    fix = runbook_model.failure("s3-archive-unreachable").fix
    quantlab.start("observer")
    healthy = canary(quantlab, tmp_path, "--live", "--check", "canary", "--json")
    assert healthy.code == 0, healthy.output()
    run_id = healthy.checks()["canary_pass"]["evidence"]["line"]["live_run_id"]
    args = ("--check", "self_test", "--check", "archive", "--run-id", run_id, "--json")

    quantlab.s3_proxy.disable()
    broken = canary(quantlab, tmp_path, *args)
    assert broken.code == 1, broken.output()
    assert set(failed(broken)) == {"self_test", "archive"}
    assert {check["fix"] for check in failed(broken).values()} == {fix}
    assert "s3_reachable" in failed(broken)["self_test"]["message"]

    quantlab.s3_proxy.enable()
    healed = canary(quantlab, tmp_path, *args)
    assert healed.code == 0, healed.output()


def test_live_ws_disabled_fails_the_live_canary_with_the_runbook_fix(
        quantlab: QuantLabEnvironment, runbook_model: Runbook, tmp_path: Path) -> None:
    failure = runbook_model.failure("live-ws-disabled")
    quantlab.start("observer")
    quantlab.edit_env("live", set={"CORE_LIVE_WS_ENABLED": "0"})
    run = canary(quantlab, tmp_path, "--live", "--check", "canary", "--json")
    assert run.code == 1, run.output()
    check = failed(run)["canary_pass"]
    assert check["fix"] == failure.fix and "CORE_LIVE_WS_ENABLED" in check["message"]
    assert set(run.checks()) == {"canary_pass"}, "no run was started, so there is nothing to archive or audit"


def test_archiving_off_fails_the_archive_check(quantlab: QuantLabEnvironment, runbook_model: Runbook,
                                              tmp_path: Path) -> None:
    fix = runbook_model.failure("archive-missing").fix
    quantlab.start("observer")
    quantlab.edit_env("live", set={"RUN_ARCHIVE_ENABLED": "0"})
    run = canary(quantlab, tmp_path, "--live", "--check", "canary", "--json")
    assert run.code == 1, run.output()
    assert failed(run)["archive"]["fix"] == fix and failed(run)["canary_pass"]["fix"] == fix
    assert "3 of 3 archive objects missing" in failed(run)["archive"]["message"]


def test_a_silent_feed_fails_although_quantlab_s_canary_passes(quantlab: QuantLabEnvironment, tmp_path: Path) -> None:
    quantlab.start("observer")
    quantlab.exchange_proxy.disable()
    run = canary(quantlab, tmp_path, "--live", "--check", "canary", "--json")
    checks = run.checks()
    assert checks["canary_pass"]["ok"], "QuantLab's own verdict on a silent feed is PASS"
    assert run.code == 1 and not checks["canary_run"]["ok"]
    assert "silent" in checks["canary_run"]["message"] or "no events" in checks["canary_run"]["message"]


def test_a_budget_stop_fails_the_strict_verdict_with_the_runbook_fix(
        quantlab: QuantLabEnvironment, runbook_model: Runbook, tmp_path: Path) -> None:
    quantlab.start("observer")
    quantlab.edit_env("live", set={"RUN_BUDGET_MAX_EVENTS": "5"})
    run = canary(quantlab, tmp_path, "--live", "--check", "canary", "--json")
    assert run.code == 1, run.output()
    check = failed(run)["canary_run"]
    assert "BUDGET_EXCEEDED" in check["message"]
    assert check["fix"] == runbook_model.failure("budget-guard-stops").fix


def test_the_hard_deadline_stops_only_the_canary_s_own_run(quantlab: QuantLabEnvironment, tmp_path: Path) -> None:
    quantlab.start("observer")
    service_run = start_live_runner(quantlab)

    run = canary(quantlab, tmp_path, "--live", "--check", "canary", "--json", "--timeout", "8",
                 live={"duration_s": 120})

    assert run.code == 1, run.output()
    assert run.duration_s < 8 + 4, f"the canary took {run.duration_s:.1f} s with --timeout 8"
    check = run.checks()["canary_pass"]
    assert not check["ok"] and "deadline" in check["message"]
    assert "observer's stop route" in check["evidence"]["stopped"], check
    assert "raise --timeout" in check["fix"], "a deadline shorter than the run is the config's fault, not S3's"
    runs = {r["live_run_id"]: r for r in quantlab.observer("GET", "/observer/runs").json()["runs"]}
    ours = [r for rid, r in runs.items() if rid != service_run]
    assert len(ours) == 1 and ours[0]["status"] == "STOPPED" and ours[0]["stop_reason"] == "MANUAL_STOP", runs
    assert [e for e in audit_entries(quantlab.audit_dir, ours[0]["live_run_id"]) if e.get("action") == "API_CALL"]
    assert_untouched(quantlab, service_run)
    assert not _canary_processes(quantlab), "the canary left its command running"
    quantlab.stop("live")


def assert_untouched(quantlab: QuantLabEnvironment, service_run: str) -> None:
    """The live runner's own run was not stopped by anyone (it may end by itself, but never as MANUAL_STOP)."""
    run = next(r for r in quantlab.observer("GET", "/observer/runs").json()["runs"] if r["live_run_id"] == service_run)
    assert run["stop_reason"] != "MANUAL_STOP", run
    assert not [e for e in audit_entries(quantlab.audit_dir, service_run) if e.get("action") == "API_CALL"], \
        "the canary asked the observer to stop a run that is not its own"


def _canary_processes(quantlab: QuantLabEnvironment) -> list[int]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "tools/run-canary-live.js" in " ".join(process.info["cmdline"] or ()) and \
                    process.environ().get("QUANTLAB_STATE_DIR") == str(quantlab.state_dir):
                found.append(process.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found
