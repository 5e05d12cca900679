"""Most Common Failures: Observer API unauthorized.

The runbook: the health and stop endpoints answer the status its symptom names; the fix is to set the env
value its fix names and send it in the header form its fix gives. Injected two ways: clients that send the
token wrongly (or not at all), and an observer started without its token. A refused stop must leave the live run
taking events (the fake exchange sees its connections stay open); after the fix as worded (the token in the
observer's env file, the observer restarted), requests with the prescribed header are answered and the stop
stops the run.
"""
from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlencode

import httpx
import pytest

from canary.checks import CheckResult
from canary.stops import check_stop_answer, check_unauthorized
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.experiment import Action, Experiment, Observation, Probe, Slot, holds
from harness.journal import Journal
from harness.live_probes import (
    STOP_DEADLINE_S,
    Ingest,
    connection_ids,
    listed_stopped,
    live_run_setup,
    stops_taking_events,
    taking_events,
)
from quantlab_chaos import items
from quantlab_chaos.runbook import Failure, Runbook

ITEM = items.OBSERVER_UNAUTHORIZED
TOKEN_PLACEHOLDER = "<token>"
# Where a misconfigured client might put the token instead of the header.
QUERY_NAMES = ("token", "access_token")
# How long the live run is watched after the refused stops: a stop that took effect would show within the kill
# switch's own deadline.
WATCH_S = STOP_DEADLINE_S
# How soon the restarted observer answers the prescribed header (the restart itself waits until it is ready).
RECOVERY_DEADLINE_S = 10.0


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


def token_name(failure: Failure) -> str:
    """The env variable the fix says to set."""
    if not failure.fix_ids.env_names:
        raise AssertionError(f"{failure.fix_source}\n  names no env variable to set")
    return failure.fix_ids.env_names[0]


def prescribed(failure: Failure, token: str) -> dict[str, str]:
    name, template = header_form(failure)
    return {name: template.replace(TOKEN_PLACEHOLDER, token)}


def prescribed_text(failure: Failure) -> str:
    name, template = header_form(failure)
    return f"`{name}: {template}`"


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


# -- probes --------------------------------------------------------------------------------------------------


def accepts_its_token(quantlab: QuantLabEnvironment, failure: Failure) -> Probe:
    """Steady state, before and after: the observer answers a request with its own token (whether it refuses the
    others is the symptom's to judge)."""

    def observe() -> Observation:
        status = kit.observer_client(quantlab).request("GET", "/observer/health").status_code
        return Observation(status == httpx.codes.OK, f"GET /observer/health with the observer's token answered {status}")

    return Probe("the observer", observe, holds("the observer answers requests with its token", failure.source),
                 blocks=kit.HEALTH_ITEM)


def refused(failure: Failure, how: str, answers: Mapping[str, list[CheckResult]]) -> Probe:
    """The answers the observer gave the clients' requests made `how`: every one refused as the symptom says."""

    def observe() -> Observation:
        results = answers[how]
        bad = [r.message for r in results if not r.ok]
        return Observation(not bad, f"with {how}: " + ("; ".join(bad) or f"all {len(results)} refused"),
                           {"how": how, "answers": [r.evidence for r in results]}, final=True)

    return Probe(f"the observer's answers to {how}", observe,
                 holds(f"Symptom: {failure.symptom} (client sends {how})", failure.symptom_source))


def run_goes_on(quantlab: QuantLabEnvironment, failure: Failure, ingest: Ingest, refused_at: Slot[float]) -> Probe:
    """The refused stop requests stopped nothing: WATCH_S after them, the fake exchange still sees the live run's
    connections open (observed from outside: the observer itself may refuse to say)."""

    def observe() -> Observation:
        time.sleep(max(0.0, refused_at.value + WATCH_S - kit.now()))
        still = ingest.connections & connection_ids(quantlab, open_only=True)
        return Observation(bool(still), f"{WATCH_S:g} s after the refused stops, live run {ingest.run_id} holds "
                           f"{len(still)} of its {len(ingest.connections)} exchange connection(s) open", final=True)

    return Probe("the fake exchange", observe,
                 holds(f"a refused stop ({failure.symptom}) leaves the live run running", failure.symptom_source))


def fix_as_worded(quantlab: QuantLabEnvironment, runbook: Runbook, failure: Failure, ingest: Ingest,
                  answer: Slot[httpx.Response], sent: Slot[float]) -> list[Action]:
    """The fix as worded: the token set in the observer's env file (the observer restarted to read it), then the
    runbook's stop request for the live run sent with the prescribed header."""
    name = token_name(failure)

    def set_token() -> None:
        quantlab.edit_env("observer", set={name: quantlab.token})
        quantlab.restart("observer")

    actions = [Action(f"Fix: {failure.fix} ({name} set in the observer's env file, the observer restarted)",
                      set_token)]
    stop = runbook.kill_switch
    if stop is not None:
        def send_stop() -> None:
            sent.set(kit.now())
            answer.set(quantlab.observer(stop.method, stop.url_for("", live_run_id=ingest.run_id), token="",
                                         headers=prescribed(failure, quantlab.token)))

        actions.append(Action(f"the runbook's stop request for the live run, sent with {prescribed_text(failure)}",
                              send_stop))
    return actions


