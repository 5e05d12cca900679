"""Most Common Failures: Observer API unauthorized.

The runbook: the health and stop endpoints answer the status its symptom names; the fix is to set the env
value its fix names and send it in the header form its fix gives. Injected two ways: clients that send the
token wrongly (or not at all), and an observer started without its token.
"""
from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode

import httpx
import pytest

from canary.checks import (
    MANUAL_STOP, CheckResult, check_observer_auth, check_run_stopped, check_runs_listing, check_stop_answer,
    check_unauthorized, find_run,
)
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.journal import Journal
from harness.runbook import Failure, Runbook

ITEM = "failure:observer-unauthorized"
TOKEN_PLACEHOLDER = "<token>"
# Where a misconfigured client might put the token instead of the header.
QUERY_NAMES = ("token", "access_token")


@dataclass(frozen=True)
class Endpoint:
    label: str
    method: str
    path: str


@dataclass(frozen=True)
class ClientMistake:
    name: str
    headers: dict[str, str] = field(repr=False)  # they hold the token: kept out of reprs and tracebacks
    query: str = field(default="", repr=False)


def header_form(failure: Failure) -> tuple[str, str]:
    """The header the fix prescribes, as (name, value template), e.g. ('Authorization', 'Bearer <token>')."""
    for literal in failure.fix_ids.other_literals + failure.fix_ids.paths:
        name, colon, value = literal.partition(":")
        if colon and TOKEN_PLACEHOLDER in value and name.strip() and " " not in name.strip():
            return name.strip(), value.strip()
    raise AssertionError(f"{failure.fix_source}\n  names no header like `Authorization: Bearer {TOKEN_PLACEHOLDER}`; "
                         "the scenario cannot tell how the fix wants the token sent")


def symptom_status(failure: Failure) -> int:
    """The HTTP status the symptom names (e.g. 401)."""
    if not failure.symptom_ids.http_statuses:
        raise AssertionError(f"{failure.symptom_source}\n  names no HTTP status; the scenario cannot tell what to expect")
    return failure.symptom_ids.http_statuses[0]


def prescribed(failure: Failure, token: str) -> dict[str, str]:
    name, template = header_form(failure)
    return {name: template.replace(TOKEN_PLACEHOLDER, token)}


def endpoints(runbook: Runbook, run_id: str, unknown_id: str) -> list[Endpoint]:
    """The runbook's observer requests: its health checks, and its stop request for a live run and an unknown id."""
    found = [Endpoint(request.path, request.method, request.path) for request in runbook.health_checks]
    if runbook.kill_switch is not None:
        stop = runbook.kill_switch
        found.append(Endpoint("stop (live run)", stop.method, stop.url_for("", live_run_id=run_id)))
        found.append(Endpoint("stop (unknown run)", stop.method, stop.url_for("", live_run_id=unknown_id)))
    return found


def client_mistakes(failure: Failure, token: str) -> list[ClientMistake]:
    name, template = header_form(failure)
    scheme = template.replace(TOKEN_PLACEHOLDER, "")
    mistakes = [
        ClientMistake("no token", {}),
        ClientMistake("a wrong token", {name: template.replace(TOKEN_PLACEHOLDER, secrets.token_urlsafe(24))}),
        ClientMistake("the token in the query string", {}, "?" + urlencode({q: token for q in QUERY_NAMES})),
    ]
    if scheme.strip():
        mistakes.insert(2, ClientMistake(f"the raw token without `{scheme.strip()}`", {name: token}))
    return mistakes


def refusals(quantlab: QuantLabEnvironment, targets: list[Endpoint], headers: Mapping[str, str], query: str,
             status: int) -> list[CheckResult]:
    """Each endpoint requested with these headers and query; each result says whether it was refused as documented."""
    results = []
    for endpoint in targets:
        what = f"{endpoint.method} {endpoint.label}"
        try:
            response = quantlab.observer(endpoint.method, endpoint.path + query, token="", headers=headers)
        except httpx.HTTPError as exc:  # its message may quote the URL, which can hold the token: name the type only
            results.append(CheckResult("unauthorized", False, f"{what} got no answer ({type(exc).__name__})"))
            continue
        results.append(check_unauthorized(response, status, what=what))
    return results


def expect_refused(journal: Journal, failure: Failure, how: str, results: list[CheckResult]) -> None:
    bad = [r.message for r in results if not r.ok]
    journal.symptom(not bad, expected=f"Symptom: {failure.symptom} (client sends {how})",
                    actual=f"with {how}: " + "; ".join(bad), source=failure.symptom_source,
                    evidence={"how": how, "answers": [r.evidence for r in results]})


