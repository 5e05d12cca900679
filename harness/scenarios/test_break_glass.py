"""Break Glass (Emergency): stop live runs, rotate the observer token, disable live WS ingest.

Each step is done as the runbook words it (its request, its env value, the unit its systemctl command names)
and must have the effect its title promises, with nothing earlier lost.
"""
from __future__ import annotations

import secrets
import time

import httpx
import pytest

from canary.checks import UNAUTHORIZED_STATUS, check_observer_auth, check_unauthorized
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.errors import ConfigError
from harness.journal import Journal
from harness.ports import eventually
from harness.outcomes import DriftFound
from harness.runbook import BreakGlassStep, Runbook
from harness.scenarios.test_kill_switch import stop_and_verify

# After the live runner refused to ingest, how long the fake exchange is watched for a new connection.
QUIET_WINDOW_S = 1.0
RECONNECT_DEADLINE_S = 15.0


def step_or_skip(runbook: Runbook, step_id: str) -> BreakGlassStep:
    try:
        return runbook.break_glass_step(step_id)
    except KeyError as exc:
        raise DriftFound(f"the runbook {runbook.path} has no break-glass step {step_id}: {exc}") from exc


def restarted_role(quantlab: QuantLabEnvironment, journal: Journal, step: BreakGlassStep, default: str) -> str:
    """The service the step's `systemctl restart` names, or `default` when the step names none."""
    unit = next((command.unit for command in step.systemctl if command.action == "restart"), None)
    if unit is None:
        return default
    try:
        return quantlab.target.role(unit).role
    except ConfigError as exc:
        raise DriftFound(f"{step.source} restarts {unit}, but the checkout {quantlab.target.root} has no unit file "
                         f"for it ({exc})") from exc


def unauthorized_status(runbook: Runbook) -> int:
    """The refusal status the runbook documents (its unauthorized failure), else QuantLab's own."""
    try:
        return runbook.failure("observer-unauthorized").symptom_ids.http_statuses[0]
    except (KeyError, IndexError):
        return UNAUTHORIZED_STATUS


