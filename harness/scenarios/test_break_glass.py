"""Break Glass (Emergency): stop live runs, rotate the observer token, disable live WS ingest.

Each step is done as the runbook words it (its request, its env value, the unit its systemctl command names), and
the effect its title promises is judged by probes with deadlines, with nothing earlier lost. Turning ingest back
on after disabling it is the step's way back, observed too, and a rollback, so a failure halfway leaves nothing
disabled.
"""
from __future__ import annotations

import secrets
import time

import httpx
import pytest

from canary.checks import CheckResult, check_observer_auth
from canary.stops import UNAUTHORIZED_STATUS, check_unauthorized
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.experiment import Action, Experiment, Observation, Probe, Slot, holds
from harness.journal import Journal
from harness.live_probes import Ingest, connection_ids, live_run_setup
from harness.outcomes import DriftFound
from harness.scenarios.test_kill_switch import stop_and_verify
from quantlab_chaos import items
from quantlab_chaos.envfile import EnvFile
from quantlab_chaos.errors import ConfigError
from quantlab_chaos.runbook import BreakGlassStep, Runbook, Source

# How soon a restarted observer must show the rotated token (the restart itself waits until it is ready).
ROTATE_DEADLINE_S = 5.0
# How soon the restarted live runner must refuse to ingest and its old exchange connection close.
DISABLE_DEADLINE_S = 10.0
# After the live runner refused to ingest, how long the fake exchange is watched for a new connection.
QUIET_WINDOW_S = 1.0
RECONNECT_DEADLINE_S = 15.0


def step_or_skip(runbook: Runbook, step_id: str) -> BreakGlassStep:
    try:
        return runbook.break_glass_step(step_id)
    except KeyError as exc:
        raise DriftFound(f"the runbook {runbook.path} has no break-glass step {step_id}: {exc}") from exc


def restarted_role(quantlab: QuantLabEnvironment, step: BreakGlassStep, default: str) -> str:
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


