"""Health Checks: the observer API requests.

The runbook: each health-check request, run as written (method, path, the bearer header with $OBSERVER_TOKEN
from the environment), answers with the documented JSON, whether the host is idle or a live run is ingesting.
Only the host and port are the test's own observer. Idle and ingesting are seen from outside first (the fake
exchange has no connection, or the live run's), then the answers are judged as checks.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import httpx
import pytest

from canary.checks import CheckResult, ObserverClient, check_health_fields, check_observer_auth, check_runs_listing
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.experiment import Experiment, Observation, Probe, holds
from harness.journal import Journal
from harness.live_probes import Ingest, connection_ids, live_run_setup, taking_events
from quantlab_chaos import items
from quantlab_chaos.runbook import HttpRequest, Runbook, Source

ITEM = items.HEALTH_CHECKS
HEALTH, RUNS = "health", "runs"


def kind(request: HttpRequest) -> str | None:
    """Which documented answer a runbook request gets: the health body, the runs listing, or neither."""
    last = request.path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return last if last in (HEALTH, RUNS) else None


def shape(client: ObserverClient, request: HttpRequest) -> CheckResult | None:
    """The canary check of the documented fields for this request's answer (None when nothing is documented)."""
    if kind(request) == HEALTH:
        return check_health_fields(client)
    if kind(request) == RUNS:
        return check_runs_listing(client)
    return None


def answer(quantlab: QuantLabEnvironment, request: HttpRequest) -> tuple[httpx.Response, Any]:
    response = kit.send(quantlab, request)
    try:
        return response, response.json()
    except ValueError:
        return response, None


def requests_answered(quantlab: QuantLabEnvironment, runbook: Runbook, state: str) -> list[Probe]:
    """Every runbook health check as written: 200 with a JSON object, and the documented fields. A request nothing
    answers at the runbook's port (kit.send) is an observation that does not hold."""
    client = kit.observer_client(quantlab)

    def answered(request: HttpRequest) -> Observation:
        response, body = answer(quantlab, request)
        ok = response.status_code == httpx.codes.OK and isinstance(body, dict)
        seen = (f"{request.method} {request.path} answered {response.status_code} "
                f"{str(body if body is not None else response.text)[:120]}")
        return Observation(ok, seen if ok else f"{seen}; {kit.observer_facts(quantlab, request.method, request.path)}",
                           {"status": response.status_code})

    probes = []
    for request in runbook.health_checks:
        probes.append(Probe(f"`{request.text}`", partial(answered, request),
                            holds(f"{request.path} answers 200 with a JSON object ({state})", request.source)))
        if kind(request) is not None:
            probes.append(Probe(f"the fields of {request.path}", partial(shape, client, request),
                                holds(f"{request.path} has the documented fields ({state})", request.source)))
    return probes


def body_of(quantlab: QuantLabEnvironment, request: HttpRequest) -> dict[str, Any]:
    """The JSON object a runbook request answers (an empty one when it answers something else)."""
    _, body = answer(quantlab, request)
    return body if isinstance(body, dict) else {}


def note_port_drift(journal: Journal, quantlab: QuantLabEnvironment, runbook: Runbook) -> None:
    """The runbook's port against the observer unit's own OBSERVER_PORT: a difference is reported, not hidden."""
    spec = quantlab.wiring("observer").spec
    unit_port = spec.env_dict.get("OBSERVER_PORT") if spec else None
    for request in runbook.health_checks:
        if unit_port and unit_port != str(request.port):
            journal.finding("observer port differs from the runbook",
                            f"{request.source} uses port {request.port}; the observer unit sets OBSERVER_PORT={unit_port}")
            return


def by_kind(runbook: Runbook) -> dict[str, HttpRequest]:
    """The first runbook request of each kind (health, runs)."""
    found: dict[str, HttpRequest] = {}
    for request in runbook.health_checks:
        found.setdefault(kind(request) or request.path, request)
    return found


def idle_host(quantlab: QuantLabEnvironment, source: Source) -> Probe:
    """Steady state, from outside: no run holds an exchange connection."""

    def observe() -> Observation:
        held = connection_ids(quantlab, open_only=True)
        return Observation(not held, f"the fake exchange has {len(held)} open connection(s)")

    return Probe("the fake exchange", observe, holds("the host is idle: nothing ingests from the exchange", source))


@pytest.mark.runbook(ITEM)
def test_health_checks_idle(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    if not runbook_model.health_checks:
        pytest.skip(f"the runbook {runbook_model.path} lists no observer health-check requests")
    first, requests = runbook_model.health_checks[0], by_kind(runbook_model)
    note_port_drift(journal, quantlab, runbook_model)
    idle = []
    if HEALTH in requests:
        health = requests[HEALTH]

        def none_active() -> Observation:
            active = body_of(quantlab, health).get("active_runs")
            return Observation(active == 0, f"active_runs is {active}")

        idle.append(Probe("the health answer", none_active, holds("idle: health reports no active run", health.source)))

    journal.run(Experiment(
        f"{ITEM} (idle)",
        setup=[kit.start(quantlab, "observer")],
        steady_state=[idle_host(quantlab, first.source)],
        checks=[*requests_answered(quantlab, runbook_model, "idle"), *idle,
                Probe("the observer", lambda: check_observer_auth(kit.observer_client(quantlab)),
                      holds("the observer routes want the bearer token", first.source))],
    ))


@pytest.mark.runbook(ITEM)
def test_health_checks_while_a_live_run_ingests(quantlab: QuantLabEnvironment, runbook_model: Runbook,
                                                journal: Journal) -> None:
    if not runbook_model.health_checks:
        pytest.skip(f"the runbook {runbook_model.path} lists no observer health-check requests")
    requests, ingest = by_kind(runbook_model), Ingest()
    live = []
    if HEALTH in requests:
        health = requests[HEALTH]

        def counted() -> Observation:
            body = body_of(quantlab, health)
            return Observation(body.get("active_runs", 0) >= 1 and body.get("ws_connected") is True,
                               f"active_runs {body.get('active_runs')}, ws_connected {body.get('ws_connected')}",
                               {"health": body})

        live.append(Probe("the health answer", counted, holds(
            "while a live run ingests, health counts it and ws_connected is true", health.source)))
    if RUNS in requests:
        runs = requests[RUNS]

        def listed() -> Observation:
            found = {r.get("live_run_id"): r.get("status") for r in body_of(quantlab, runs).get("runs", [])
                     if isinstance(r, dict)}
            return Observation(found.get(ingest.run_id) == "RUNNING",
                               f"run {ingest.run_id} is {found.get(ingest.run_id, 'not listed')}", {"runs": len(found)})

        live.append(Probe("the runs answer", listed, holds("the live run is listed as RUNNING", runs.source)))

    journal.run(Experiment(
        f"{ITEM} (a live run ingesting)",
        setup=live_run_setup(journal, quantlab, runbook_model, ingest),
        steady_state=[taking_events(quantlab, ingest, runbook_model.health_checks[0].source)],
        checks=[*requests_answered(quantlab, runbook_model, "a live run ingesting"), *live],
        snapshot=kit.snapshot_of(quantlab),
    ))
