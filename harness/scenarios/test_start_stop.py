"""Start / Stop (systemd): every unit file the runbook lists is where it says, and takes the runbook's verbs.

The runbook lists the known unit files and shows start, stop, restart and status for one unit, saying every
unit takes the same verbs. Each listed unit gets one experiment: the file is at the listed path in the checkout
and can be booted (checks), the runbook's start brings it up through the supervisor that boots unit files the
way systemd does (setup; a unit the checkout lacks an installed dependency or build for blocks), and each verb is
then a check that carries out the runbook's command and observes its effect from outside: a simple service stays
active and answers its health route (where the target profile knows one) or connects to the exchange, status
reads like systemctl's, stop leaves no process in the process table, restart gives a new main PID; a oneshot unit
runs to success. What the unit files say that disagrees with the runbook is a finding (info or warning), not a
failure.
"""
from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from harness.environment import QuantLabEnvironment, ServiceWiring
from harness.experiment import Action, Experiment, Observation, Probe, Slot, holds
from harness.journal import Journal, violation
from harness.sysd.status import ServiceStatus
from harness.sysd.unitfile import parse_unit
from harness.target import Target
from quantlab_chaos import items, tls
from quantlab_chaos.errors import HarnessError, UnitError
from quantlab_chaos.runbook import Runbook, Source, SystemctlCommand, load_runbook
from quantlab_chaos.waiting import eventually, until_deadline

ITEM = items.START_STOP
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
    if not listed_unit:
        raise violation(section, "the runbook lists the known unit files", "the Start / Stop section lists no unit file")
    source = next(src for path, src in runbook_model.unit_files if path == listed_unit)
    verbs = _verbs(runbook_model, section, Path(listed_unit).name)
    title = f"{ITEM} ({Path(listed_unit).name})"
    path = quantlab.target.root / listed_unit
    in_checkout = Probe(listed_unit, lambda: _in_checkout(quantlab, listed_unit),
                        holds(f"the unit file {listed_unit} is in the checkout", source))
    if path.suffix != ".service":
        journal.run(Experiment(title, steady_state=[], checks=[in_checkout]))
        pytest.skip(f"{listed_unit} is not a service unit: the supervisor starts services, and systemd starts "
                    f"{path.suffix} units through their own mechanism")
    bootable = Probe(listed_unit, lambda: _bootable(quantlab, path),
                     holds(f"{verbs['start'].text} works for {listed_unit}", verbs["start"].source))
    unit_file = [in_checkout, bootable]
    # The verbs are tried on a unit that can be booted; else its file checks alone, each that does not hold reported.
    parts = (_verb_parts(quantlab, runbook_model, journal, path, listed_unit, verbs)
             if all(probe.observe().value for probe in unit_file) else {"steady_state": [], "checks": []})
    journal.run(Experiment(title, **{**parts, "checks": [*unit_file, *parts["checks"]]}))


def _verb_parts(env: QuantLabEnvironment, runbook: Runbook, journal: Journal, path: Path, unit: str,
                verbs: dict[str, SystemctlCommand]) -> dict[str, Any]:
    """The experiment's setup, steady state, checks and rollbacks for a unit the supervisor can boot."""
    role = env.target.role(path.name).role
    wiring = env.wiring(role)
    assert wiring.spec is not None
    _report_unit(env, runbook, journal, wiring)
    if wiring.spec.type == "oneshot":
        return _oneshot(env, role, unit, verbs)
    return _simple(env, journal, role, wiring, unit, verbs)


def _verbs(runbook: Runbook, section: Source, unit: str) -> dict[str, SystemctlCommand]:
    """The runbook's systemctl example per verb, written for `unit` (the runbook shows the verbs for one unit
    and says every unit takes them)."""
    found = {command.action: command for command in runbook.systemctl}
    missing = [verb for verb in VERBS if verb not in found]
    if missing:
        raise violation(section, f"the runbook shows systemctl {', '.join(VERBS)}",
                        f"it shows no systemctl {', '.join(missing)}")
    return {verb: replace(command, unit=unit, text=command.text.replace(command.unit, unit))
            for verb, command in found.items()}


def _in_checkout(env: QuantLabEnvironment, listed_unit: str) -> Observation:
    path = env.target.root / listed_unit
    elsewhere = env.target.units.get(Path(listed_unit).name)
    return Observation(path.is_file(), f"{path} exists" if path.is_file() else
                       f"{path} does not exist" + (f"; the checkout has it at {elsewhere}" if elsewhere else ""))