def expect_still_running(journal: Journal, quantlab: QuantLabEnvironment, failure: Failure, run_id: str) -> None:
    """The refused stop requests did not stop the live run (read once the observer answers again)."""
    run = find_run(kit.observer_client(quantlab), run_id)
    seen = "not listed in /observer/runs" if run is None else f"{run.get('status')} ({run.get('stop_reason')})"
    journal.expect(run is not None and run.get("status") == "RUNNING",
                   expected=f"a refused stop ({failure.symptom}) leaves the live run running",
                   actual=f"after the refused stops, run {run_id} is {seen}", source=failure.symptom_source)


def apply_fix(quantlab: QuantLabEnvironment, failure: Failure) -> None:
    """The fix as worded: the token set in the observer's env file (the observer restarted to read it)."""
    name = failure.fix_ids.env_names[0] if failure.fix_ids.env_names else None
    if name is None:
        raise AssertionError(f"{failure.fix_source}\n  names no env variable to set")
    quantlab.edit_env("observer", set={name: quantlab.token})
    quantlab.restart("observer")


def expect_recovered(journal: Journal, quantlab: QuantLabEnvironment, runbook: Runbook, failure: Failure,
                     run_id: str) -> None:
    """With the prescribed header: health and runs answer 200, and the stop endpoint stops the live run."""
    headers = prescribed(failure, quantlab.token)
    problems = []
    for request in runbook.health_checks:
        response = quantlab.observer(request.method, request.path, token="", headers=headers)
        if response.status_code != httpx.codes.OK:
            problems.append(f"{request.method} {request.path} answered {response.status_code}")
    client = kit.observer_client(quantlab)
    checks = [check_observer_auth(client), check_runs_listing(client)]
    if runbook.kill_switch is not None:
        stop = runbook.kill_switch
        answer = quantlab.observer(stop.method, stop.url_for("", live_run_id=run_id), token="", headers=headers)
        checks += [check_stop_answer(answer, run_id), check_run_stopped(client, run_id, MANUAL_STOP)]
    problems += [f"{c.name}: {c.message}" for c in checks if not c.ok]
    journal.recovered(not problems, expected=f"after '{failure.fix}': 200 on health and runs, and the stop works",
                      actual="; ".join(problems) or "ok", source=failure.fix_source,
                      evidence={c.name: c.evidence for c in checks})


@pytest.mark.runbook(ITEM)
def test_clients_without_a_valid_bearer_header(quantlab: QuantLabEnvironment, runbook_model: Runbook,
                                               journal: Journal) -> None:
    failure = runbook_model.failure("observer-unauthorized")
    status = symptom_status(failure)

    with journal.steady_state("observer up with its token; a healthy canary archived and audited; a live run"):
        quantlab.start("observer")
        _, before = kit.baseline(quantlab, runbook_model)
    with kit.live_run(quantlab, runbook_model) as live:
        targets = endpoints(runbook_model, live.run_id, str(uuid.uuid4()))
        mistakes = client_mistakes(failure, quantlab.token)
        with journal.inject("clients send " + ", ".join(m.name for m in mistakes)):
            answers = {m.name: refusals(quantlab, targets, m.headers, m.query, status) for m in mistakes}
        for how, results in answers.items():
            expect_refused(journal, failure, how, results)

        with journal.fix(f"Fix: {failure.fix}"):
            apply_fix(quantlab, failure)
        expect_still_running(journal, quantlab, failure, live.run_id)
        expect_recovered(journal, quantlab, runbook_model, failure, live.run_id)
    journal.nothing_lost(before, kit.now_snapshot(quantlab))


@pytest.mark.runbook(ITEM)
def test_observer_started_without_token(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    failure = runbook_model.failure("observer-unauthorized")
    status = symptom_status(failure)
    name = failure.fix_ids.env_names[0]

    with journal.steady_state("observer up with its token; a healthy canary archived and audited; a live run"):
        quantlab.start("observer")
        _, before = kit.baseline(quantlab, runbook_model)
    with kit.live_run(quantlab, runbook_model) as live:
        with journal.inject(f"{name} removed from the observer's env file, then the observer restarted"):
            quantlab.edit_env("observer", unset=[name])
            quantlab.restart("observer")
        targets = endpoints(runbook_model, live.run_id, str(uuid.uuid4()))
        results = refusals(quantlab, targets, prescribed(failure, quantlab.token), "", status)
        expect_refused(journal, failure, "the right header to an observer without a token", results)

        with journal.fix(f"Fix: {failure.fix}"):
            apply_fix(quantlab, failure)
        expect_still_running(journal, quantlab, failure, live.run_id)
        expect_recovered(journal, quantlab, runbook_model, failure, live.run_id)
    journal.nothing_lost(before, kit.now_snapshot(quantlab))
