"""Most Common Failures: Live WS disabled.

The runbook: the live run fails with the code its symptom names; the fix is the env value its fix names.
"""
from __future__ import annotations

import pytest

from harness import kit
from harness.environment import QuantLabEnvironment
from harness.journal import Journal
from harness.ports import eventually
from harness.runbook import Runbook

ITEM = "failure:live-ws-disabled"


@pytest.mark.runbook(ITEM)
def test_live_ws_disabled(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    failure = runbook_model.failure("live-ws-disabled")
    code = failure.symptom_ids.codes[0]
    enable = failure.fix_ids.env()
    flag = next(iter(enable))

    with journal.steady_state("observer up; a healthy canary run archived and audited"):
        quantlab.start("observer")
        _, before = kit.baseline(quantlab, runbook_model)
        connections_before = len(quantlab.exchange.record().connections)

    with journal.inject(f"{flag} off in the live runner's env file, then start the live runner service"):
        quantlab.edit_env("live", set={flag: "0"})
        status = quantlab.start("live", check=False)
        quantlab.supervisor.wait_until("live", lambda s: s.n_restarts > 0 or s.active_state in ("failed", "inactive"),
                                       timeout=20)
    journal_text = "\n".join(quantlab.logs("live"))
    new_connections = len(quantlab.exchange.record().connections) - connections_before
    journal.symptom(
        code in journal_text and new_connections == 0,
        expected=f"Symptom: {failure.symptom}",
        actual=f"live runner journal {'has' if code in journal_text else 'lacks'} {code}; "
               f"the exchange saw {new_connections} new connection(s); service {status.active_state}",
        source=failure.symptom_source,
        evidence={"code": code, "exchange_connections": new_connections, "journal_tail": journal_text[-600:]},
    )

    with journal.fix(f"Fix: {failure.fix}"):
        quantlab.edit_env("live", set=enable)
        quantlab.stop("live")
        quantlab.start("live")
    connected = eventually(lambda: len(quantlab.exchange.record().connections) > connections_before, timeout=15)
    outcome = kit.canary(quantlab, runbook_model, extra_env=enable)
    problems = kit.failed(kit.canary_checks(quantlab, outcome))
    journal.recovered(
        connected and not problems,
        expected=f"after '{failure.fix}' the live run connects and the canary passes",
        actual=f"live runner connected: {connected}; canary problems: {problems or 'none'}",
        source=failure.fix_source,
        evidence=kit.evidence(outcome),
    )
    quantlab.stop("live")
    journal.nothing_lost(before, kit.now_snapshot(quantlab))

