"""Kill-Switch (Live Run Stop).

The runbook: its stop request, with a live run's id filled in, stops that run; a run id the observer does not
know is refused. "The run stops" is proven from outside, each within its own deadline: the fake exchange sees the
run's connections close, the process carrying the run ends (a background canary), RUN_STOP with the manual-stop
reason is in the audit spool while the live run is still up, and the archive manifest names that reason. The
observer's listing saying the run stopped is one more observation.

The live-run pieces here (a healthy canary first, the live run and its exchange connections, the run stopping)
are shared by the break-glass, observer-unauthorized and health-check scenarios.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import httpx
import pytest

from canary.checks import (
    MANUAL_STOP, CheckResult, check_manifest_stop_reason, check_stop_answer, check_stop_audited, check_unknown_run,
    find_run,
)
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.experiment import Action, Experiment, Observation, Probe, Slot, holds
from harness.journal import Journal
from harness.runbook import HttpRequest, Runbook, Source

ITEM = "kill-switch"
# How soon a stopped run must be seen ended; QuantLab's own promise (CONTRACT section 9) is one second.
STOP_DEADLINE_S = 2.0
# A stopped run still writes its archive before its process exits.
FINISH_DEADLINE_S = 15.0


# -- a live run, proven from outside ---------------------------------------------------------------------------


@dataclass
class Ingest:
    """The live run the setup started, and the exchange connections it opened: the ones its stop must close."""

    live: Slot[kit.LiveRun] = field(default_factory=lambda: Slot("the live run the setup started"))
    connections: set[int] = field(default_factory=set)

    @property
    def run_id(self) -> str:
        return self.live.value.run_id


def connection_ids(env: QuantLabEnvironment, *, open_only: bool = False) -> set[int]:
    record = env.exchange.record()
    return {c.id for c in (record.open_connections if open_only else record.connections)}


def live_run_setup(journal: Journal, env: QuantLabEnvironment, runbook: Runbook, ingest: Ingest) -> list[Action | Probe]:
    """Setup: the observer started, a healthy canary (judged before the live run that needs what it proves, so a
    canary that fails blocks on the canary item), then a live run (left by the rollbacks) whose new exchange
    connections are noted. The canary is not re-checked: the scenario ends the live run on purpose."""
    entering = kit.enter_live_run(journal, env, runbook, ingest.live)

    def enter() -> None:
        before = connection_ids(env)
        entering.run()
        ingest.connections.update(connection_ids(env, open_only=True) - before)

    return [kit.start(env, "observer"), kit.healthy_canary(env, runbook, recheck=False), Action(entering.name, enter)]


def taking_events(env: QuantLabEnvironment, ingest: Ingest, source: Source | None) -> Probe:
    """Steady state, seen by the fake exchange: the live run holds its connections open. Not checked again after
    the scenario stopped the run on purpose."""

    def observe() -> Observation:
        record = env.exchange.record()
        held = [c for c in record.open_connections if c.id in ingest.connections]
        return Observation(bool(held), f"the fake exchange has {len(held)} open connection(s) from live run "
                           f"{ingest.run_id}, {sum(c.frames_sent for c in held)} frame(s) sent on them",
                           {"connections": sorted(ingest.connections)})

    return Probe("the fake exchange", observe, holds("a live run takes events from the exchange", source),
                 recheck=False)


def stops_taking_events(env: QuantLabEnvironment, ingest: Ingest, says: str, source: Source | None) -> Probe:
    """The run's exchange connections, opened when it started, are all closed."""

    def observe() -> Observation:
        still = ingest.connections & connection_ids(env, open_only=True)
        seen = (f"live run {ingest.run_id} still holds {len(still)} of its {len(ingest.connections)} exchange "
                "connection(s) open" if still else f"all {len(ingest.connections)} exchange connection(s) of live run "
                f"{ingest.run_id} are closed")
        return Observation(not still, seen, {"open": sorted(still)})

    return Probe("the fake exchange", observe, holds(says, source), deadline_s=STOP_DEADLINE_S)


def carrier_ends(ingest: Ingest, says: str, source: Source | None) -> Probe:
    """The background canary that carries the run has exited."""

    def observe() -> Observation:
        process = ingest.live.value.process
        code = process.poll() if process is not None else None
        return Observation(code is not None, f"the background canary carrying live run {ingest.run_id} "
                           + ("is still running" if code is None else f"exited {code}"))

    return Probe("the background canary carrying the run", observe, holds(says, source), deadline_s=FINISH_DEADLINE_S)