def _bootable(env: QuantLabEnvironment, path: Path) -> Observation:
    """The harness's target profile finds the unit and the supervisor can boot it."""
    if path.name not in env.target.units:
        return Observation(False, f"the harness's target profile does not look for units in {path.parent} "
                                  f"(it found: {sorted(env.target.units)})")
    wiring = env.wiring(env.target.role(path.name).role)
    if wiring.error is not None or wiring.spec is None:
        return Observation(False, f"the unit cannot be booted: {wiring.error}")
    return Observation(True, f"the supervisor boots it as a {wiring.spec.type} service")


# -- the steady state: the checkout can run the unit ---------------------------------------------------------


def _runs_here(env: QuantLabEnvironment, role: str, started: Slot[ServiceStatus], oneshot: bool) -> Probe:
    """The unit did not end for want of an installed dependency or a build (a checkout prepared but not installed
    here): the harness cannot judge a unit it cannot bring up, so that blocks. For a simple service this waits out
    the window in which it must stay up (the start check then judges whether it did)."""

    def observe() -> Observation:
        status = started.value if oneshot else _settled(env, role, started.value)
        ended = status.result != "success" if oneshot else not _stayed_up(started.value, status)
        blocked = env.not_installed(role) if ended else None
        if blocked is not None:
            return Observation(False, blocked.why)
        return Observation(True, f"{role}: its journal names no missing package, native binding or build")

    return Probe("the unit's journal", observe,
                 holds("the checkout is installed and built as deployed, so the unit can run here"))


def _settled(env: QuantLabEnvironment, role: str, started: ServiceStatus) -> ServiceStatus:
    """The status once the unit stayed up STABLE_S with its first main PID, or as soon as it did not (a unit that
    crashes at once and is restarted by Restart= looks active for moments only)."""
    latest = [env.status(role)]

    def went_down() -> bool:
        latest[0] = env.status(role)
        return not _stayed_up(started, latest[0])

    until_deadline(went_down, time.monotonic() + STABLE_S, interval=0.1)
    return latest[0]


def _stayed_up(started: ServiceStatus, now: ServiceStatus) -> bool:
    return started.active and now.active and now.main_pid == started.main_pid


# -- simple services -----------------------------------------------------------------------------------------


def _simple(env: QuantLabEnvironment, journal: Journal, role: str, wiring: ServiceWiring, unit: str,
            verbs: dict[str, SystemctlCommand]) -> dict[str, Any]:
    start, stop, restart, status = (verbs[v] for v in VERBS)
    started: Slot[ServiceStatus] = Slot(f"{unit}'s status after {start.text}")
    first: Slot[ServiceStatus] = Slot(f"{unit}'s status before {restart.text}")
    pids: Slot[list[int]] = Slot(f"{unit}'s processes before {stop.text}")
    known: set[int] = set()

    def start_it() -> None:
        known.update(c.id for c in env.exchange.record().connections)
        started.set(env.start(role, check=False))

    return {
        "setup": [Action(start.text, start_it)],
        "steady_state": [_runs_here(env, role, started, oneshot=False)],
        "checks": [
            Probe(start.text, lambda: _stays_up(env, role, unit, started.value),
                  holds(f"{start.text} makes {unit} active and it stays running", start.source)),
            *_health(env, journal, wiring, unit, start),
            *_feeds_from_exchange(env, wiring, unit, start, known),
            _status(env, role, unit, status, running=True),
            Action(stop.text, lambda: (pids.set(_process_tree(env.status(role).main_pid)), env.stop(role)),
                   source=stop.source),
            Probe("the process table", lambda: _stopped(env, role, unit, pids.value),
                  holds(f"{stop.text} leaves {unit} inactive with no process left", stop.source)),
            _status(env, role, unit, status, running=False),
            Action(restart.text, lambda: (first.set(env.start(role, check=False)), env.restart(role)),
                   source=restart.source),
            Probe("the process table", lambda: _restarted(env, role, unit, first.value),
                  holds(f"{restart.text} gives {unit} a new main PID and leaves it active", restart.source)),
            *(_health(env, journal, wiring, unit, restart) if wiring.role.health_path and wiring.port else []),
        ],
        "rollbacks": [Action(f"{stop.text} (whatever happened)", lambda: env.stop(role))],
    }


def _stays_up(env: QuantLabEnvironment, role: str, unit: str, started: ServiceStatus) -> Observation:
    """Started means it keeps running: the same main PID after the window the steady state waited out."""
    now = env.status(role)
    if _stayed_up(started, now):
        return Observation(True, f"{unit} active ({now.sub_state}), main PID {now.main_pid} since the start")
    if not started.active:
        return Observation(False, f"{unit} is {started.active_state} ({started.sub_state}): {started.message} | "
                                  f"{' | '.join(env.logs(role, lines=5))}")
    return Observation(False, f"within {STABLE_S:.0f} s its main PID {started.main_pid} ended; now {now.active_state} "
                              f"({now.sub_state}), {now.n_restarts} restart(s): {now.message} | "
                              f"{' | '.join(env.logs(role, lines=5))}")


