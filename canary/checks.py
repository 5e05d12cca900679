"""Checks against a running QuantLab: one implementation for the production canary and the harness's scenarios.

Each check returns a `CheckResult` that says what was seen, and on failure what to do: the runbook's own fix
where the runbook has one for that failure. Checks never print secrets and never change the target, except
the live canary run, which starts (and only ever stops) its own run.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import httpx

from canary.process import CommandResult

HEALTH_FIELDS = ("active_runs", "ws_connected", "last_event_age_ms", "budget_pressure",
                 "kill_switch_active", "kill_switch_reason", "killed_symbols")
RUN_FIELDS = ("live_run_id", "strategy_id", "status", "started_at", "last_event_ts", "stop_reason", "budget_pressure")
RUN_STATUSES = ("RUNNING", "STOPPED", "ERROR")
PRESSURES = ("LOW", "MED", "HIGH")
ARCHIVE_OBJECTS = ("manifest.json", "decisions.jsonl", "stats.json")
TRANSIENT_STATUSES = (502, 503, 504)

# What to do, per runbook failure, when the runbook itself is not at hand (the CLI passes the runbook's words).
DEFAULT_FIXES = {
    "failure:observer-unauthorized": "set OBSERVER_TOKEN and use 'Authorization: Bearer <token>'",
    "failure:s3-archive-unreachable": "verify RUN_ARCHIVE_S3_* env, endpoint reachability, and bucket permissions",
    "failure:live-ws-disabled": "set CORE_LIVE_WS_ENABLED=1",
    "failure:budget-guard-stops": "review guard/budget configs and the audit trail in the audit spool",
    "failure:archive-missing": "confirm RUN_ARCHIVE_ENABLED=1, check S3 permissions, and verify RunArchiveWriter logs",
}


class TargetUnreachable(Exception):
    """The target did not answer after the bounded retries."""


@dataclass
class CheckResult:
    name: str
    ok: bool
    message: str
    fix: str = ""
    runbook_item: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    unreachable: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Fixes = Mapping[str, str]
Runner = Callable[[Sequence[str], Mapping[str, str] | None, float], CommandResult]


class ArchiveProbe(Protocol):
    def head(self, key: str) -> dict[str, Any] | None: ...


def _fix(fixes: Fixes | None, item: str) -> str:
    return (fixes or {}).get(item) or DEFAULT_FIXES.get(item, "")


def timed(check: Callable[..., CheckResult]) -> Callable[..., CheckResult]:
    """Measures the check and turns an unreachable target into a failed, `unreachable` result."""

    def run(*args: Any, **kwargs: Any) -> CheckResult:
        started = time.monotonic()
        try:
            result = check(*args, **kwargs)
        except TargetUnreachable as exc:
            result = CheckResult(check.__name__.removeprefix("check_"), False, str(exc),
                                 "check that the observer runs and that the URL and port are right", unreachable=True)
        result.duration_s = round(time.monotonic() - started, 3)
        return result

    run.__name__ = check.__name__
    run.__doc__ = check.__doc__
    return run


# -- the observer ----------------------------------------------------------------------------------------


class ObserverClient:
    """HTTP to QuantLab's observer with a timeout on every call and bounded retries with backoff on transient errors."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 5.0, retries: int = 2, backoff: float = 0.2) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    def __repr__(self) -> str:  # the token stays out of reprs, logs and reports
        return f"ObserverClient({self.base_url!r}, token=***)"

    def request(self, method: str, path: str, *, token: str | None = None, authorization: str | None = None) -> httpx.Response:
        """`token=None` sends the configured token, `token=''` no Authorization header; `authorization` sends that header as is."""
        headers: dict[str, str] = {}
        if authorization is not None:
            headers["Authorization"] = authorization
        else:
            bearer = self._token if token is None else token
            if bearer:
                headers["Authorization"] = f"Bearer {bearer}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                response = httpx.request(method, self.base_url + path, headers=headers, timeout=self.timeout)
                if response.status_code not in TRANSIENT_STATUSES or attempt == self.retries:
                    return response
                last = RuntimeError(f"HTTP {response.status_code}")
            except (httpx.ConnectError, httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                last = exc
            time.sleep(self.backoff * (2 ** attempt))
        raise TargetUnreachable(f"the observer at {self.base_url} did not answer {method} {path} "
                                f"after {self.retries + 1} tries ({type(last).__name__}: {last})")

    def json(self, path: str) -> tuple[int, Any]:
        response = self.request("GET", path)
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, response.text[:200]


@timed
def check_observer_auth(client: ObserverClient, fixes: Fixes | None = None) -> CheckResult:
    """Health answers 200 with the token and 401 without it."""
    with_token = client.request("GET", "/observer/health")
    without = client.request("GET", "/observer/health", token="")
    evidence = {"with_token": with_token.status_code, "without_token": without.status_code}
    if with_token.status_code == 200 and without.status_code == 401:
        return CheckResult("observer_auth", True, "health: 200 with the token, 401 without", evidence=evidence)
    item = "failure:observer-unauthorized"
    if with_token.status_code == 401:
        return CheckResult("observer_auth", False, "health answers 401 with the configured token",
                           _fix(fixes, item), item, evidence)
    return CheckResult("observer_auth", False,
                       f"health answered {with_token.status_code} with the token and {without.status_code} without "
                       "(expected 200 and 401)", _fix(fixes, item), item, evidence)


@timed
def check_runs_listing(client: ObserverClient, fixes: Fixes | None = None) -> CheckResult:
    """The runs listing answers 200 with well-formed runs."""
    status, body = client.json("/observer/runs")
    if status != 200:
        item = "failure:observer-unauthorized" if status == 401 else None
        return CheckResult("runs_listing", False, f"/observer/runs answered {status}", _fix(fixes, item or ""), item,
                           {"status": status})
    runs = body.get("runs") if isinstance(body, dict) else None
    if not isinstance(runs, list):
        return CheckResult("runs_listing", False, "/observer/runs has no 'runs' list", evidence={"body": str(body)[:200]})
    bad = [r.get("live_run_id", "?") for r in runs
           if not isinstance(r, dict) or any(k not in r for k in RUN_FIELDS) or r.get("status") not in RUN_STATUSES]
    if bad:
        return CheckResult("runs_listing", False, f"{len(bad)} run(s) lack fields or have an unknown status: {bad[:3]}",
                           evidence={"runs": len(runs)})
    return CheckResult("runs_listing", True, f"{len(runs)} run(s) listed", evidence={
        "runs": len(runs), "running": sum(1 for r in runs if r["status"] == "RUNNING")})


@timed
def check_health_fields(client: ObserverClient, max_event_age_ms: int = 5000, fixes: Fixes | None = None) -> CheckResult:
    """Health has every field; with runs active the feed is connected and fresh."""
    status, body = client.json("/observer/health")
    if status != 200 or not isinstance(body, dict):
        item = "failure:observer-unauthorized" if status == 401 else None
        return CheckResult("health_fields", False, f"/observer/health answered {status}", _fix(fixes, item or ""), item,
                           {"status": status})
    missing = [name for name in HEALTH_FIELDS if name not in body]
    evidence = {name: body.get(name) for name in HEALTH_FIELDS if name != "killed_symbols"}
    if missing:
        return CheckResult("health_fields", False, f"health lacks {missing}", evidence=evidence)
    problems = []
    if body["budget_pressure"] not in PRESSURES:
        problems.append(f"budget_pressure is {body['budget_pressure']!r}, not one of {PRESSURES}")
    if body["budget_pressure"] == "HIGH":
        problems.append("budget_pressure is HIGH: a run is close to a budget stop")
    if isinstance(body["active_runs"], int) and body["active_runs"] > 0:
        if body["ws_connected"] is not True:
            problems.append(f"{body['active_runs']} run(s) active but ws_connected is {body['ws_connected']}")
        age = body["last_event_age_ms"]
        if not isinstance(age, (int, float)) or age > max_event_age_ms:
            problems.append(f"last_event_age_ms is {age} (limit {max_event_age_ms}): the feed is silent")
    if body.get("kill_switch_active"):
        problems.append(f"the kill switch is active ({body.get('kill_switch_reason')})")
    if problems:
        return CheckResult("health_fields", False, "; ".join(problems),
                           "look at the live runs (/observer/runs) and the exchange feed", evidence=evidence)
    return CheckResult("health_fields", True, f"health fields in range ({body['active_runs']} active run(s))",
                       evidence=evidence)


# -- host commands ---------------------------------------------------------------------------------------


@timed
def check_config(run: Runner, timeout: float = 30.0, fixes: Fixes | None = None) -> CheckResult:
    """`node core/release/ConfigCheck.js` exits 0 with its ok line."""
    result = run(("node", "core/release/ConfigCheck.js"), None, timeout)
    ok_line = any(line.get("event") == "config_check" and line.get("status") == "ok" for line in result.json_lines())
    evidence = {"exit_code": result.code, "stderr": _tail(result.stderr)}
    if result.code == 0 and ok_line:
        return CheckResult("config_check", True, "config check ok", evidence=evidence)
    missing = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("[config]") and "required" in line]
    item = "failure:observer-unauthorized" if "OBSERVER_TOKEN" in missing else (
        "failure:s3-archive-unreachable" if any(m.startswith("RUN_ARCHIVE_S3_") for m in missing) else None)
    return CheckResult("config_check", False,
                       f"config check exited {result.code}" + (f": missing {', '.join(missing)}" if missing else ""),
                       _fix(fixes, item or "") or "set the variables it names in the service's env file", item, evidence)


