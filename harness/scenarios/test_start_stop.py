"""Start / Stop (systemd): every unit file the runbook lists is where it says, and takes the runbook's verbs.

The runbook lists the known unit files and shows start, stop, restart and status for one unit, saying every
unit takes the same verbs. Each listed unit gets one test: the file exists at the listed path in the checkout,
and the verbs work through the supervisor that boots unit files the way systemd does. A simple service becomes
active and answers its health route (where the target profile knows one), stop leaves no process behind,
restart gives a new main PID, status reads like systemctl's; a oneshot unit runs to success. What the unit
files say that disagrees with the runbook is reported as a finding, not failed.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
import pytest

from harness.environment import QuantLabEnvironment, ServiceWiring
from harness.errors import HarnessError
from harness.journal import Journal
from harness.ports import eventually
from harness.runbook import Runbook, Source, SystemctlCommand, load_runbook
from harness.services import ServiceStatus
from harness.target import Target
from harness.units import UnitError, parse_unit

ITEM = "start-stop"
VERBS = ("start", "stop", "restart", "status")
SYSTEMD_ACTIVE_STATES = ("active", "reloading", "inactive", "failed", "activating", "deactivating")
PROCESS_GONE_S = 5.0
HEALTH_TIMEOUT_S = 5.0
STABLE_S = 2.0


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per unit file the runbook lists (collected from the runbook of the chosen target)."""
    if "listed_unit" in metafunc.fixturenames:
        units = _listed_units(metafunc.config)
        metafunc.parametrize("listed_unit", units or [""], ids=[Path(u).name for u in units] or ["no-units-listed"])


def _listed_units(config: pytest.Config) -> list[str]:
    try:
        target = Target.load(config.getoption("quantlab_root"), config.getoption("runbook"))
        return [path for path, _ in load_runbook(target.runbook).unit_files]
    except HarnessError:
        return []  # the fixtures report the bad option as a usage error


@pytest.mark.runbook(ITEM)
def test_unit_file_takes_the_runbook_verbs(listed_unit: str, quantlab: QuantLabEnvironment, runbook_model: Runbook,
                                           journal: Journal) -> None:
    section = runbook_model.section_source("start_stop")
    journal.expect(bool(listed_unit), expected="the runbook lists the known unit files",
                   actual="the Start / Stop section lists no unit file", source=section)
    source = next(src for path, src in runbook_model.unit_files if path == listed_unit)
    verbs = _verbs(runbook_model, journal, section, Path(listed_unit).name)

    path = quantlab.target.root / listed_unit
    elsewhere = quantlab.target.units.get(Path(listed_unit).name)
    journal.expect(path.is_file(), expected=f"the unit file {listed_unit} is in the checkout",
                   actual=f"{path} does not exist" + (f"; the checkout has it at {elsewhere}" if elsewhere else ""),
                   source=source)
    if path.suffix != ".service":
        pytest.skip(f"{listed_unit} is not a service unit: the supervisor starts services, and systemd starts "
                    f"{path.suffix} units through their own mechanism")
    journal.expect(path.name in quantlab.target.units, expected=f"{verbs['start'].text} works for {listed_unit}",
                   actual=f"the harness's target profile does not look for units in {path.parent} "
                          f"(it found: {sorted(quantlab.target.units)})", source=source)
    role = quantlab.target.role(path.name).role
    wiring = quantlab.wiring(role)
    if wiring.error is not None:
        journal.expect(False, expected=f"{verbs['start'].text} works for {listed_unit}",
                       actual=f"the unit cannot be booted: {wiring.error}", source=verbs["start"].source)
    assert wiring.spec is not None
    _report_unit(quantlab, runbook_model, journal, wiring)
    if wiring.spec.type == "oneshot":
        _oneshot(quantlab, journal, role, listed_unit, verbs)
    else:
        _simple(quantlab, journal, role, wiring, listed_unit, verbs)


