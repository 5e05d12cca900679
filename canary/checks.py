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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import httpx

from canary.process import CommandResult
from quantlab_chaos import items, tls

HEALTH_FIELDS = ("active_runs", "ws_connected", "last_event_age_ms", "budget_pressure",
                 "kill_switch_active", "kill_switch_reason", "killed_symbols")
RUN_FIELDS = ("live_run_id", "strategy_id", "status", "started_at", "last_event_ts", "stop_reason", "budget_pressure")
RUN_STATUSES = ("RUNNING", "STOPPED", "ERROR")
PRESSURES = ("LOW", "MED", "HIGH")
ARCHIVE_OBJECTS = items.ARCHIVE_OBJECTS
TRANSIENT_STATUSES = (502, 503, 504)



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


def _fix(fixes: Fixes | None, item: str | None) -> str:
    return items.fix_for(item, fixes)


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
                response = httpx.request(method, self.base_url + path, headers=headers, timeout=self.timeout,
                                         verify=tls.context())
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
    item = items.OBSERVER_UNAUTHORIZED
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
        item = items.item_for([str(status)])
        return CheckResult("runs_listing", False, f"/observer/runs answered {status}", _fix(fixes, item), item,
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
        item = items.item_for([str(status)])
        return CheckResult("health_fields", False, f"/observer/health answered {status}", _fix(fixes, item), item,
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
    item = items.item_for(missing)
    return CheckResult("config_check", False,
                       f"config check exited {result.code}" + (f": missing {', '.join(missing)}" if missing else ""),
                       _fix(fixes, item) or "set the variables it names in the service's env file", item, evidence)


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
    evidence: dict[str, Any] = {"exit_code": outcome.result.code, "steps": outcome.steps,
                                "duration_s": round(outcome.result.duration_s, 3),
                                "timed_out": outcome.result.timed_out}
    if outcome.result.timed_out:
        step = outcome.failed_step or "?"
        item = items.item_for([step])  # the step it hung at: the first one that never reported
        return CheckResult("self_test", False, f"self-test hung for {timeout:.0f} s at step {step} and was stopped",
                           _fix(fixes, item), item, evidence)
    if outcome.result.code == 0:
        return CheckResult("self_test", True, f"self-test ok ({', '.join(f'{k}={v}' for k, v in outcome.steps.items())})",
                           evidence=evidence)
    step = outcome.failed_step or "?"
    item = items.item_for([step])
    evidence["error"] = outcome.error
    return CheckResult("self_test", False, f"self-test failed at {step}: {outcome.error}", _fix(fixes, item), item, evidence)


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
    started = datetime.now(UTC)
    result = run(argv, env, timeout)
    lines = [line for line in result.json_lines("stdout") + result.json_lines("stderr") if line.get("event") == "canary_live"]
    return CanaryOutcome(result, lines[-1] if lines else None, started, datetime.now(UTC))


@timed
def check_canary_line(outcome: CanaryOutcome, fixes: Fixes | None = None) -> CheckResult:
    """The target's own canary printed PASS and exited 0."""
    evidence = {"exit_code": outcome.result.code, "line": outcome.line, "timed_out": outcome.result.timed_out}
    if outcome.result.timed_out:
        # A hang names no item: nothing the canary reported says which failure it is.
        return CheckResult("canary_pass", False, "the canary did not finish before its deadline and was stopped; run "
                           "it by hand and see where it waits", evidence=evidence)
    if outcome.line is None:
        return CheckResult("canary_pass", False, f"the canary printed no canary_live line (exit {outcome.result.code}): "
                           f"{_tail(outcome.result.stderr)}", evidence=evidence)
    if outcome.status == "PASS" and outcome.result.code == 0:
        return CheckResult("canary_pass", True, f"PASS, run {outcome.run_id}", evidence=evidence)
    error = outcome.error or ""
    item = items.item_for_message(error)  # the line has no field but the message
    detail = error or f"status {outcome.status}, exit code {outcome.result.code}"
    return CheckResult("canary_pass", False, f"canary FAIL: {detail}", _fix(fixes, item), item, evidence)


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
        item = items.item_for([str(stop_reason)])
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
        return CheckResult("canary_run", False, "; ".join(problems), _fix(fixes, item) or
                           "look at the exchange feed and the run's audit trail", item, evidence)
    return CheckResult("canary_run", True, f"{line.get('emitted_event_count')} events from every symbol, stop {stop_reason}",
                       evidence=evidence)


def _age_ms(value: Any, now: datetime) -> int | None:
    try:
        if isinstance(value, (int, float)):
            then = datetime.fromtimestamp(value / 1000, UTC)
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
    item = items.ARCHIVE_MISSING
    if errors:
        return CheckResult("archive", False, f"S3 errors reading the archive: {errors[0]}",
                           _fix(fixes, items.S3_ARCHIVE_UNREACHABLE), items.S3_ARCHIVE_UNREACHABLE, {"errors": errors})
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