@dataclass
class SelfTestOutcome:
    result: CommandResult
    steps: dict[str, str]
    error: str | None
    failed_step: str | None


def run_self_test(run: Runner, timeout: float = 60.0) -> SelfTestOutcome:
    result = run(("node", "core/release/SelfTest.js"), None, timeout)
    steps = {line["step"]: line.get("status", "") for line in result.json_lines() if line.get("event") == "self_test" and "step" in line}
    errors = [line for line in result.json_lines("stderr") if line.get("event") == "self_test" and line.get("status") == "error"]
    error = errors[-1].get("error") if errors else None
    order = ("s3_reachable", "index_readable", "audit_spool", "observer_auth")
    failed = next((step for step in order if step not in steps), None) if (result.code != 0 or result.timed_out) else None
    return SelfTestOutcome(result, steps, error, failed)


@timed
def check_self_test(run: Runner, timeout: float = 60.0, fixes: Fixes | None = None) -> CheckResult:
    """`node core/release/SelfTest.js` passes every step within the deadline."""
    outcome = run_self_test(run, timeout)
    evidence = {"exit_code": outcome.result.code, "steps": outcome.steps, "duration_s": round(outcome.result.duration_s, 3),
                "timed_out": outcome.result.timed_out}
    if outcome.result.timed_out:
        step = outcome.failed_step or "?"
        return CheckResult("self_test", False, f"self-test hung for {timeout:.0f} s at step {step} and was stopped",
                           _fix(fixes, "failure:s3-archive-unreachable") if step.startswith(("s3", "index")) else "",
                           "failure:s3-archive-unreachable" if step.startswith(("s3", "index")) else None, evidence)
    if outcome.result.code == 0:
        return CheckResult("self_test", True, f"self-test ok ({', '.join(f'{k}={v}' for k, v in outcome.steps.items())})",
                           evidence=evidence)
    step = outcome.failed_step or "?"
    item = "failure:s3-archive-unreachable" if step in ("s3_reachable", "index_readable") else (
        "failure:observer-unauthorized" if step == "observer_auth" else None)
    evidence["error"] = outcome.error
    return CheckResult("self_test", False, f"self-test failed at {step}: {outcome.error}", _fix(fixes, item or ""), item, evidence)


