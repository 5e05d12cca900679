"""Health Checks: the observer API requests.

The runbook: each health-check request, run as written (method, path, the bearer header with $OBSERVER_TOKEN
from the environment), answers with the documented JSON, whether the host is idle or a live run is ingesting.
Only the host and port are the test's own observer.
"""
from __future__ import annotations

from typing import Any

import httpx
import pytest

from canary.checks import CheckResult, ObserverClient, check_health_fields, check_observer_auth, check_runs_listing
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.journal import Journal
from harness.runbook import HttpRequest, Runbook

ITEM = "health-checks"
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


def check_requests(journal: Journal, quantlab: QuantLabEnvironment, runbook: Runbook, state: str) -> dict[str, Any]:
    """Every runbook health check as written: 200, a JSON object, the documented fields. Returns the bodies by kind."""
    client = kit.observer_client(quantlab)
    bodies: dict[str, Any] = {}
    for request in runbook.health_checks:
        response, body = answer(quantlab, request)
        ok = response.status_code == httpx.codes.OK and isinstance(body, dict)
        journal.expect(ok, expected=f"'{request.text}' answers 200 with a JSON object ({state})",
                       actual=f"{request.method} {request.path} answered {response.status_code} "
                              f"{str(body if body is not None else response.text)[:120]}"
                              + ("" if ok else f"; {kit.observer_facts(quantlab, request.method, request.path)}"),
                       source=request.source, evidence={"status": response.status_code})
        documented = shape(client, request)
        if documented is not None:
            journal.expect(documented.ok, expected=f"{request.path} has the documented fields ({state})",
                           actual=documented.message, source=request.source, evidence=documented.evidence)
        bodies[kind(request) or request.path] = body
    return bodies


def note_port_drift(journal: Journal, quantlab: QuantLabEnvironment, runbook: Runbook) -> None:
    """The runbook's port against the observer unit's own OBSERVER_PORT: a difference is reported, not hidden."""
    spec = quantlab.wiring("observer").spec
    unit_port = spec.env_dict.get("OBSERVER_PORT") if spec else None
    for request in runbook.health_checks:
        if unit_port and unit_port != str(request.port):
            journal.finding("observer port differs from the runbook",
                            f"{request.source} uses port {request.port}; the observer unit sets OBSERVER_PORT={unit_port}")
            return


@pytest.mark.runbook(ITEM)
def test_health_checks_idle_and_live(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    if not runbook_model.health_checks:
        pytest.skip(f"the runbook {runbook_model.path} lists no observer health-check requests")
    first = runbook_model.health_checks[0]
    source = {kind(r) or r.path: r.source for r in reversed(runbook_model.health_checks)}

    with journal.steady_state("the observer unit started; nothing running", needs="start-stop"):
        quantlab.start("observer")
    note_port_drift(journal, quantlab, runbook_model)
    idle = check_requests(journal, quantlab, runbook_model, "idle")
    if HEALTH in idle:
        journal.expect(idle[HEALTH].get("active_runs") == 0, expected="idle: health reports no active run",
                       actual=f"active_runs is {idle[HEALTH].get('active_runs')}", source=source[HEALTH])
    auth = check_observer_auth(kit.observer_client(quantlab))
    journal.expect(auth.ok, expected="the observer routes want the bearer token", actual=auth.message,
                   source=first.source, evidence=auth.evidence)

    with journal.steady_state("a healthy canary archived and audited", needs="canary"):
        _, before = kit.baseline(quantlab, runbook_model)

    with kit.live_run(quantlab, runbook_model) as live:
        with journal.step("method", f"a live run ingesting ({live.via}), run {live.run_id}"):
            bodies = check_requests(journal, quantlab, runbook_model, "a live run ingesting")
        if HEALTH in bodies:
            health = bodies[HEALTH]
            journal.expect(health.get("active_runs", 0) >= 1 and health.get("ws_connected") is True,
                           expected="while a live run ingests, health counts it and ws_connected is true",
                           actual=f"active_runs {health.get('active_runs')}, ws_connected {health.get('ws_connected')}",
                           source=source[HEALTH], evidence={"health": health})
        if RUNS in bodies:
            listed = {r.get("live_run_id"): r.get("status") for r in bodies[RUNS].get("runs", []) if isinstance(r, dict)}
            journal.expect(listed.get(live.run_id) == "RUNNING", expected="the live run is listed as RUNNING",
                           actual=f"run {live.run_id} is {listed.get(live.run_id, 'not listed')}",
                           source=source[RUNS], evidence={"runs": len(listed)})
    journal.nothing_lost(before, kit.now_snapshot(quantlab))
