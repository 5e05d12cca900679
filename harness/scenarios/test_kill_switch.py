"""Kill-Switch (Live Run Stop).

The runbook: its stop request, with a live run's id filled in, stops that run; a run id the observer does not
know is refused. "The run stops" is proven from outside, each within its own deadline: the fake exchange sees the
run's connections close, the process carrying the run ends (a background canary), RUN_STOP with the manual-stop
reason is in the audit spool while the live run is still up, and the archive manifest names that reason. The
observer's listing saying the run stopped is one more observation.
"""
from __future__ import annotations

import uuid

import httpx
import pytest

from canary.checks import CheckResult
from canary.stops import MANUAL_STOP, check_manifest_stop_reason, check_stop_answer, check_stop_audited, check_unknown_run
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.experiment import Action, Experiment, Probe, Slot, holds
from harness.journal import Journal
from harness.live_probes import (
    FINISH_DEADLINE_S,
    STOP_DEADLINE_S,
    Ingest,
    carrier_ends,
    listed_stopped,
    live_run_setup,
    stops_taking_events,
    taking_events,
)
from quantlab_chaos import items
from quantlab_chaos.runbook import HttpRequest, Runbook

ITEM = items.KILL_SWITCH


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