def _health(env: QuantLabEnvironment, journal: Journal, wiring: ServiceWiring, unit: str,
            command: SystemctlCommand) -> list[Probe]:
    """The service answers its health route, where the target profile knows one."""
    if not (wiring.role.health_path and wiring.port):
        journal.finding(f"{unit}: no health route known",
                        "the target profile knows no port and health path for this unit; its process (and, if it reads "
                        "the exchange, its exchange connection) is checked instead",
                        severity="info")
        return []
    return [Probe(f"GET {wiring.role.health_path} on port {wiring.port}",
                  lambda: _answers_health(env, journal, wiring, unit),
                  holds(f"after {command.text}, {unit} answers {wiring.role.health_path}", command.source))]


def _answers_health(env: QuantLabEnvironment, journal: Journal, wiring: ServiceWiring, unit: str) -> Observation:
    """Ready (2xx or 401) within HEALTH_TIMEOUT_S. Another HTTP answer, or no answer on a route and port that are
    only what services of this role usually serve, is a finding: whether that route answers as documented is the
    health-checks item's question, not start's."""
    url = f"http://127.0.0.1:{wiring.port}{wiring.role.health_path}"
    statuses: list[int] = []

    def answers() -> bool:
        statuses.append(httpx.get(url, timeout=2.0, verify=tls.context()).status_code)
        return 200 <= statuses[-1] < 300 or statuses[-1] == httpx.codes.UNAUTHORIZED

    if eventually(answers, timeout=HEALTH_TIMEOUT_S, interval=0.2):
        return Observation(True, f"GET {url} answered {statuses[-1]}", final=True)
    guessed = wiring.port_source != "unit" and not wiring.role.declared
    if statuses if not guessed else set(statuses) <= {httpx.codes.NOT_FOUND}:
        detail = (f"GET {url} answered {sorted(set(statuses)) or 'nothing'}; listening on "
                  f"{env.listening_ports(wiring.role.role) or 'no port'}. Declare its port_env and health_path in "
                  ".quantlab-chaos.toml if it has one")
        title = f"{unit}: {wiring.role.health_path} does not answer 2xx"
        if not any(finding.title == title for finding in journal.findings):  # once, though asked after start and restart
            journal.finding(title, detail, severity="info")
        return Observation(True, f"{detail} (reported; the health-checks item judges the route)", final=True)
    return Observation(False, f"GET {wiring.role.health_path} answered {statuses[-3:] or 'nothing'} (ready: 2xx or 401)",
                       final=True)


def _feeds_from_exchange(env: QuantLabEnvironment, wiring: ServiceWiring, unit: str, command: SystemctlCommand,
                         known: set[int]) -> list[Probe]:
    """A service that reads the exchange (the live runner) and has no health route: it connects to the exchange."""
    if not wiring.role.uses_exchange or (wiring.role.health_path and wiring.port):
        return []

    def observe() -> Observation:
        new = [c.id for c in env.exchange.record().open_connections if c.id not in known]
        state = env.status(wiring.role.role)
        return Observation(bool(new), f"{len(new)} new exchange connection(s); {state.active_state}: "
                                      f"{' | '.join(env.logs(wiring.role.role, lines=5))}")

    return [Probe("the fake exchange's connections", observe,
                  holds(f"after {command.text}, {unit} is running and connects to the exchange", command.source),
                  deadline_s=HEALTH_TIMEOUT_S * 2)]


def _status(env: QuantLabEnvironment, role: str, unit: str, command: SystemctlCommand, running: bool) -> Probe:
    """ActiveState/SubState/Main PID as `systemctl status` shows them."""
    wanted = ("active", "running") if running else ("inactive", "dead")
    line = f"Active: {wanted[0]} ({wanted[1]})"

    def observe() -> Observation:
        status = env.status(role)
        text = str(status)
        pid_ok = (status.main_pid is not None and f"Main PID: {status.main_pid}" in text) if running else \
            status.main_pid is None
        return Observation(status.active_state in SYSTEMD_ACTIVE_STATES and line in text and pid_ok,
                           text.replace("\n", " | "))

    return Probe(command.text, observe, holds(f"{command.text} reports {unit} as '{line}'" +
                                              (" with its main PID" if running else ""), command.source))


def _stopped(env: QuantLabEnvironment, role: str, unit: str, pids: list[int]) -> Observation:
    """After the runbook's stop: the unit inactive, and its processes gone from the process table."""
    status = env.status(role)
    left = _left_behind(pids)
    return Observation(status.active_state == "inactive" and not left,
                       f"{unit} is {status.active_state} ({status.sub_state}); processes left: {left or 'none'} "
                       f"(of {pids or 'none'})", {"pids": pids, "left": left}, final=True)


