"""What runbook scenarios share: running the runbook's canary in an environment, and the canary's checks."""
from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from canary.checks import (
    CanaryOutcome,
    CheckResult,
    ObserverClient,
    Runner,
    TargetUnreachable,
    audit_entries,
    canary_argv,
    check_archive,
    check_audit,
    check_canary_line,
    run_canary,
)
from canary.process import CommandResult
from canary.stops import find_run
from harness import reaper
from harness.environment import QuantLabEnvironment
from harness.experiment import Action, Observation, Probe, Slot, command_observation, holds
from harness.journal import Journal, RunbookViolation, Snapshot, snapshot, violation
from harness.outcomes import SteadyStateNotReached
from quantlab_chaos import items, procgroup, tls
from quantlab_chaos.errors import HarnessError
from quantlab_chaos.runbook import HttpRequest, Runbook
from quantlab_chaos.waiting import wait_until

DEFAULT_SYMBOLS = ("BTCUSDT", "ETHUSDT")
CANARY_ITEM, HEALTH_ITEM, START_STOP_ITEM = items.CANARY, items.HEALTH_CHECKS, items.START_STOP
NATURAL_END = "STREAM_END"  # CONTRACT section 6: a run that reaches its duration
now = time.monotonic  # the clock observations are timed with (Observation.at)


def runner(env: QuantLabEnvironment) -> Runner:
    """The canary checks' command runner, backed by the environment (its env, its checkout)."""

    def run(argv: Sequence[str], extra_env: Mapping[str, str] | None, timeout: float) -> CommandResult:
        return env.run_command(argv, env=extra_env, timeout=timeout)

    return run


def canary(env: QuantLabEnvironment, runbook: Runbook, *, seconds: int = 2, strategy: str = "steady",
           symbols: Sequence[str] | None = None, extra: Sequence[str] = (), extra_env: Mapping[str, str] | None = None,
           timeout: float = 60.0) -> CanaryOutcome:
    """The runbook's canary command as written, with a harness strategy file and a short duration."""
    if runbook.canary is None:
        raise AssertionError(f"the runbook {runbook.path} has no canary command")
    argv = canary_argv(runbook.canary.argv, env.strategy(strategy), symbols, seconds, extra)
    return run_canary(runner(env), argv, timeout, extra_env)


def canary_checks(env: QuantLabEnvironment, outcome: CanaryOutcome) -> list[CheckResult]:
    """The runbook's three expectations of a canary: PASS line, archive in S3, audit in the local spool."""
    results = [check_canary_line(outcome)]
    if outcome.run_id:
        results.append(check_archive(env.bucket, outcome.run_id))
        results.append(check_audit(env.audit_dir, outcome.run_id))
    return results


def failed(results: Sequence[CheckResult]) -> list[str]:
    return [f"{r.name}: {r.message}" for r in results if not r.ok]


def canary_problems(env: QuantLabEnvironment, outcome: CanaryOutcome, *, natural_end: bool) -> list[str]:
    """What is wrong with a canary run that should be healthy: its three runbook checks, and (natural_end) a stop
    other than the run's natural end, with the guard or budget the audit trail names."""
    problems = failed(canary_checks(env, outcome))
    if natural_end and outcome.line and outcome.line.get("stop_reason") != NATURAL_END:
        why = [f"{e.get('action')} {e.get('reason')}" for e in audit_entries(env.audit_dir, outcome.run_id or "")
               if e.get("action") in ("GUARD_FAIL", "BUDGET_EXCEEDED")]
        problems.append(f"the run stopped with {outcome.line.get('stop_reason')}, not {NATURAL_END} "
                        f"({'; '.join(why) or 'no guard or budget entry in the audit'}; "
                        f"{outcome.line.get('emitted_event_count')} events, {outcome.line.get('decision_count')} decisions)")
    return problems


def canary_observation(env: QuantLabEnvironment, outcome: CanaryOutcome, started: float, *,
                       natural_end: bool = False) -> Observation:
    """A finished (or killed) canary as an observation: true when it is healthy (its problems are the evidence)."""
    problems = canary_problems(env, outcome, natural_end=natural_end)
    seen = f"canary {outcome.status} (exit {outcome.result.code}); " + ("; ".join(problems) if problems else "all checks pass")
    return command_observation(outcome.result, not problems, seen, {**evidence(outcome), "problems": problems},
                               started=started)


# -- experiment parts the scenarios share ---------------------------------------------------------------------


def start(env: QuantLabEnvironment, role: str = "observer") -> Action:
    """Setup: the unit of `role` started (a unit that does not start blocks on start-stop)."""
    unit = env.wiring(role).unit_path.name if role in env.services else role
    return Action(f"systemctl start {unit}", lambda: env.start(role), blocks=START_STOP_ITEM)


def healthy_canary(env: QuantLabEnvironment, runbook: Runbook, *, recheck: bool = True, **options: Any) -> Probe:
    """Steady state: the runbook's canary command as written (harness strategy, short run) passes its three checks
    and ends at its natural end. Not holding blocks on the canary item."""
    source = runbook.canary.source if runbook.canary is not None else None

    def observe() -> Observation:
        started = now()
        return canary_observation(env, canary(env, runbook, **options), started, natural_end=True)

    return Probe("the runbook's canary command (harness strategy)", observe,
                 holds("a canary run passes, archived and audited, and ends at its natural end", source),
                 blocks=CANARY_ITEM, recheck=recheck)


