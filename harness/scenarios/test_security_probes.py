"""Security probes of the target (no runbook item: CONTRACT section 3 and whatever the services listen on).

Every long-running service of the target is booted from its unit file with a live run going. Then:
- every observer route (health, runs, stop of the live run and of an unknown run; GET and POST) asked without a
  token, with a wrong one, with the token in the query string, with a lowercase scheme, a bare token or an empty
  bearer must answer 401, and the refused stops must leave the live run running;
- a burst beyond the stop-path limit (30/min) and beyond the general limit (120/min) must end in 429 with the
  contract's body, before auth, on that path only;
- every listening port of every service's process tree is asked GET / and GET /health without credentials; what
  it serves is reported (a finding when a non-health route serves data), not failed.
The probes, findings and failures go into summary.json's `security` block.
"""
from __future__ import annotations

import json
import uuid

import allure
import httpx
import pytest

from canary.stops import RATE_LIMIT_PER_MIN, STOP_RATE_LIMIT_PER_MIN, TOO_MANY_REQUESTS_STATUS, find_run
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.reporting import SECURITY_PROPERTY
from harness.secrets_scan import SecretSet
from harness.security import (
    PROBE_TIMEOUT_S,
    SecurityReport,
    is_loopback,
    listening_sockets,
    probe_after_limit,
    probe_observer_auth,
    probe_open_port,
    probe_rate_limit,
)
from quantlab_chaos import tls
from quantlab_chaos.errors import HarnessError
from quantlab_chaos.runbook import Runbook

pytestmark = pytest.mark.security

OBSERVER = "observer"
HEALTH = "/observer/health"
RUNS = "/observer/runs"


def stop_path(run_id: str) -> str:
    return f"/observer/runs/{run_id}/stop"


def start_services(quantlab: QuantLabEnvironment, report: SecurityReport) -> list[str]:
    """Every long-running service but the live runner (kit.live_run starts it); the observer must come up."""
    started = []
    for role, wiring in quantlab.services.items():
        if role == kit.LIVE_ROLE or wiring.spec is None or wiring.spec.type == "oneshot":
            continue
        try:
            quantlab.start(role)
            started.append(role)
        except HarnessError as exc:
            if role == OBSERVER:
                raise
            report.finding(f"{role} did not start, so it was not probed", str(exc)[:300], "info")
    return started


def service_pids(quantlab: QuantLabEnvironment, roles: list[str], live: kit.LiveRun) -> dict[str, int]:
    pids = {role: quantlab.status(role).main_pid for role in roles}
    if live.via == "unit":
        pids[kit.LIVE_ROLE] = quantlab.status(kit.LIVE_ROLE).main_pid
    elif live.process is not None:
        pids["live (canary)"] = live.process.pid
    return {role: pid for role, pid in pids.items() if pid}


def probe_observer(client: httpx.Client, report: SecurityReport, quantlab: QuantLabEnvironment, run_id: str) -> None:
    base, port, token = quantlab.observer_url, quantlab.port(OBSERVER), quantlab.token
    routes = [HEALTH, RUNS, stop_path(run_id), stop_path(str(uuid.uuid4()))]
    with allure.step(f"observer routes without a valid bearer header: {len(routes)} routes x GET/POST"):
        probe_observer_auth(client, report, base, port, routes, token)
    run = find_run(kit.observer_client(quantlab), run_id)
    if run is None or run.get("status") != "RUNNING":
        report.fail(f"the refused stop requests stopped live run {run_id}: it is now "
                    f"{'not listed' if run is None else run.get('status')} ({(run or {}).get('stop_reason')})")

    flooded_stop = stop_path(str(uuid.uuid4()))
    with allure.step(f"burst beyond the stop-path limit ({STOP_RATE_LIMIT_PER_MIN}/min)"):
        probe_rate_limit(client, report, base, port, "POST", flooded_stop, STOP_RATE_LIMIT_PER_MIN, "stop-path limit")
        probe_after_limit(client, report, base, port, "POST", flooded_stop, token, TOO_MANY_REQUESTS_STATUS,
                          "the limit is checked before auth: the token does not lift it")
    flooded_other = f"/observer/probe-{uuid.uuid4().hex[:12]}"
    with allure.step(f"burst beyond the general limit ({RATE_LIMIT_PER_MIN}/min)"):
        probe_rate_limit(client, report, base, port, "GET", flooded_other, RATE_LIMIT_PER_MIN, "general limit")
    probe_after_limit(client, report, base, port, "GET", HEALTH, token, httpx.codes.OK,
                      "the limit is per path: other paths are still served")


def probe_ports(client: httpx.Client, report: SecurityReport, pids: dict[str, int]) -> None:
    for role, pid in pids.items():
        sockets = listening_sockets([pid])
        report.ports[role] = [{"address": address, "port": port, "loopback_only": is_loopback(address)}
                              for address, port in sockets]
        for address, port in sockets:
            with allure.step(f"{role}: GET / and /health on {address}:{port} without credentials"):
                probe_open_port(client, report, role, address, port)


def test_security_probes(quantlab: QuantLabEnvironment, runbook_model: Runbook, request: pytest.FixtureRequest) -> None:
    report = SecurityReport(secrets=SecretSet(quantlab.secrets()))
    try:
        roles = start_services(quantlab, report)
        with kit.live_run(quantlab, runbook_model) as live, httpx.Client(timeout=PROBE_TIMEOUT_S, verify=tls.context()) as client:
            pids = service_pids(quantlab, roles, live)
            probe_observer(client, report, quantlab, live.run_id)
            probe_ports(client, report, pids)
        if not report.ports.get(OBSERVER):
            report.fail(f"no listening socket found in the observer's process tree (pid {pids.get(OBSERVER)}), "
                        f"though it answers on port {quantlab.port(OBSERVER)}")
    finally:
        # Recorded even when booting failed half way, so the summary shows what was probed.
        data = report.to_dict()
        request.node.user_properties.append((SECURITY_PROPERTY, json.dumps(data)))
        allure.attach(json.dumps(data, indent=2), name="security probes", attachment_type=allure.attachment_type.JSON)
    assert not report.failures, f"{len(report.failures)} security probe(s) failed:\n" + "\n".join(report.failures)