def listed_stopped(env: QuantLabEnvironment, journal: Journal, ingest: Ingest, sent: Slot[float], says: str,
                   source: Source | None) -> Probe:
    """/observer/runs lists the run ended with the manual-stop reason (the observer's own account)."""
    client = kit.observer_client(env)

    def observe() -> Observation:
        run = find_run(client, ingest.run_id)
        if run is None:
            return Observation(False, f"run {ingest.run_id} is not listed in /observer/runs")
        status, reason = run.get("status"), run.get("stop_reason")
        if status == "RUNNING":
            return Observation(False, f"run {ingest.run_id} still RUNNING in /observer/runs", {"status": status})
        journal.measure("stop_to_ended_s", round(kit.now() - sent.value, 3))
        return Observation(reason == MANUAL_STOP, f"run {ingest.run_id} {status} with stop reason {reason}",
                           {"status": status, "stop_reason": reason}, final=True)

    # Every 0.1 s, as the canary's own stop check polls: the listing is rate limited per client.
    return Probe("/observer/runs", observe, holds(says, source), deadline_s=STOP_DEADLINE_S, interval_s=0.1)


def stop_of(env: QuantLabEnvironment, request: HttpRequest, ingest: Ingest, answer: Slot[httpx.Response],
            sent: Slot[float]) -> Action:
    """The runbook's stop request with <live_run_id> = the live run, as written (kit.send); its answer is kept."""

    def run() -> None:
        sent.set(kit.now())
        answer.set(kit.send(env, request, live_run_id=ingest.run_id))

    return Action(f"{request.method} {request.path} with <live_run_id> = the live run", run)


# -- the kill switch -----------------------------------------------------------------------------------------


def stop_and_verify(quantlab: QuantLabEnvironment, runbook: Runbook, journal: Journal, request: HttpRequest,
                    title: str) -> None:
    """A live run, stopped with `request` (a runbook stop line): it stops, seen from outside and by the observer."""
    ingest, answer, sent = Ingest(), Slot[httpx.Response]("the stop request's answer"), Slot[float]("the stop")
    source = request.source
    # kit.live_run carries the run in a background canary exactly when the target has no live runner unit.
    background = not kit.has_service(quantlab, kit.LIVE_ROLE)

    def unknown_refused() -> CheckResult:
        return check_unknown_run(kit.send(quantlab, request, live_run_id=str(uuid.uuid4())))

    journal.run(Experiment(
        title,
        setup=live_run_setup(journal, quantlab, runbook, ingest),
        steady_state=[taking_events(quantlab, ingest, source)],
        checks=[Probe("the stop request with a run id nobody started", unknown_refused,
                      holds(f"'{request.text}' with a run id nobody started is refused", source))],
        fault=[stop_of(quantlab, request, ingest, answer, sent)],
        symptom=[
            Probe("the stop request's answer", lambda: check_stop_answer(answer.value, ingest.run_id),
                  holds(f"'{request.text}' accepts the stop of a live run", source)),
            stops_taking_events(quantlab, ingest, f"the run stops within {STOP_DEADLINE_S:.0f} s: it takes no more "
                                "events (its exchange connections close)", source),
            *([carrier_ends(ingest, f"the run stops: the process carrying it ends within {FINISH_DEADLINE_S:.0f} s",
                            source)] if background else []),
            Probe("the audit spool", lambda: check_stop_audited(quantlab.audit_dir, ingest.run_id, MANUAL_STOP),
                  holds(f"the stop is audited and RUN_STOP has {MANUAL_STOP}", source), deadline_s=FINISH_DEADLINE_S),
            listed_stopped(quantlab, journal, ingest, sent,
                           f"the run stops with {MANUAL_STOP} within {STOP_DEADLINE_S:.0f} s", source),
            Probe("the archive", lambda: check_manifest_stop_reason(quantlab.bucket, ingest.run_id, MANUAL_STOP),
                  holds(f"the stopped run's archive manifest has {MANUAL_STOP}", source), deadline_s=FINISH_DEADLINE_S),
        ],
        symptom_together=True,  # every promise is timed from the one stop
        snapshot=kit.snapshot_of(quantlab),
    ))


@pytest.mark.runbook(ITEM)
def test_kill_switch_stops_live_run(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    if runbook_model.kill_switch is None:
        pytest.skip(f"the runbook {runbook_model.path} has no kill-switch request")
    stop_and_verify(quantlab, runbook_model, journal, runbook_model.kill_switch, ITEM)