@pytest.mark.runbook("break-glass:stop-live-runs")
def test_stop_live_runs(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    step = step_or_skip(runbook_model, "stop-live-runs")
    if not step.requests:
        pytest.skip(f"{step.source} gives no request to stop a run with")
    stop_and_verify(quantlab, runbook_model, journal, step.requests[0])


@pytest.mark.runbook("break-glass:rotate-observer-token")
def test_rotate_observer_token(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    step = step_or_skip(runbook_model, "rotate-observer-token")
    if not step.ids.env_names:
        pytest.skip(f"{step.source} names no env variable for the token")
    if not runbook_model.health_checks:
        pytest.skip(f"the runbook {runbook_model.path} lists no health-check request to try the tokens with")
    name = step.ids.env_names[0]
    role = restarted_role(quantlab, journal, step, "observer")
    old, new = quantlab.token, secrets.token_urlsafe(24)

    with journal.steady_state("observer up, answering the runbook's requests with the old token", needs="health-checks"):
        quantlab.start(role)
        accepted = check_observer_auth(kit.observer_client(quantlab, old))
        journal.expect(accepted.ok, expected="the observer accepts the token its env file holds (and refuses none)",
                       actual=accepted.message, source=runbook_model.health_checks[0].source,
                       evidence=accepted.evidence)
    with journal.steady_state("a healthy canary archived and audited", needs="canary"):
        _, before = kit.baseline(quantlab, runbook_model)
    with journal.step("method", f"{step.title}: new {name} in the env file of {role}, then restart it"):
        quantlab.edit_env(role, set={name: new})
        quantlab.restart(role)

    with_new = check_observer_auth(kit.observer_client(quantlab, new))
    journal.expect(with_new.ok, expected=f"after '{step.text}' the new token is accepted (and no token is refused)",
                   actual=with_new.message, source=step.source, evidence=with_new.evidence)
    checks = [kit.send(quantlab, request, shell_env={name: new}) for request in runbook_model.health_checks]
    journal.expect(all(r.status_code == httpx.codes.OK for r in checks),
                   expected="the runbook's health checks answer 200 with the new token in $" + name,
                   actual=", ".join(f"{r.request.url.path} {r.status_code}" for r in checks), source=step.source)
    refused = [check_unauthorized(kit.send(quantlab, request, shell_env={name: old}), unauthorized_status(runbook_model),
                                  what=f"{request.path} with the old token") for request in runbook_model.health_checks]
    journal.expect(all(r.ok for r in refused), expected="the old token is refused once rotated",
                   actual="; ".join(r.message for r in refused if not r.ok), source=step.source,
                   evidence={"answers": [r.evidence for r in refused]})
    journal.nothing_lost(before, kit.now_snapshot(quantlab))


@pytest.mark.runbook("break-glass:disable-live-ws")
def test_disable_live_ws(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    step = step_or_skip(runbook_model, "disable-live-ws")
    disable = step.ids.env()
    if not disable:
        pytest.skip(f"{step.source} names no NAME=value to set")
    role = restarted_role(quantlab, journal, step, kit.LIVE_ROLE)
    if not kit.has_service(quantlab, role):
        raise DriftFound(f"{step.source} restarts the live runner service, but the checkout {quantlab.target.root} "
                         f"has no live runner unit (its units: {', '.join(sorted(quantlab.target.units)) or 'none'})")
    flag = next(iter(disable))
    enable = _enable_value(runbook_model, quantlab, flag)

    with journal.steady_state("observer up; a healthy canary archived and audited", needs="canary"):
        quantlab.start("observer")
        _, before = kit.baseline(quantlab, runbook_model)
    with kit.live_run(quantlab, runbook_model) as live:
        ingesting = {c.id for c in quantlab.exchange.record().open_connections}
        seen = {c.id for c in quantlab.exchange.record().connections}
        journal.expect(bool(ingesting), expected="the live runner holds an exchange connection before the step",
                       actual=f"run {live.run_id} has none open", source=step.source)

        settings = " ".join(f"{k}={v}" for k, v in disable.items())
        with journal.step("method", f"{step.title}: {settings} in the env file of {role}, then restart it"):
            quantlab.edit_env(role, set=disable)
            since = time.time()
            _restart_tolerating_refusal(quantlab, role)
        refused = _refused(quantlab, runbook_model, role, since, seen)
        closed = eventually(lambda: not ingesting & {c.id for c in quantlab.exchange.record().open_connections},
                            timeout=10)
        # Absence is watched for a short window; a new connection ends the wait early (and fails the step).
        eventually(lambda: {c.id for c in quantlab.exchange.record().connections} - seen, timeout=QUIET_WINDOW_S)
        new = {c.id for c in quantlab.exchange.record().connections} - seen
        status = quantlab.status(role)
        _, health = kit.observer_client(quantlab).json("/observer/health")
        feed = health.get("ws_connected") if isinstance(health, dict) else None
        journal.expect(refused and closed and not new and feed is False,
                       expected=f"after '{step.text}' live ingest stops",
                       actual=f"runner refused: {refused}; old connection closed: {closed}; new connections: {len(new)}; "
                              f"health ws_connected: {feed}",
                       source=step.source, evidence={"unit": f"{status.active_state} ({status.sub_state})",
                                                     "restarts": status.n_restarts})

        with journal.step("method", f"re-enable: {flag}={enable} in the env file of {role}, then restart it"):
            quantlab.edit_env(role, set={flag: enable})
            quantlab.stop(role)  # also cancels the pending Restart=on-failure, so no RestartSec wait
            quantlab.start(role)
        back = eventually(lambda: {c.id for c in quantlab.exchange.record().open_connections} - seen,
                          timeout=RECONNECT_DEADLINE_S)
        journal.expect(back, expected=f"with {flag}={enable} again the live runner connects",
                       actual="no new exchange connection", source=step.source)
    journal.nothing_lost(before, kit.now_snapshot(quantlab))


def _enable_value(runbook: Runbook, quantlab: QuantLabEnvironment, flag: str) -> str:
    """The value that turns ingest back on: the runbook's live-ws fix, else what the env file had before."""
    try:
        value = runbook.failure("live-ws-disabled").fix_ids.env().get(flag)
    except KeyError:
        value = None
    return value or quantlab.quantlab_env().get(flag, "1")


def _restart_tolerating_refusal(quantlab: QuantLabEnvironment, role: str) -> None:
    """systemctl restart: stop, then start without failing when the service exits at once (it should refuse)."""
    quantlab.stop(role)
    quantlab.start(role, check=False)


def _refused(quantlab: QuantLabEnvironment, runbook: Runbook, role: str, since: float, seen: set[int]) -> bool:
    """Waits until the restarted runner refused to ingest (it logged the runbook's code for that, or, when the
    runbook names none, it exited) or a new exchange connection shows it did not; True when it refused."""
    try:
        code: str | None = runbook.failure("live-ws-disabled").symptom_ids.codes[0]
    except (KeyError, IndexError):
        code = None

    def refused() -> bool:
        if code is not None:
            return any(code in line for line in quantlab.supervisor.logs(role, since=since))
        return not quantlab.status(role).active

    eventually(lambda: refused() or {c.id for c in quantlab.exchange.record().connections} - seen, timeout=10)
    return refused()