def _restarted(env: QuantLabEnvironment, role: str, unit: str, first: ServiceStatus) -> Observation:
    """After the runbook's restart of the running unit: a new main PID, the old one gone from the process table."""
    now = env.status(role)
    old_left = _left_behind([first.main_pid] if first.main_pid else [])
    return Observation(now.active and now.main_pid not in (None, first.main_pid) and not old_left,
                       f"{unit}: main PID {first.main_pid} -> {now.main_pid}; {now.active_state}"
                       + ("; the old main PID is still alive" if old_left else ""), final=True)


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


def _oneshot(env: QuantLabEnvironment, role: str, unit: str, verbs: dict[str, SystemctlCommand]) -> dict[str, Any]:
    start, stop, restart, status = (verbs[v] for v in VERBS)
    started: Slot[ServiceStatus] = Slot(f"{unit}'s status after {start.text}")
    return {
        "setup": [Action(f"{start.text} (oneshot)", lambda: started.set(env.start(role, check=False)))],
        "steady_state": [_runs_here(env, role, started, oneshot=True)],
        "checks": [
            _ran_to_success(env, role, unit, start),
            Action(f"{restart.text} (oneshot)", lambda: env.restart(role), source=restart.source),
            _ran_to_success(env, role, unit, restart),
            Action(f"{stop.text} (oneshot)", lambda: env.stop(role), source=stop.source),
            Probe(stop.text, lambda: _inactive(env, role, unit), holds(f"{stop.text} leaves {unit} inactive", stop.source)),
            _status(env, role, unit, status, running=False),
        ],
        "rollbacks": [Action(f"{stop.text} (whatever happened)", lambda: env.stop(role))],
    }


def _ran_to_success(env: QuantLabEnvironment, role: str, unit: str, command: SystemctlCommand) -> Probe:
    """The oneshot's last run, as its status says after `command`."""

    def observe() -> Observation:
        status = env.status(role)
        return Observation(status.result == "success" and status.exit_code == 0 and status.active_state != "failed",
                           f"{status.active_state} ({status.sub_state}), result {status.result}, exit "
                           f"{status.exit_code}: {status.message} | {' | '.join(env.logs(role, lines=5))}", final=True)

    return Probe(command.text, observe, holds(f"{command.text} runs the oneshot {unit} to success", command.source))


def _inactive(env: QuantLabEnvironment, role: str, unit: str) -> Observation:
    status = env.status(role)
    return Observation(status.active_state == "inactive", f"{unit} is {status.active_state} ({status.sub_state})",
                       final=True)


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
                            f"the runbook lists {listed[name]}, the checkout has {relative}", severity="warning")

    def names_a_listed_unit(command: SystemctlCommand) -> Observation:
        present = command.unit in quantlab.target.units
        return Observation(command.unit in listed and present,
                           f"{command.unit} is {'listed' if command.unit in listed else 'not listed'} in the runbook "
                           f"and {'present' if present else 'absent'} in {root}")

    examples = [Probe(command.text, partial(names_a_listed_unit, command),
                      holds(f"{command.text} acts on a known unit file of the checkout", command.source))
                for command in runbook_model.systemctl]
    none_shown = Probe("the Start / Stop section", lambda: Observation(False, "it shows no systemctl command"),
                       holds("the runbook shows systemctl examples", runbook_model.section_source("start_stop")))
    journal.run(Experiment(f"{ITEM} (the systemctl examples)", steady_state=[], checks=examples or [none_shown]))


def _report_unit(env: QuantLabEnvironment, runbook: Runbook, journal: Journal, wiring: ServiceWiring) -> None:
    """Findings, never failures: what this unit file says that the runbook does not (rewrites the harness had to
    ExecStart files missing from the checkout, an observer port other than the runbook's)."""
    assert wiring.spec is not None
    root = env.target.root
    for label, command in wiring.spec.all_commands():
        for word in command.argv[1:]:
            if word.startswith(str(root)) and not Path(word).exists():
                journal.finding(f"{wiring.unit_path.name}: {label} names a missing file",
                                f"{word} (from {command.raw}) is not in the checkout", severity="warning")
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
        journal.finding(f"{observer.unit_path.name} cannot be read", str(exc), severity="warning")
        return
    assigned = [word.partition("=")[2] for value in unit.get_all("Service", "Environment") for word in value.split()
                if word.startswith(f"{observer.role.port_env}=")]
    if assigned and {int(p) for p in assigned if p.isdigit()} != ports:
        journal.finding(f"{observer.unit_path.name}: {observer.role.port_env}={assigned[-1]}",
                        f"the runbook's health checks use port {sorted(ports)}; the unit sets another "
                        f"port (an env file may still override it)", severity="warning")