def _verbs(runbook: Runbook, journal: Journal, section: Source, unit: str) -> dict[str, SystemctlCommand]:
    """The runbook's systemctl example per verb, written for `unit` (the runbook shows the verbs for one unit
    and says every unit takes them)."""
    found = {command.action: command for command in runbook.systemctl}
    missing = [verb for verb in VERBS if verb not in found]
    journal.expect(not missing, expected=f"the runbook shows systemctl {', '.join(VERBS)}",
                   actual=f"it shows no systemctl {', '.join(missing)}", source=section)
    return {verb: replace(command, unit=unit, text=command.text.replace(command.unit, unit))
            for verb, command in found.items()}


# -- simple services -----------------------------------------------------------------------------------------


def _simple(env: QuantLabEnvironment, journal: Journal, role: str, wiring: ServiceWiring, unit: str,
            verbs: dict[str, SystemctlCommand]) -> None:
    start, stop, restart, status_cmd = (verbs[v] for v in VERBS)
    try:
        with journal.step("start", start.text):
            connections = {c.id for c in env.exchange.record().connections}
            started = env.start(role, check=False)
            journal.expect(started.active, expected=f"{start.text} makes {unit} active",
                           actual=f"{unit} is {started.active_state} ({started.sub_state}): {started.message} | "
                                  f"{' | '.join(env.logs(role, lines=5))}", source=start.source)
            _stays_up(env, journal, role, started, unit, start)
            _answers_health(env, journal, role, wiring, unit, start)
            _feeds_from_exchange(env, journal, wiring, unit, start, connections)

        with journal.step("status", status_cmd.text):
            _reads_like_systemctl(journal, env.status(role), unit, status_cmd, running=True)

        with journal.step("stop", stop.text):
            pids = _process_tree(started.main_pid)
            stopped = env.stop(role)
            left = _left_behind(pids)
            journal.expect(stopped.active_state == "inactive" and not left,
                           expected=f"{stop.text} leaves {unit} inactive with no process left",
                           actual=f"{unit} is {stopped.active_state} ({stopped.sub_state}); processes left: {left}",
                           source=stop.source, evidence={"pids": pids})
            _reads_like_systemctl(journal, env.status(role), unit, status_cmd, running=False)

        with journal.step("restart", restart.text):
            first = env.start(role)
            restarted = env.restart(role)
            journal.expect(restarted.active and restarted.main_pid not in (None, first.main_pid)
                           and not _left_behind([first.main_pid] if first.main_pid else []),
                           expected=f"{restart.text} gives {unit} a new main PID and leaves it active",
                           actual=f"main PID {first.main_pid} -> {restarted.main_pid}; {restarted.active_state}",
                           source=restart.source)
            if wiring.role.health_path and wiring.port:
                _answers_health(env, journal, role, wiring, unit, restart)
    finally:
        env.stop(role)


def _stays_up(env: QuantLabEnvironment, journal: Journal, role: str, started: ServiceStatus, unit: str,
              command: SystemctlCommand) -> None:
    """Started means it keeps running: the same main PID after a short while (a unit that crashes at once and is
    restarted by Restart= looks active for moments only)."""
    deadline = time.monotonic() + STABLE_S
    now = env.status(role)
    while time.monotonic() < deadline and now.active and now.main_pid == started.main_pid:
        time.sleep(0.1)
        now = env.status(role)
    if now.active and now.main_pid == started.main_pid:
        return
    blocked = env.not_installed(role)
    if blocked is not None:
        raise blocked
    journal.expect(False, expected=f"{command.text} makes {unit} active and it stays running",
                   actual=f"within {STABLE_S:.0f} s its main PID {started.main_pid} ended; now {now.active_state} "
                          f"({now.sub_state}), {now.n_restarts} restart(s): {now.message} | "
                          f"{' | '.join(env.logs(role, lines=5))}", source=command.source)


