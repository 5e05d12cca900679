"""Unit files are read with their drop-ins as systemd reads them: `<unit>.d/*.conf` in file-name order after the unit,
less specific folders first (`service.d/`, dash prefixes), a same-named file in a more specific folder winning, and an
empty assignment resetting a list. The supervisor's spec, the drift check and systemd-analyze all see them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness import systemd_analyze
from harness.sysd.spec import ServiceSpec
from harness.sysd.unitfile import dropin_files, parse_unit
from harness.target import Target
from quantlab_chaos.errors import UnitError
from tests.twin_copy import twin_copy

UNIT = """[Unit]
Description=demo

[Service]
ExecStart=/bin/true
Restart=always
RestartSec=2
Environment=A=1
Environment=B=2
"""


def _unit(folder: Path, name: str = "quantlab-demo-api.service", **dropins: str) -> Path:
    path = folder / name
    path.write_text(UNIT)
    for relative, text in dropins.items():
        conf = folder / relative.replace("__", "/")
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(text)
    return path


def test_dropins_override_in_file_name_order(tmp_path: Path) -> None:
    path = _unit(tmp_path, **{"quantlab-demo-api.service.d__20-b.conf": "[Service]\nRestart=on-failure\n",
                              "quantlab-demo-api.service.d__10-a.conf": "[Service]\nRestart=no\nRestartSec=5s\n",
                              "quantlab-demo-api.service.d__notes.txt": "[Service]\nRestart=bogus\n"})
    unit = parse_unit(path)
    assert [p.name for p in unit.dropins] == ["10-a.conf", "20-b.conf"]
    assert unit.get("Service", "Restart") == "on-failure" and unit.get("Service", "RestartSec") == "5s"
    spec = ServiceSpec.from_unit(unit)
    assert (spec.restart, spec.restart_sec) == ("on-failure", 5.0)
    restart = unit.find("Service", "Restart")
    assert restart is not None and restart.where == "quantlab-demo-api.service.d/20-b.conf line 2"
    assert parse_unit(path, dropins=False).get("Service", "Restart") == "always"


def test_an_empty_assignment_in_a_dropin_resets_the_list(tmp_path: Path) -> None:
    path = _unit(tmp_path, **{"quantlab-demo-api.service.d__10.conf": "[Service]\nEnvironment=\nEnvironment=C=3\n"})
    assert ServiceSpec.from_unit(parse_unit(path)).environment == (("C", "3"),)


def test_the_more_specific_folder_wins_a_file_of_the_same_name(tmp_path: Path) -> None:
    path = _unit(tmp_path, **{"service.d__10-x.conf": "[Service]\nRestartSec=7\n",
                              "quantlab-.service.d__10-x.conf": "[Service]\nRestartSec=8\n",
                              "quantlab-demo-.service.d__05-y.conf": "[Service]\nRestart=on-abort\n",
                              "quantlab-demo-api.service.d__10-x.conf": "[Service]\nRestartSec=9\n"})
    assert [str(p.relative_to(tmp_path)) for p in dropin_files(path)] == [
        "quantlab-demo-.service.d/05-y.conf", "quantlab-demo-api.service.d/10-x.conf"]
    unit = parse_unit(path)
    assert (unit.get("Service", "Restart"), unit.get("Service", "RestartSec")) == ("on-abort", "9")


def test_a_broken_dropin_is_named_with_its_line(tmp_path: Path) -> None:
    path = _unit(tmp_path, **{"quantlab-demo-api.service.d__10.conf": "[Service]\nRestartSec=5\nnot an assignment\n"})
    with pytest.raises(UnitError, match=r"quantlab-demo-api\.service\.d/10\.conf:3: the line 'not an assignment'"):
        parse_unit(path)
    (tmp_path / "b").mkdir()
    bad_value = _unit(tmp_path / "b", **{"quantlab-demo-api.service.d__10.conf": "[Service]\nRestartSec=soon\n"})
    with pytest.raises(UnitError, match=r"quantlab-demo-api\.service\.d/10\.conf:2"):
        ServiceSpec.from_unit(parse_unit(bad_value))


def test_drift_and_the_checkout_see_a_dropin_beside_the_unit(tmp_path: Path) -> None:
    """The twin's worker without MemoryMax= drifts; a drop-in beside it with the runbook's value ends the drift."""
    from harness.drift import check_drift
    from quantlab_chaos.runbook import load_runbook

    copy = twin_copy(tmp_path / "ql", {"ops/systemd/quantlab-worker.service": ("MemoryMax=2G\n", "")})
    target = Target.load(copy)
    runbook = load_runbook(target.runbook)
    before = [d for d in check_drift(runbook, target, scenarios={}) if d.kind == "safety-default"]
    assert [(d.subject, d.want, d.have) for d in before] == [("quantlab-worker.service", "2G", "")]
    conf = copy / "ops/systemd/quantlab-worker.service.d/10-runbook-safety.conf"
    conf.parent.mkdir()
    conf.write_text("[Service]\nMemoryMax=2G\n")
    assert [d for d in check_drift(runbook, Target.load(copy), scenarios={}) if d.kind == "safety-default"] == []


@pytest.mark.skipif(systemd_analyze.tool() is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_reads_the_dropins_too(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql")
    conf = copy / "ops/systemd/quantlab-worker.service.d/10-bad.conf"
    conf.parent.mkdir()
    conf.write_text("[Service]\nRestart=sometimes\n")
    binary = systemd_analyze.tool()
    assert binary is not None
    [worker] = systemd_analyze.analyse(Target.load(copy), tmp_path / "units", binary, ["quantlab-worker.service"])
    assert any("Failed to parse service restart specifier" in c for c in worker.complaints), worker.complaints
    shutil.rmtree(conf.parent)
    [clean] = systemd_analyze.analyse(Target.load(copy), tmp_path / "units2", binary, ["quantlab-worker.service"])
    assert clean.verifies, clean.complaints
