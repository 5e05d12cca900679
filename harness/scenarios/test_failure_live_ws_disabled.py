"""Most Common Failures: Live WS disabled.

The runbook: the live run fails with the code its symptom names; the fix is the env value its fix names.
Observed from outside: the live runner's journal carries the code, the fake exchange sees no connection from it,
and after the fix it connects and a canary run passes with the fixed value.
"""
from __future__ import annotations

import pytest

from harness import kit
from harness.environment import QuantLabEnvironment
from harness.experiment import Action, Experiment, Observation, Probe, holds
from harness.journal import Journal
from quantlab_chaos import items
from quantlab_chaos.runbook import Runbook

ITEM = items.LIVE_WS_DISABLED
REFUSAL_DEADLINE_S = 20.0  # the live runner refuses at start; Restart= may bring it back meanwhile
CONNECT_DEADLINE_S = 15.0


@pytest.mark.runbook(ITEM)
def test_live_ws_disabled(quantlab: QuantLabEnvironment, runbook_model: Runbook, journal: Journal) -> None:
    failure = runbook_model.failure("live-ws-disabled")
    code = failure.symptom_ids.codes[0]
    enable = failure.fix_ids.env()
    flag = next(iter(enable))
    known: set[int] = set()

    def refused() -> Observation:
        logged = code in "\n".join(quantlab.logs("live"))
        new = [c.id for c in quantlab.exchange.record().connections if c.id not in known]
        status = quantlab.status("live")
        return Observation(logged and not new, f"live runner journal {'has' if logged else 'lacks'} {code}; the exchange "
                           f"saw {len(new)} new connection(s); service {status.active_state} ({status.n_restarts} "
                           "restart(s))", {"code": code, "new_connections": len(new)})

    def connected() -> Observation:
        new = [c.id for c in quantlab.exchange.record().open_connections if c.id not in known]
        return Observation(bool(new), f"{len(new)} new exchange connection(s) from the live runner")

    def canary_with_fix() -> Observation:
        return kit.canary_observation(quantlab, kit.canary(quantlab, runbook_model, extra_env=enable), kit.now())

    def disable() -> None:
        known.update(c.id for c in quantlab.exchange.record().connections)
        quantlab.edit_env("live", set={flag: "0"})
        quantlab.start("live", check=False)

    journal.run(Experiment(
        ITEM,
        setup=[kit.start(quantlab, "observer")],
        steady_state=[kit.healthy_canary(quantlab, runbook_model)],
        fault=[Action(f"{flag}=0 in the live runner's env file, then start the live runner service", disable)],
        symptom=[Probe("the live runner", refused, holds(f"Symptom: {failure.symptom}", failure.symptom_source),
                       deadline_s=REFUSAL_DEADLINE_S)],
        fix=[Action(f"Fix: {failure.fix} (in the live runner's env file, then restart it)", lambda: (
            quantlab.edit_env("live", set=enable), quantlab.stop("live"), quantlab.start("live")))],
        recovery=[
            Probe("the live runner", connected, holds(f"after '{failure.fix}' the live run connects to the exchange",
                                                      failure.fix_source), deadline_s=CONNECT_DEADLINE_S),
            Probe("the runbook's canary with the fixed value", canary_with_fix,
                  holds(f"after '{failure.fix}' the canary passes", failure.fix_source)),
        ],
        rollbacks=[Action("the live runner stopped", lambda: quantlab.stop("live"))],
        snapshot=kit.snapshot_of(quantlab),
    ))
