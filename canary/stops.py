"""Refusals, stops and limits: what the observer answers to a request it must refuse or a stop, and what the audit
trail and the archive say about a run that was stopped (by an operator or by a budget or guard)."""
from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import httpx

from canary.checks import CheckResult, Fixes, ObserverClient, archive_keys, audit_entries, timed
from quantlab_chaos import items

# -- refusals and stops (CONTRACT section 3: what the observer answers, and what a stop leaves behind) ----------

UNAUTHORIZED_STATUS = 401
UNAUTHORIZED_BODY = {"error": "UNAUTHORIZED", "message": "Bearer token required"}
RUN_NOT_FOUND_STATUS = 404
RUN_NOT_FOUND_BODY = {"error": "RUN_NOT_FOUND"}
MANUAL_STOP = "MANUAL_STOP"
STOP_AUDIT_ACTION = "API_CALL"


class ArchiveReader(Protocol):
    def read_json(self, key: str) -> Any: ...


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:200]


@timed
def check_unauthorized(response: httpx.Response, status: int = UNAUTHORIZED_STATUS, what: str = "the request",
                       fixes: Fixes | None = None) -> CheckResult:
    """A request without a valid bearer token was refused with `status` and the observer's 401 body."""
    body = _body(response)
    evidence = {"status": response.status_code, "body": body}
    if response.status_code == status and body == UNAUTHORIZED_BODY:
        return CheckResult("unauthorized", True, f"{what}: {status} {UNAUTHORIZED_BODY['error']}", evidence=evidence)
    item = items.OBSERVER_UNAUTHORIZED
    return CheckResult("unauthorized", False, f"{what} answered {response.status_code} {str(body)[:120]} "
                       f"(expected {status} {UNAUTHORIZED_BODY})", items.fix_for(item, fixes), item, evidence)


@timed
def check_stop_answer(response: httpx.Response, run_id: str) -> CheckResult:
    """The stop route accepted the stop: 200 {"status":"ok","id":<run id>}."""
    body = _body(response)
    evidence = {"status": response.status_code, "body": body}
    if response.status_code == 200 and body == {"status": "ok", "id": run_id}:
        return CheckResult("stop_answer", True, f"stop of run {run_id} accepted", evidence=evidence)
    return CheckResult("stop_answer", False, f"stop of run {run_id} answered {response.status_code} {str(body)[:120]} "
                       "(expected 200 {\"status\":\"ok\",\"id\":...})", evidence=evidence)


@timed
def check_unknown_run(response: httpx.Response) -> CheckResult:
    """The stop route refused a run id it does not know: 404 {"error":"RUN_NOT_FOUND"}."""
    body = _body(response)
    evidence = {"status": response.status_code, "body": body}
    if response.status_code == RUN_NOT_FOUND_STATUS and body == RUN_NOT_FOUND_BODY:
        return CheckResult("unknown_run", True, "unknown run id: 404 RUN_NOT_FOUND", evidence=evidence)
    return CheckResult("unknown_run", False, f"stop of an unknown run id answered {response.status_code} {str(body)[:120]} "
                       f"(expected {RUN_NOT_FOUND_STATUS} {RUN_NOT_FOUND_BODY})", evidence=evidence)


def find_run(client: ObserverClient, run_id: str) -> dict[str, Any] | None:
    """The run's entry in /observer/runs, or None when it is not listed (or the listing is not a 200)."""
    status, body = client.json("/observer/runs")
    runs = body.get("runs") if status == 200 and isinstance(body, dict) else None
    return next((r for r in runs or [] if isinstance(r, dict) and r.get("live_run_id") == run_id), None)


@timed
def check_run_stopped(client: ObserverClient, run_id: str, reason: str = MANUAL_STOP, within_s: float = 2.0,
                      interval_s: float = 0.1) -> CheckResult:
    """The run leaves RUNNING with stop reason `reason` within `within_s` seconds (polls /observer/runs)."""
    started = time.monotonic()
    run = find_run(client, run_id)
    while (run is None or run.get("status") == "RUNNING") and time.monotonic() - started < within_s:
        time.sleep(interval_s)  # the listing is rate limited per client: poll gently
        run = find_run(client, run_id)
    elapsed = round(time.monotonic() - started, 3)
    evidence = {"status": run and run.get("status"), "stop_reason": run and run.get("stop_reason"), "elapsed_s": elapsed}
    if run is None:
        return CheckResult("run_stopped", False, f"run {run_id} is not listed in /observer/runs", evidence=evidence)
    if run.get("status") == "RUNNING":
        return CheckResult("run_stopped", False, f"run {run_id} still RUNNING {within_s:.1f} s after the stop",
                           evidence=evidence)
    if run.get("stop_reason") != reason:
        return CheckResult("run_stopped", False, f"run {run_id} ended {run.get('status')} with stop reason "
                           f"{run.get('stop_reason')} (expected {reason})", evidence=evidence)
    return CheckResult("run_stopped", True, f"run {run_id} {run.get('status')} ({reason}) after {elapsed} s",
                       evidence=evidence)