# -- the live canary -------------------------------------------------------------------------------------


@dataclass
class CanaryOutcome:
    result: CommandResult
    line: dict[str, Any] | None
    started_at: datetime
    ended_at: datetime

    @property
    def status(self) -> str | None:
        return self.line.get("status") if self.line else None

    @property
    def run_id(self) -> str | None:
        return self.line.get("live_run_id") if self.line else None

    @property
    def error(self) -> str | None:
        return self.line.get("error") if self.line else None


def canary_argv(runbook_argv: Sequence[str], strategy: str | Path, symbols: Sequence[str] | None = None,
                duration_s: int | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The runbook's canary command with our strategy file (and symbols, duration) put in."""
    argv = list(runbook_argv)
    _set_flag(argv, "--strategy", str(strategy))
    if symbols:
        _set_flag(argv, "--symbols", ",".join(symbols))
    if duration_s is not None:
        _set_flag(argv, "--duration-seconds", str(duration_s))
    return argv + list(extra)


def _set_flag(argv: list[str], flag: str, value: str) -> None:
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]


def run_canary(run: Runner, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> CanaryOutcome:
    started = datetime.now(timezone.utc)
    result = run(argv, env, timeout)
    lines = [line for line in result.json_lines("stdout") + result.json_lines("stderr") if line.get("event") == "canary_live"]
    return CanaryOutcome(result, lines[-1] if lines else None, started, datetime.now(timezone.utc))


@timed
def check_canary_line(outcome: CanaryOutcome, fixes: Fixes | None = None) -> CheckResult:
    """The target's own canary printed PASS and exited 0."""
    evidence = {"exit_code": outcome.result.code, "line": outcome.line, "timed_out": outcome.result.timed_out}
    if outcome.result.timed_out:
        return CheckResult("canary_pass", False, "the canary did not finish before its deadline and was stopped",
                           _fix(fixes, "failure:s3-archive-unreachable"), "failure:s3-archive-unreachable", evidence)
    if outcome.line is None:
        return CheckResult("canary_pass", False, f"the canary printed no canary_live line (exit {outcome.result.code}): "
                           f"{_tail(outcome.result.stderr)}", evidence=evidence)
    if outcome.status == "PASS" and outcome.result.code == 0:
        return CheckResult("canary_pass", True, f"PASS, run {outcome.run_id}", evidence=evidence)
    error = outcome.error or ""
    item = ("failure:live-ws-disabled" if "CORE_LIVE_WS" in error else
            "failure:archive-missing" if "archive" in error.lower() or "RUN_ARCHIVE" in error else None)
    detail = error or f"status {outcome.status}, exit code {outcome.result.code}"
    return CheckResult("canary_pass", False, f"canary FAIL: {detail}", _fix(fixes, item or ""), item, evidence)


@timed
def check_canary_run(outcome: CanaryOutcome, symbols: Sequence[str], decisions: Sequence[dict[str, Any]] | None,
                     run_record: Mapping[str, Any] | None, *, expected_stop_reasons: Iterable[str] = ("STREAM_END",),
                     max_last_event_age_ms: int = 5000, fixes: Fixes | None = None) -> CheckResult:
    """Stricter than QuantLab's tool: every symbol fed the run, it stopped as a canary should, and the feed was fresh."""
    problems = []
    line = outcome.line or {}
    stop_reason = line.get("stop_reason")
    item = None
    if stop_reason not in set(expected_stop_reasons):
        problems.append(f"stop reason {stop_reason} (expected {'/'.join(expected_stop_reasons)})")
        if stop_reason in ("BUDGET_EXCEEDED", "PROMOTION_GUARD_FAIL"):
            item = "failure:budget-guard-stops"
    if not line.get("emitted_event_count"):
        problems.append("the run saw no events: the feed is silent")
    seen = {d.get("decision", {}).get("symbol") for d in decisions or [] if isinstance(d.get("decision"), dict)}
    silent = [s for s in symbols if s.upper() not in {str(x).upper() for x in seen}]
    if decisions is not None and silent:
        problems.append(f"no events from {', '.join(silent)}")
    age = None
    if run_record and run_record.get("last_event_ts"):
        age = _age_ms(run_record["last_event_ts"], outcome.ended_at)
        if age is not None and age > max_last_event_age_ms:
            problems.append(f"last event {age} ms before the verdict (limit {max_last_event_age_ms} ms)")
    evidence = {"stop_reason": stop_reason, "events": line.get("emitted_event_count"), "decisions": line.get("decision_count"),
                "symbols_seen": sorted(str(s) for s in seen if s), "last_event_age_ms": age}
    if problems:
        return CheckResult("canary_run", False, "; ".join(problems), _fix(fixes, item or "") or
                           "look at the exchange feed and the run's audit trail", item, evidence)
    return CheckResult("canary_run", True, f"{line.get('emitted_event_count')} events from every symbol, stop {stop_reason}",
                       evidence=evidence)


def _age_ms(value: Any, now: datetime) -> int | None:
    try:
        if isinstance(value, (int, float)):
            then = datetime.fromtimestamp(value / 1000, timezone.utc)
        else:
            then = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (ValueError, OSError):
        return None
    return int((now - then).total_seconds() * 1000)


# -- archive and audit -----------------------------------------------------------------------------------


def archive_keys(run_id: str) -> list[str]:
    return [f"replay_runs/replay_run_id={run_id}/{name}" for name in ARCHIVE_OBJECTS]


@timed
def check_archive(archive: ArchiveProbe, run_id: str, fixes: Fixes | None = None) -> CheckResult:
    """The run's three archive objects exist (HeadObject)."""
    missing, errors = [], []
    for key in archive_keys(run_id):
        try:
            if archive.head(key) is None:
                missing.append(key)
        except Exception as exc:  # noqa: BLE001 - an S3 error is the finding
            errors.append(f"{key}: {type(exc).__name__}")
    item = "failure:archive-missing"
    if errors:
        return CheckResult("archive", False, f"S3 errors reading the archive: {errors[0]}",
                           _fix(fixes, "failure:s3-archive-unreachable"), "failure:s3-archive-unreachable", {"errors": errors})
    if missing:
        return CheckResult("archive", False, f"{len(missing)} of 3 archive objects missing for run {run_id}",
                           _fix(fixes, item), item, {"missing": missing})
    return CheckResult("archive", True, f"manifest, decisions and stats archived for run {run_id}",
                       evidence={"keys": archive_keys(run_id)})


def audit_entries(spool_dir: Path, run_id: str, days: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Audit entries in the spool whose target_id or metadata.live_run_id is the run id."""
    folders = [spool_dir / f"date={day}" for day in days] if days else sorted(spool_dir.glob("date=*"))
    found = []
    for folder in folders:
        for path in sorted(folder.glob("*.jsonl")):
            for raw in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and (entry.get("target_id") == run_id or
                                                (entry.get("metadata") or {}).get("live_run_id") == run_id):
                    found.append(entry)
    return found


@timed
def check_audit(spool_dir: Path, run_id: str, required_actions: Iterable[str] = ("RUN_START", "RUN_STOP"),
                fixes: Fixes | None = None) -> CheckResult:
    """The run's audit entries are in the local spool."""
    entries = audit_entries(spool_dir, run_id)
    actions = [entry.get("action") for entry in entries]
    missing = [action for action in required_actions if action not in actions]
    if missing:
        return CheckResult("audit", False, f"audit spool {spool_dir} lacks {missing} for run {run_id}",
                           "check AUDIT_ENABLED and AUDIT_SPOOL_DIR of the service", None, {"actions": actions})
    return CheckResult("audit", True, f"{len(entries)} audit entries for run {run_id}", evidence={"actions": actions})


def _tail(text: str, limit: int = 300) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-limit:]


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
    item = "failure:observer-unauthorized"
    return CheckResult("unauthorized", False, f"{what} answered {response.status_code} {str(body)[:120]} "
                       f"(expected {status} {UNAUTHORIZED_BODY})", _fix(fixes, item), item, evidence)


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
                           _fix(None, "failure:archive-missing"), "failure:archive-missing", {"key": key})
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
    item = "failure:budget-guard-stops"
    if not found:
        return CheckResult("limit_audited", False, f"audit spool {spool_dir} has no {action} entry for run {run_id}",
                           _fix(fixes, item), item, evidence)
    if not any(name in wanted for name in named):
        return CheckResult("limit_audited", False, f"run {run_id}'s {action} names {key} {named} (expected one of {list(wanted)})",
                           _fix(fixes, item), item, evidence)
    return CheckResult("limit_audited", True, f"{action} of run {run_id} names {key} {next(n for n in named if n in wanted)}",
                       evidence=evidence)


# -- rate limits (CONTRACT section 3: per client IP and path, checked before auth) ----------------------------

RATE_LIMIT_PER_MIN = 120
STOP_RATE_LIMIT_PER_MIN = 30
TOO_MANY_REQUESTS_STATUS = 429


def too_many_requests_body(limit: int) -> dict[str, str]:
    """The observer's 429 body for a path whose limit is `limit` requests a minute."""
    return {"error": "TOO_MANY_REQUESTS", "message": f"Limit {limit}/min"}
