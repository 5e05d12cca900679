"""systemd's own judgement of the target's units: a unit systemd would refuse is reported with systemd's message,
each service's exposure is systemd's score, and `runbook check` lists both beside the drift."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import systemd_analyze
from harness.target import Target
from tests.twin_copy import twin_copy

WORKER = "ops/systemd/quantlab-worker.service"
HARDENING = "NoNewPrivileges=yes\nProtectSystem=strict\nProtectHome=yes\nPrivateTmp=yes\nPrivateDevices=yes\n"

needs_systemd_analyze = pytest.mark.skipif(systemd_analyze.tool() is None, reason="systemd-analyze is not installed")


def _worker(analyses: list[systemd_analyze.UnitAnalysis]) -> systemd_analyze.UnitAnalysis:
    return next(a for a in analyses if a.unit == "quantlab-worker.service")


@needs_systemd_analyze
def test_the_twin_s_units_verify_and_have_an_exposure(tmp_path: Path) -> None:
    binary = systemd_analyze.tool()
    assert binary is not None
    analyses = systemd_analyze.analyse(Target.load(), tmp_path / "units", binary)
    assert analyses and all(a.verifies for a in analyses), [a.complaints for a in analyses if not a.verifies]
    services = [a for a in analyses if a.unit.endswith(".service")]
    assert services and all(a.exposure is not None and 0 <= a.exposure <= 10 and a.rating for a in services)
    assert all(a.exposure is None for a in analyses if a.unit.endswith(".timer"))
    assert _worker(analyses).exposed_by, "the settings that cost the most are named"


@needs_systemd_analyze
def test_a_unit_systemd_refuses_is_reported_in_systemd_s_words_and_hardening_lowers_the_exposure(
        tmp_path: Path) -> None:
    binary = systemd_analyze.tool()
    assert binary is not None
    root = twin_copy(tmp_path / "twin", {WORKER: ("Restart=on-failure", "Restart=sometimes")})
    broken = _worker(systemd_analyze.analyse(Target.load(root), tmp_path / "broken", binary))
    assert not broken.verifies
    assert any("restart specifier" in complaint and "sometimes" in complaint for complaint in broken.complaints), broken

    before = _worker(systemd_analyze.analyse(Target.load(), tmp_path / "before", binary))
    hardened_root = twin_copy(tmp_path / "hardened", {WORKER: ("[Service]\n", "[Service]\n" + HARDENING)})
    hardened = _worker(systemd_analyze.analyse(Target.load(hardened_root), tmp_path / "after", binary))
    assert hardened.verifies and before.exposure is not None and hardened.exposure is not None
    assert hardened.exposure < before.exposure, (before.exposure, hardened.exposure)


@needs_systemd_analyze
def test_runbook_check_lists_the_units_beside_the_drift(tmp_path: Path) -> None:
    root = twin_copy(tmp_path / "twin", {WORKER: ("Restart=on-failure", "Restart=sometimes")})
    done = subprocess.run([sys.executable, "-m", "harness.cli", "runbook", "check", "--quantlab-root", str(root),
                           "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    units = {unit["unit"]: unit for unit in json.loads(done.stdout)["units"]}
    assert units["quantlab-worker.service"]["complaints"] and units["quantlab-observer.service"]["complaints"] == []
    assert isinstance(units["quantlab-observer.service"]["exposure"], float)
    text = subprocess.run([sys.executable, "-m", "harness.cli", "runbook", "check", "--quantlab-root", str(root)],
                          capture_output=True, text=True, timeout=300).stdout
    assert "quantlab-worker.service: does not verify: " in text and "quantlab-observer.service: verifies; exposure" in text
