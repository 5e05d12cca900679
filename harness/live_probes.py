"""A live run for a scenario, and what proves from outside that it runs and that it stopped.

Shared by the kill-switch, break-glass, observer-unauthorized and health-check scenarios: a healthy canary first
(judged before the live run that needs what it proves), the live run and the exchange connections it opened, and
probes that watch those connections, the process carrying the run and the observer's listing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from canary.stops import MANUAL_STOP, find_run
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.experiment import Action, Observation, Probe, Slot, holds
from harness.journal import Journal
from quantlab_chaos.runbook import Runbook, Source

# How soon a stopped run must be seen ended; QuantLab's own promise (CONTRACT section 9) is one second.
STOP_DEADLINE_S = 2.0
# A stopped run still writes its archive before its process exits.
FINISH_DEADLINE_S = 15.0


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