def _answers_health(env: QuantLabEnvironment, journal: Journal, role: str, wiring: ServiceWiring, unit: str,
                    command: SystemctlCommand) -> None:
    """The service answers its health route, where the target profile knows one."""
    if not (wiring.role.health_path and wiring.port):
        journal.finding(f"{unit}: no health route known",
                        "the target profile knows no port and health path for this unit; its process (and, if it reads "
                        "the exchange, its exchange connection) is checked instead",
                        severity="info")
        return
    url = f"http://127.0.0.1:{wiring.port}{wiring.role.health_path}"
    statuses: list[int] = []

    def answers() -> bool:
        statuses.append(httpx.get(url, timeout=2.0).status_code)
        return 200 <= statuses[-1] < 300 or statuses[-1] == httpx.codes.UNAUTHORIZED

    ok = eventually(answers, timeout=HEALTH_TIMEOUT_S, interval=0.2)
    guessed = wiring.port_source != "unit" and not wiring.role.declared
    if not ok and (statuses if not guessed else set(statuses) <= {httpx.codes.NOT_FOUND}):
        # It serves HTTP on its port, or the route and port were only what services of this role usually serve:
        # whether that route answers as documented is the health-checks item's question, not start's.
        journal.finding(f"{unit}: {wiring.role.health_path} does not answer 2xx",
                        f"GET {url} answered {sorted(set(statuses)) or 'nothing'}; listening on "
                        f"{env.listening_ports(role) or 'no port'}. Declare its port_env and health_path in "
                        f".quantlab-chaos.toml if it has one", severity="info")
        return
    journal.expect(ok, expected=f"after {command.text}, {unit} answers {wiring.role.health_path}",
                   actual=f"GET {wiring.role.health_path} answered {statuses[-3:] or 'nothing'} "
                          f"(ready: 2xx or 401)", source=command.source)


def _feeds_from_exchange(env: QuantLabEnvironment, journal: Journal, wiring: ServiceWiring, unit: str,
                         command: SystemctlCommand, known: set[int]) -> None:
    """A service that reads the exchange (the live runner) and has no health route: it connects to the exchange."""
    if not wiring.role.uses_exchange or (wiring.role.health_path and wiring.port):
        return
    connected = eventually(lambda: [c for c in env.exchange.record().open_connections if c.id not in known],
                           timeout=HEALTH_TIMEOUT_S * 2)
    journal.expect(connected, expected=f"after {command.text}, {unit} is running and connects to the exchange",
                   actual=f"no new exchange connection; {env.status(wiring.role.role).active_state}: "
                          f"{' | '.join(env.logs(wiring.role.role, lines=5))}", source=command.source)


def _reads_like_systemctl(journal: Journal, status: ServiceStatus, unit: str, command: SystemctlCommand,
                          running: bool) -> None:
    """ActiveState/SubState/Main PID as `systemctl status` shows them."""
    text = str(status)
    wanted = ("active", "running") if running else ("inactive", "dead")
    line = f"Active: {wanted[0]} ({wanted[1]})"
    pid_ok = (status.main_pid is not None and f"Main PID: {status.main_pid}" in text) if running else status.main_pid is None
    journal.expect(status.active_state in SYSTEMD_ACTIVE_STATES and line in text and pid_ok,
                   expected=f"{command.text} reports {unit} as '{line}'" + (" with its main PID" if running else ""),
                   actual=text.replace("\n", " | "), source=command.source)