@pytest.mark.runbook(items.STOP_LIVE_RUNS)
def test_stop_live_runs(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    step = step_or_skip(runbook_model, "stop-live-runs")
    if not step.requests:
        pytest.skip(f"{step.source} gives no request to stop a run with")
    stop_and_verify(quantlab, runbook_model, journal, step.requests[0], items.STOP_LIVE_RUNS)


# -- rotate the observer token -------------------------------------------------------------------------------


@pytest.mark.runbook(items.ROTATE_OBSERVER_TOKEN)
def test_rotate_observer_token(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    step = step_or_skip(runbook_model, "rotate-observer-token")
    if not step.ids.env_names:
        pytest.skip(f"{step.source} names no env variable for the token")
    if not runbook_model.health_checks:
        pytest.skip(f"the runbook {runbook_model.path} lists no health-check request to try the tokens with")
    name = step.ids.env_names[0]
    role = restarted_role(quantlab, step, "observer")
    old, new = quantlab.token, secrets.token_urlsafe(24)
    after = f"after '{step.text}'"

    def rotate() -> None:
        quantlab.edit_env(role, set={name: new})
        quantlab.restart(role)

    journal.run(Experiment(
        items.ROTATE_OBSERVER_TOKEN,
        setup=[kit.start(quantlab, role)],
        steady_state=[accepts_its_token(quantlab, role, name, runbook_model.health_checks[0].source),
                      kit.healthy_canary(quantlab, runbook_model)],
        fault=[Action(f"{step.title}: new {name} in the env file of {role}, then restart it", rotate)],
        symptom=[
            Probe("the observer with the new token", lambda: check_observer_auth(kit.observer_client(quantlab, new)),
                  holds(f"{after} the new token is accepted (and no token is refused)", step.source),
                  deadline_s=ROTATE_DEADLINE_S),
            Probe("the runbook's health checks with the new token", lambda: health_checks_with(quantlab, runbook_model,
                                                                                                name, new),
                  holds(f"the runbook's health checks answer 200 with the new token in ${name}", step.source),
                  deadline_s=ROTATE_DEADLINE_S),
            Probe("the runbook's health checks with the old token", lambda: old_token_refused(quantlab, runbook_model,
                                                                                               name, old),
                  holds("the old token is refused once rotated", step.source), deadline_s=ROTATE_DEADLINE_S),
        ],
        symptom_together=True,  # all watch the one restart
        snapshot=kit.snapshot_of(quantlab),
    ))


def accepts_its_token(quantlab: QuantLabEnvironment, role: str, name: str, source: Source) -> Probe:
    """Steady state, before and after the rotation: the observer accepts the token its env file holds now (the
    environment's own where the unit reads no env file), and refuses a request without one."""

    def observe() -> CheckResult:
        env_file = quantlab.wiring(role).env_file
        held = EnvFile.read(env_file).values.get(name) if env_file is not None and env_file.exists() else None
        return check_observer_auth(kit.observer_client(quantlab, held or quantlab.token))

    return Probe("the observer with the token its env file holds", observe,
                 holds("the observer accepts the token its env file holds (and refuses none)", source),
                 blocks=kit.HEALTH_ITEM)


def health_checks_with(quantlab: QuantLabEnvironment, runbook: Runbook, name: str, token: str) -> Observation:
    """Every runbook health check as written, with `token` in $name: true when all answer 200."""
    answers = [kit.send(quantlab, request, shell_env={name: token}) for request in runbook.health_checks]
    return Observation(all(r.status_code == httpx.codes.OK for r in answers),
                       ", ".join(f"{r.request.url.path} {r.status_code}" for r in answers))


def old_token_refused(quantlab: QuantLabEnvironment, runbook: Runbook, name: str, token: str) -> Observation:
    """Every runbook health check as written, with the old `token` in $name: true when all are refused."""
    refused = [check_unauthorized(kit.send(quantlab, request, shell_env={name: token}), unauthorized_status(runbook),
                                  what=f"{request.path} with the old token") for request in runbook.health_checks]
    bad = [r.message for r in refused if not r.ok]
    return Observation(not bad, "; ".join(bad) or "; ".join(r.message for r in refused),
                       {"answers": [r.evidence for r in refused]})


# -- disable live WS ingest ----------------------------------------------------------------------------------


@pytest.mark.runbook(items.DISABLE_LIVE_WS)
def test_disable_live_ws(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    step = step_or_skip(runbook_model, "disable-live-ws")
    disable = step.ids.env()
    if not disable:
        pytest.skip(f"{step.source} names no NAME=value to set")
    role = restarted_role(quantlab, step, kit.LIVE_ROLE)
    if not kit.has_service(quantlab, role):
        raise DriftFound(f"{step.source} restarts the live runner service, but the checkout {quantlab.target.root} "
                         f"has no live runner unit (its units: {', '.join(sorted(quantlab.target.units)) or 'none'})")
    flag = next(iter(disable))
    enable = _enable_value(runbook_model, quantlab, flag)
    settings = " ".join(f"{k}={v}" for k, v in disable.items())
    ingesting: set[int] = set()  # the live runner's open exchange connections when the step is done
    seen: set[int] = set()  # every exchange connection so far: a new one after the step is the runner ingesting
    since = Slot[float]("when the live runner was restarted with ingest disabled")
    stops = f"after '{step.text}' live ingest stops"

    def disable_ingest() -> None:
        ingesting.update(connection_ids(quantlab, open_only=True))
        seen.update(connection_ids(quantlab))
        quantlab.edit_env(role, set=disable)
        since.set(time.time())
        # systemctl restart: stop, then start without failing when the service exits at once (it should refuse).
        quantlab.stop(role)
        quantlab.start(role, check=False)

    def enable_ingest() -> None:
        quantlab.edit_env(role, set={flag: enable})
        quantlab.stop(role)  # also cancels the pending Restart=on-failure, so no RestartSec wait
        quantlab.start(role)

    def reconnected() -> Observation:
        new = connection_ids(quantlab, open_only=True) - seen
        return Observation(bool(new), f"{len(new)} new exchange connection(s) from the live runner")

    journal.run(Experiment(
        items.DISABLE_LIVE_WS,
        setup=live_run_setup(journal, quantlab, runbook_model, Ingest()),
        steady_state=[runner_connected(quantlab, step.source)],
        fault=[Action(f"{step.title}: {settings} in the env file of {role}, then restart it", disable_ingest)],
        symptom=[
            Probe("the restarted live runner", lambda: _refusal(quantlab, runbook_model, role, since.value, seen),
                  holds(f"{stops} (the restarted live runner refuses to ingest)", step.source),
                  deadline_s=DISABLE_DEADLINE_S),
            Probe("the fake exchange", lambda: _old_connections_closed(quantlab, ingesting),
                  holds(f"{stops} (the runner's exchange connection closes)", step.source),
                  deadline_s=DISABLE_DEADLINE_S),
            Probe("the fake exchange", lambda: _no_new_connection(quantlab, seen),
                  holds(f"{stops} (no new exchange connection for {QUIET_WINDOW_S:g} s)", step.source)),
            Probe("/observer/health", lambda: _feed_off(quantlab),
                  holds(f"{stops} (health says ws_connected false)", step.source), deadline_s=DISABLE_DEADLINE_S),
        ],
        fix=[Action(f"re-enable: {flag}={enable} in the env file of {role}, then restart it", enable_ingest)],
        recovery=[Probe("the fake exchange", reconnected,
                        holds(f"with {flag}={enable} again the live runner connects", step.source),
                        deadline_s=RECONNECT_DEADLINE_S)],
        rollbacks=[Action(f"{flag}={enable} back in the env file of {role}",
                          lambda: quantlab.edit_env(role, set={flag: enable}))],
        snapshot=kit.snapshot_of(quantlab),
    ))


def runner_connected(quantlab: QuantLabEnvironment, source: Source) -> Probe:
    """Before the step and again after ingest is back on: the live runner holds an exchange connection."""

    def observe() -> Observation:
        held = connection_ids(quantlab, open_only=True)
        return Observation(bool(held), f"the fake exchange has {len(held)} open connection(s)")

    return Probe("the fake exchange", observe, holds("the live runner holds an exchange connection", source))


def _enable_value(runbook: Runbook, quantlab: QuantLabEnvironment, flag: str) -> str:
    """The value that turns ingest back on: the runbook's live-ws fix, else what the env file had before."""
    try:
        value = runbook.failure("live-ws-disabled").fix_ids.env().get(flag)
    except KeyError:
        value = None
    return value or quantlab.quantlab_env().get(flag, "1")


def _refusal(quantlab: QuantLabEnvironment, runbook: Runbook, role: str, since: float, seen: set[int]) -> Observation:
    """The restarted runner refused to ingest: it logged the runbook's code for that (or, when the runbook names
    none, it exited). A new exchange connection shows it did not, for good."""
    try:
        code: str | None = runbook.failure("live-ws-disabled").symptom_ids.codes[0]
    except (KeyError, IndexError):
        code = None
    status = quantlab.status(role)
    refused = (any(code in line for line in quantlab.supervisor.logs(role, since=since)) if code is not None
               else not status.active)
    new = connection_ids(quantlab) - seen
    said = f"logged {code}" if code is not None else "exited"
    seen_text = (f"the live runner {'has' if refused else 'has not'} {said}; new connections: {len(new)}; "
                 f"unit {status.active_state} ({status.sub_state}), {status.n_restarts} restart(s)")
    return Observation(refused and not new, seen_text, {"new_connections": len(new)}, final=bool(new))


def _old_connections_closed(quantlab: QuantLabEnvironment, ingesting: set[int]) -> Observation:
    still = ingesting & connection_ids(quantlab, open_only=True)
    return Observation(bool(ingesting) and not still,
                       f"{len(still)} of the runner's {len(ingesting)} exchange connection(s) still open")


def _no_new_connection(quantlab: QuantLabEnvironment, seen: set[int]) -> Observation:
    """Absence, watched for a short window: any new exchange connection in it is the runner ingesting."""
    time.sleep(QUIET_WINDOW_S)
    new = connection_ids(quantlab) - seen
    return Observation(not new, f"new connections: {len(new)} in {QUIET_WINDOW_S:g} s", final=True)


def _feed_off(quantlab: QuantLabEnvironment) -> Observation:
    """The observer's own account, one more observation: its health says the feed is not connected."""
    status, health = kit.observer_client(quantlab).json("/observer/health")
    feed = health.get("ws_connected") if isinstance(health, dict) else None
    return Observation(feed is False, f"/observer/health answered {status}, ws_connected {feed}")
