"""A scenario that holds the target's services up until it is killed: the subject of tests/test_process_hygiene.py.

Its name does not match test_*.py, so pytest collects it only when it is named on the command line, and it only
runs when QUANTLAB_HYGIENE_DIR is set. Each test starts what a real scenario has running at its busiest (the
observer and the live runner from their units, toxiproxy, moto and the fake exchange, and a one-shot node command
in flight in the test's own thread), writes <dir>/ready-<part>, and holds until <dir>/release or its own deadline.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import psutil
import pytest

from harness.environment import QuantLabEnvironment
from quantlab_chaos.waiting import wait_until

HOLD_S = 90.0
MARK = "hygiene one-shot"


def _one_shot_running() -> bool:
    return any(MARK in " ".join(child.cmdline()) for child in psutil.Process().children())


def _say_ready_once_running(ready: Path) -> None:
    wait_until(_one_shot_running, timeout=15, what="the one-shot node command")
    ready.write_text(str(os.getpid()))


@pytest.mark.parametrize("part", ["one", "two"])
def test_hold_services_up(quantlab: QuantLabEnvironment, part: str) -> None:
    folder = os.environ.get("QUANTLAB_HYGIENE_DIR")
    if not folder:
        pytest.skip("only run by tests/test_process_hygiene.py (QUANTLAB_HYGIENE_DIR is not set)")
    quantlab.start("observer")
    quantlab.start("live")
    release = Path(folder) / "release"
    threading.Thread(target=_say_ready_once_running, args=(Path(folder) / f"ready-{part}",), daemon=True).start()
    # Like every scenario's commands, the one-shot runs in the test's own thread, so the blow lands inside it.
    # It ends on the release file or after HOLD_S; the hygiene tests kill the run long before.
    script = (f"const fs = require('fs'); /* {MARK} */ "
              f"setInterval(() => fs.existsSync({json.dumps(str(release))}) && process.exit(0), 200);")
    quantlab.run_node("-e", script, timeout=HOLD_S)