@timed
def check_stop_audited(spool_dir: Path, run_id: str, reason: str = MANUAL_STOP) -> CheckResult:
    """The stop request is in the audit spool (API_CALL) and the run's RUN_STOP carries `reason`."""
    entries = audit_entries(spool_dir, run_id)
    calls = [e for e in entries if e.get("action") == STOP_AUDIT_ACTION]
    stops = [e for e in entries if e.get("action") == "RUN_STOP"]
    reasons = [e.get("reason") or (e.get("metadata") or {}).get("stop_reason") for e in stops]
    evidence = {"actions": [e.get("action") for e in entries], "run_stop_reasons": reasons}
    if not calls:
        return CheckResult("stop_audited", False, f"audit spool {spool_dir} has no {STOP_AUDIT_ACTION} entry for run {run_id}",
                           "check AUDIT_ENABLED and AUDIT_SPOOL_DIR of the observer", evidence=evidence)
    if reason not in reasons:
        return CheckResult("stop_audited", False, f"run {run_id}'s RUN_STOP reasons are {reasons or 'none'} "
                           f"(expected {reason})", evidence=evidence)
    return CheckResult("stop_audited", True, f"{STOP_AUDIT_ACTION} and RUN_STOP ({reason}) audited for run {run_id}",
                       evidence=evidence)


@timed
def check_manifest_stop_reason(archive: ArchiveReader, run_id: str, reason: str = MANUAL_STOP) -> CheckResult:
    """The run's archived manifest records stop reason `reason`."""
    key = archive_keys(run_id)[0]
    try:
        manifest = archive.read_json(key)
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable manifest is the finding
        return CheckResult("manifest_stop_reason", False, f"cannot read {key}: {type(exc).__name__}",
                           items.fix_for(items.ARCHIVE_MISSING, None), items.ARCHIVE_MISSING, {"key": key})
    found = manifest.get("stop_reason") if isinstance(manifest, dict) else None
    evidence = {"key": key, "stop_reason": found}
    if found != reason:
        return CheckResult("manifest_stop_reason", False, f"{key} has stop_reason {found} (expected {reason})",
                           evidence=evidence)
    return CheckResult("manifest_stop_reason", True, f"{key} has stop_reason {reason}", evidence=evidence)


# -- budget and guard stops (CONTRACT section 6: what the audit trail says about a run a limit stopped) ---------

RUN_STOP_ACTION = "RUN_STOP"
BUDGET_AUDIT_ACTION = "BUDGET_EXCEEDED"
GUARD_AUDIT_ACTION = "GUARD_FAIL"


@timed
def check_run_stop_audited(spool_dir: Path, run_id: str, reason: str) -> CheckResult:
    """The run's RUN_STOP audit entry carries stop reason `reason` (as `reason` or `metadata.stop_reason`)."""
    stops = [e for e in audit_entries(spool_dir, run_id) if e.get("action") == RUN_STOP_ACTION]
    reasons = [e.get("reason") for e in stops] + [(e.get("metadata") or {}).get("stop_reason") for e in stops]
    evidence = {"run_stop_entries": len(stops), "reasons": reasons}
    if not stops:
        return CheckResult("run_stop_audited", False, f"audit spool {spool_dir} has no {RUN_STOP_ACTION} entry for run {run_id}",
                           "check AUDIT_ENABLED and AUDIT_SPOOL_DIR of the service", evidence=evidence)
    if any(found != reason for found in reasons):
        return CheckResult("run_stop_audited", False, f"run {run_id}'s {RUN_STOP_ACTION} says {reasons} (expected {reason})",
                           evidence=evidence)
    return CheckResult("run_stop_audited", True, f"{RUN_STOP_ACTION} of run {run_id} says {reason}", evidence=evidence)


@timed
def check_limit_audited(spool_dir: Path, run_id: str, action: str, key: str, accepted: Iterable[str],
                        fixes: Fixes | None = None) -> CheckResult:
    """The audit trail says which limit stopped the run: an `action` entry (BUDGET_EXCEEDED or GUARD_FAIL)
    whose metadata[`key`] (budget or guard) is one of `accepted`, with the value that crossed it."""
    wanted = tuple(accepted)
    found = [e for e in audit_entries(spool_dir, run_id) if e.get("action") == action]
    named = [(e.get("metadata") or {}).get(key) for e in found]
    evidence = {"action": action, key: named, "reasons": [e.get("reason") for e in found],
                "values": [(e.get("metadata") or {}).get("value") for e in found],
                "limits": [(e.get("metadata") or {}).get("limit") for e in found]}
    item = items.BUDGET_GUARD_STOPS
    if not found:
        return CheckResult("limit_audited", False, f"audit spool {spool_dir} has no {action} entry for run {run_id}",
                           items.fix_for(item, fixes), item, evidence)
    if not any(name in wanted for name in named):
        return CheckResult("limit_audited", False, f"run {run_id}'s {action} names {key} {named} (expected one of {list(wanted)})",
                           items.fix_for(item, fixes), item, evidence)
    return CheckResult("limit_audited", True, f"{action} of run {run_id} names {key} {next(n for n in named if n in wanted)}",
                       evidence=evidence)


# -- rate limits (CONTRACT section 3: per client IP and path, checked before auth) ----------------------------

RATE_LIMIT_PER_MIN = 120
STOP_RATE_LIMIT_PER_MIN = 30
TOO_MANY_REQUESTS_STATUS = 429


def too_many_requests_body(limit: int) -> dict[str, str]:
    """The observer's 429 body for a path whose limit is `limit` requests a minute."""
    return {"error": "TOO_MANY_REQUESTS", "message": f"Limit {limit}/min"}