def snapshot_of(env: QuantLabEnvironment) -> Callable[[], Snapshot]:
    """What the target has written (audit spool, archive), for the experiment's nothing-lost comparison."""
    return lambda: now_snapshot(env)


def enter_live_run(journal: Journal, env: QuantLabEnvironment, runbook: Runbook, slot: Slot[LiveRun],
                   **options: Any) -> Action:
    """Setup: a live run seen RUNNING with events (see live_run), left by the experiment's rollbacks."""
    return Action("a live run ingesting, listed RUNNING by the observer",
                  lambda: slot.set(journal.enter(live_run(env, runbook, **options))))


def evidence(outcome: CanaryOutcome) -> dict[str, Any]:
    return {"exit_code": outcome.result.code, "line": outcome.line, "duration_s": round(outcome.result.duration_s, 3)}


def now_snapshot(env: QuantLabEnvironment) -> Snapshot:
    return snapshot(env.audit_dir, env.bucket)


# -- live runs and the runbook's observer requests (added for the observer scenarios) -----------------------

LIVE_ROLE = "live"


@dataclass
class LiveRun:
    """A live run in progress: its id, and whether the live runner unit or a background canary carries it."""

    run_id: str
    via: str  # "unit" or "canary"
    process: subprocess.Popen[bytes] | None = None


def observer_client(env: QuantLabEnvironment, token: str | None = None) -> ObserverClient:
    """The canary checks' observer client for this environment (its token unless `token` is given)."""
    return ObserverClient(env.observer_url, env.token if token is None else token, timeout=5.0, retries=1)


class ObserverUnanswered(RunbookViolation):
    """A runbook request to the observer got no HTTP answer at the runbook's host and port. Before any fault that
    blocks the scenario on the health-checks item, which proves the observer answers there."""

    blocks_item = HEALTH_ITEM


def send(env: QuantLabEnvironment, request: HttpRequest, *, shell_env: Mapping[str, str] | None = None,
         timeout: float = 5.0, **placeholders: str) -> httpx.Response:
    """A runbook curl request as written (method, path, headers with $VARS expanded from `shell_env`, by default
    the observer's env), sent to the runbook's host and port (inside this environment's network namespace).
    No answer at all is a RunbookViolation that says where the observer unit listens instead."""
    __tracebackhide__ = True  # its arguments and locals hold the bearer token: never in a traceback
    values = env.service_env("observer") if shell_env is None else shell_env
    path = request.url_for("", **placeholders)
    try:
        # token="": only the headers the runbook writes are sent.
        return env.observer(request.method, path, token="", headers=request.header_values(values), timeout=timeout)
    except TargetUnreachable as exc:
        raise ObserverUnanswered(str(violation(
            request.source, f"`{request.text}` gets an answer from the observer",
            f"{exc}; "
            f"{observer_facts(env, request.method, path)}"))) from None


def observer_facts(env: QuantLabEnvironment, method: str = "GET", path: str = "/observer/health") -> str:
    """Where the observer unit listens, and what the same request answers there: the evidence beside a runbook
    request that went unanswered or answered unexpectedly."""
    wiring = env.wiring("observer")
    configured = (f"configured with {wiring.role.port_env}={wiring.port} by its "
                  f"{'own Environment=' if wiring.port_source == 'unit' else 'env file'}" if wiring.port else
                  "configured with no port")
    seen = env.listening_ports("observer")
    facts = f"the observer unit {wiring.unit_path.name} is {configured} and listens on {seen or 'no port'}"
    for port in seen[:2]:
        url = f"http://127.0.0.1:{port}{path}"
        try:
            answer = httpx.request(method, url, headers={"Authorization": f"Bearer {env.token}"}, timeout=3.0,
                                   verify=tls.context())
            facts += f"; there {method} {path} with the token answers {answer.status_code}"
        except httpx.TransportError as exc:
            facts += f"; there {method} {path} got no answer ({type(exc).__name__})"
    return facts


# Services whose env file holds the archive settings, most relevant first: the file an operator loads to run the
# canary or the self-test on the host.
ARCHIVING_SERVICES = ("live", "observer")


def archiving_env_file(env: QuantLabEnvironment) -> tuple[str, Path] | None:
    """(service, env file) of the first archiving service whose unit has an EnvironmentFile=, or None."""
    for service in ARCHIVING_SERVICES:
        try:
            wiring = env.wiring(service)
        except HarnessError:
            continue
        if wiring.env_file is not None:
            return service, wiring.env_file
    return None


def has_service(env: QuantLabEnvironment, role: str) -> bool:
    """Whether the target has a usable unit for `role` (e.g. no live runner unit in some checkouts)."""
    wiring = env.services.get(role)
    return wiring is not None and wiring.error is None and wiring.spec is not None