def recovered(quantlab: QuantLabEnvironment, journal: Journal, runbook: Runbook, failure: Failure, ingest: Ingest,
              answer: Slot[httpx.Response], sent: Slot[float]) -> list[Probe]:
    """With the prescribed header: the health checks answer 200, and the stop is accepted and stops the live run."""
    after = f"after '{failure.fix}'"
    headers = prescribed(failure, quantlab.token)

    def answered(method: str, path: str) -> Observation:
        response = quantlab.observer(method, path, token="", headers=headers)
        return Observation(response.status_code == httpx.codes.OK, f"{method} {path} answered {response.status_code}")

    probes = [Probe(f"{request.method} {request.path} with the prescribed header",
                    partial(answered, request.method, request.path),
                    holds(f"{after}: {request.path} answers 200", failure.fix_source), deadline_s=RECOVERY_DEADLINE_S)
              for request in runbook.health_checks]
    if runbook.kill_switch is not None:
        probes += [
            Probe("the stop request's answer", lambda: check_stop_answer(answer.value, ingest.run_id),
                  holds(f"{after}: the stop is accepted", failure.fix_source)),
            stops_taking_events(quantlab, ingest, f"{after}: the stop stops the live run (its exchange connections "
                                "close)", failure.fix_source),
            listed_stopped(quantlab, journal, ingest, sent, f"{after}: /observer/runs lists the live run stopped",
                           failure.fix_source),
        ]
    return probes


def scenario(title: str, quantlab: QuantLabEnvironment, journal: Journal, runbook: Runbook, failure: Failure,
             ingest: Ingest, fault: list[Action], symptom: list[Probe]) -> Experiment:
    """The two scenarios' shared frame: the same steady state, fix as worded, recovery and snapshot."""
    answer, sent = Slot[httpx.Response]("the stop request's answer after the fix"), Slot[float]("the stop")
    return Experiment(
        title,
        setup=live_run_setup(journal, quantlab, runbook, ingest),
        steady_state=[accepts_its_token(quantlab, failure), taking_events(quantlab, ingest, failure.source)],
        fault=fault,
        symptom=symptom,
        fix=fix_as_worded(quantlab, runbook, failure, ingest, answer, sent),
        recovery=recovered(quantlab, journal, runbook, failure, ingest, answer, sent),
        snapshot=kit.snapshot_of(quantlab),
    )


# -- the scenarios -------------------------------------------------------------------------------------------


@pytest.mark.runbook(ITEM)
def test_clients_without_a_valid_bearer_header(quantlab: QuantLabEnvironment, runbook_model: Runbook,
                                               journal: Journal) -> None:
    failure = runbook_model.failure("observer-unauthorized")
    status = symptom_status(failure)
    mistakes = client_mistakes(failure, quantlab.token)
    ingest, sent_at = Ingest(), Slot[float]("when the clients' requests were answered")
    answers: dict[str, list[CheckResult]] = {}

    def clients_send() -> None:
        targets = endpoints(runbook_model, ingest.run_id, str(uuid.uuid4()))
        answers.update({m.name: refusals(quantlab, targets, m.headers, m.query, status) for m in mistakes})
        sent_at.set(kit.now())

    journal.run(scenario(
        f"{ITEM} (clients without a valid bearer header)", quantlab, journal, runbook_model, failure, ingest,
        [Action("clients send " + ", ".join(m.name for m in mistakes), clients_send)],
        [*(refused(failure, m.name, answers) for m in mistakes), run_goes_on(quantlab, failure, ingest, sent_at)],
    ))


@pytest.mark.runbook(ITEM)
def test_observer_started_without_token(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    failure = runbook_model.failure("observer-unauthorized")
    status = symptom_status(failure)
    name = token_name(failure)
    how = "the right header to an observer without a token"
    ingest, sent_at = Ingest(), Slot[float]("when the requests were answered")
    answers: dict[str, list[CheckResult]] = {}

    def observer_without_token() -> None:
        quantlab.edit_env("observer", unset=[name])
        quantlab.restart("observer")

    def clients_send() -> None:
        targets = endpoints(runbook_model, ingest.run_id, str(uuid.uuid4()))
        answers[how] = refusals(quantlab, targets, prescribed(failure, quantlab.token), "", status)
        sent_at.set(kit.now())

    journal.run(scenario(
        f"{ITEM} (observer started without its token)", quantlab, journal, runbook_model, failure, ingest,
        [Action(f"{name} removed from the observer's env file, then the observer restarted", observer_without_token),
         Action(f"clients send {prescribed_text(failure)}", clients_send)],
        [refused(failure, how, answers), run_goes_on(quantlab, failure, ingest, sent_at)],
    ))