def _process_tree(pid: int | None) -> list[int]:
    if pid is None:
        return []
    try:
        return [pid] + [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return [pid]


def _left_behind(pids: list[int]) -> list[int]:
    """The pids still alive (zombies count as gone) once the stop had a moment to finish."""

    def alive() -> list[int]:
        found = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    found.append(pid)
            except psutil.Error:
                continue
        return found

    eventually(lambda: not alive(), timeout=PROCESS_GONE_S)
    return alive()


# -- oneshot units -------------------------------------------------------------------------------------------


def _oneshot(env: QuantLabEnvironment, journal: Journal, role: str, unit: str,
             verbs: dict[str, SystemctlCommand]) -> None:
    start, stop, restart, status_cmd = (verbs[v] for v in VERBS)
    try:
        with journal.step("start", f"{start.text} (oneshot)"):
            _ran_to_success(journal, env, role, env.start(role, check=False), unit, start)
        with journal.step("restart", f"{restart.text} (oneshot)"):
            _ran_to_success(journal, env, role, env.restart(role), unit, restart)
        with journal.step("stop", f"{stop.text} (oneshot)"):
            stopped = env.stop(role)
            journal.expect(stopped.active_state == "inactive", expected=f"{stop.text} leaves {unit} inactive",
                           actual=f"{unit} is {stopped.active_state} ({stopped.sub_state})", source=stop.source)
        with journal.step("status", f"{status_cmd.text} (oneshot)"):
            _reads_like_systemctl(journal, env.status(role), unit, status_cmd, running=False)
    finally:
        env.stop(role)


def _ran_to_success(journal: Journal, env: QuantLabEnvironment, role: str, status: ServiceStatus, unit: str,
                    command: SystemctlCommand) -> None:
    journal.expect(status.result == "success" and status.exit_code == 0 and status.active_state != "failed",
                   expected=f"{command.text} runs the oneshot {unit} to success",
                   actual=f"{status.active_state} ({status.sub_state}), result {status.result}, exit {status.exit_code}: "
                          f"{status.message} | {' | '.join(env.logs(role, lines=5))}", source=command.source)


# -- what the unit files say that the runbook does not -------------------------------------------------------


@pytest.mark.runbook(ITEM)
def test_systemctl_examples_name_listed_units(quantlab: QuantLabEnvironment, runbook_model: Runbook,
                                              journal: Journal) -> None:
    """The unit in the runbook's systemctl examples is a listed unit in the checkout; unit files the runbook
    does not list, or lists at another path, are reported."""
    root = quantlab.target.root
    listed = {Path(path).name: path for path, _ in runbook_model.unit_files}
    for name, path in sorted(quantlab.target.units.items()):
        relative = str(path.relative_to(root))
        if name not in listed:
            journal.finding(f"{relative} is not in the runbook",
                            "the checkout has this unit file but the runbook's list of known unit files does not "
                            "name it", severity="info")
        elif listed[name] != relative:
            journal.finding(f"{name} is not at the listed path",
                            f"the runbook lists {listed[name]}, the checkout has {relative}")
    for command in runbook_model.systemctl:
        present = command.unit in quantlab.target.units
        journal.expect(command.unit in listed and present,
                       expected=f"{command.text} acts on a known unit file of the checkout",
                       actual=f"{command.unit} is {'listed' if command.unit in listed else 'not listed'} in the runbook "
                              f"and {'present' if present else 'absent'} in {root}", source=command.source)


def _report_unit(env: QuantLabEnvironment, runbook: Runbook, journal: Journal, wiring: ServiceWiring) -> None:
    """Findings, never failures: what this unit file says that the runbook does not (rewrites the harness had to
    ExecStart files missing from the checkout, an observer port other than the runbook's)."""
    assert wiring.spec is not None
    root = env.target.root
    for label, command in wiring.spec.all_commands():
        for word in command.argv[1:]:
            if word.startswith(str(root)) and not Path(word).exists():
                journal.finding(f"{wiring.unit_path.name}: {label} names a missing file",
                                f"{word} (from {command.raw}) is not in the checkout")
    if wiring.role.role == "observer":
        _report_observer_port(wiring, runbook, journal)


def _report_observer_port(observer: ServiceWiring, runbook: Runbook, journal: Journal) -> None:
    """The runbook's health checks talk to one port; the observer unit's Environment= should set that port."""
    ports = {request.port for request in runbook.health_checks}
    if not ports or not observer.role.port_env:
        return
    try:
        unit = parse_unit(observer.unit_path)
    except UnitError as exc:
        journal.finding(f"{observer.unit_path.name} cannot be read", str(exc))
        return
    assigned = [word.partition("=")[2] for value in unit.get_all("Service", "Environment") for word in value.split()
                if word.startswith(f"{observer.role.port_env}=")]
    if assigned and {int(p) for p in assigned if p.isdigit()} != ports:
        journal.finding(f"{observer.unit_path.name}: {observer.role.port_env}={assigned[-1]}",
                        f"the runbook's health checks use port {sorted(ports)}; the unit sets another port "
                        f"(an env file may still override it)")