def running_ids(client: ObserverClient) -> set[str]:
    status, body = client.json("/observer/runs")
    runs = body.get("runs") if status == 200 and isinstance(body, dict) else None
    return {r["live_run_id"] for r in runs or [] if isinstance(r, dict) and r.get("status") == "RUNNING"}


@contextmanager
def live_run(env: QuantLabEnvironment, runbook: Runbook, *, seconds: int = 30, strategy: str = "steady",
             timeout: float = 20.0) -> Iterator[LiveRun]:
    """A live run seen RUNNING in /observer/runs with events arriving (the observer must be up): the target's live
    runner unit, or, when the target has none, the runbook's canary with `seconds` in the background. Stopped on exit."""
    client = observer_client(env)
    before = running_ids(client)
    process = None
    if has_service(env, LIVE_ROLE):
        _no_chance_guards(env)
        env.start(LIVE_ROLE)
    else:
        process = _spawn_canary(env, runbook, seconds, strategy)
    try:
        try:
            new = wait_until(lambda: running_ids(client) - before, timeout=timeout, interval=0.1,
                             what="a new RUNNING run in /observer/runs")
            run_id = sorted(new)[0]
            wait_until(lambda: (find_run(client, run_id) or {}).get("last_event_ts"), timeout=timeout, interval=0.2,
                       what=f"events reaching live run {run_id} (last_event_ts in /observer/runs)")
        except TimeoutError as exc:
            raise _no_live_run(env, client, process, exc) from exc
        yield LiveRun(run_id, "canary" if process else "unit", process)
    finally:
        if process is None:
            env.stop(LIVE_ROLE)
        else:
            stop_group(process)


# The per-event money guards judge the strategy's luck: the target's own live strategy may lose three times in a
# row on a random walk, which stops the run as PROMOTION_GUARD_FAIL before the scenario stops it (a soak found it).
# The scenarios that use live_run prove the observer, the kill switch and break-glass, not the guards
# (test_failure_budget_guard_stops does), so the run they need is one that only they end.
CHANCE_GUARDS_OFF = {"PROMOTION_GUARD_LOSS_STREAK_ENABLED": "0", "PROMOTION_GUARD_MAX_LOSS_ENABLED": "0"}


def _no_live_run(env: QuantLabEnvironment, client: ObserverClient, process: subprocess.Popen[bytes] | None,
                 exc: TimeoutError) -> SteadyStateNotReached:
    """Why no live run could be had, named by the runbook item whose own failure explains it."""
    try:
        status, body = client.json("/observer/runs")
    except TargetUnreachable as unreachable:
        return SteadyStateNotReached(f"a live run listed by the observer: {unreachable}; {observer_facts(env, 'GET', '/observer/runs')}",
                                     blocked_by=HEALTH_ITEM)
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("runs"), list):
        return SteadyStateNotReached(f"a live run listed by the observer: GET {client.base_url}/observer/runs "
                                     f"answered {status} {str(body)[:120]}", blocked_by=HEALTH_ITEM)
    if process is not None and process.poll() is not None:
        log = (env.workdir / "background-canary.log").read_text(errors="replace")
        said = [line for line in log.splitlines() if '"canary_live"' in line or "error" in line.lower()][-1:]
        return SteadyStateNotReached(f"a live run: the runbook's canary, started to carry one, exited "
                                     f"{process.returncode} before its run was listed ({' '.join(said) or 'no output'})",
                                     blocked_by=CANARY_ITEM)
    if process is None:
        state = env.status(LIVE_ROLE)
        if not state.active:
            return SteadyStateNotReached(f"a live run: the live runner unit is {state.active_state} ({state.message})",
                                         blocked_by=START_STOP_ITEM)
    carrier = "the background canary" if process is not None else "the live runner unit"
    return SteadyStateNotReached(f"a live run with events listed by the observer: {carrier} runs, but {exc}; "
                                 f"the observer lists {len(body['runs'])} run(s)", blocked_by=HEALTH_ITEM)


def _no_chance_guards(env: QuantLabEnvironment) -> None:
    if env.wiring(LIVE_ROLE).env_file is not None:
        env.edit_env(LIVE_ROLE, set=CHANCE_GUARDS_OFF)


def _spawn_canary(env: QuantLabEnvironment, runbook: Runbook, seconds: int, strategy: str) -> subprocess.Popen[bytes]:
    if runbook.canary is None:
        raise AssertionError(f"the runbook {runbook.path} has no canary command to start a live run with")
    argv = canary_argv(runbook.canary.argv, env.strategy(strategy), None, seconds)
    # The same environment as QuantLabEnvironment.run_command, but the process runs in the background.
    full_env = env.command_env(CHANCE_GUARDS_OFF)
    log = env.workdir / "background-canary.log"
    with log.open("ab") as out:
        process = subprocess.Popen(argv, cwd=env.target.root, env=reaper.child_env(full_env), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    reaper.watch(process.pid)
    return process


def stop_group(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group (the run ends as a manual stop), SIGKILL it after `grace` seconds."""
    try:
        procgroup.stop(process, grace)
    finally:
        if process.poll() is not None:
            reaper.forget(process.pid)
