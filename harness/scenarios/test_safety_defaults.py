"""Safety Defaults (systemd + limits): every service unit carries the runbook's systemd settings, and the env
limits default to the runbook's values.

- The directives are compared as systemd reads them: parsed values (`RestartSec=5s` is 5 seconds, `MemoryMax=2G`
  is 2 GiB) in the section systemd takes them from (StartLimit*= in [Unit], the rest in [Service]).
- A limit's default is observed in a live run where that is affordable (the decision-rate budget: a burst of
  decisions crosses it, and the audit trail says at which value). The event and run-time budgets cannot be
  crossed in a quick test (a million events, an hour), so their defaults are read from the target's source,
  and the test's name says so.
- `systemd-analyze verify` checks each unit (with the deploy root pointed at the checkout) where the tool exists.
- Whether MemoryMax=/CPUQuota= are enforced here, and through which hierarchy (cgroup v2, else v1), is reported once
  for the run, with the values the supervisor applies and the cgroup files it wrote. What the limits do to a service
  that leaks or spins is proven in test_safety_limits.py.

The static comparisons are checks, one per unit and setting (or per limit), so every one that disagrees is
reported; the decision-rate check needs a healthy canary first (it blocks on the canary item without one).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from canary.checks import CanaryOutcome, audit_entries
from canary.stops import BUDGET_AUDIT_ACTION
from harness import kit, systemd_analyze
from harness.environment import QuantLabEnvironment
from harness.experiment import (
    Action,
    Experiment,
    Observation,
    Probe,
    Tolerance,
    command_observation,
    equals,
    holds,
)
from harness.journal import Journal
from harness.outcomes import SteadyStateNotReached
from harness.sysd.cgroups import reads_back
from harness.sysd.unitfile import Directive, UnitFile, parse_unit
from harness.sysd.values import parse_cpu_quota, parse_memory_limit, parse_timespan
from harness.target import Target
from quantlab_chaos import items
from quantlab_chaos.errors import UnitError
from quantlab_chaos.runbook import Runbook, Setting, Source
from quantlab_chaos.waiting import eventually

ITEM = items.SAFETY_DEFAULTS

# Where systemd reads each directive from, current spelling first (systemd.unit(5), systemd.service(5)).
# StartLimit*= moved to [Unit]; [Service] still accepts the old StartLimitInterval= and StartLimitBurst=.
DIRECTIVE_PLACES: dict[str, tuple[tuple[str, str], ...]] = {
    "StartLimitIntervalSec": (("Unit", "StartLimitIntervalSec"), ("Unit", "StartLimitInterval"),
                              ("Service", "StartLimitInterval")),
    "StartLimitBurst": (("Unit", "StartLimitBurst"), ("Service", "StartLimitBurst")),
}
SECTIONS = ("Unit", "Service", "Install")
PARSERS: dict[str, Callable[[str], object]] = {
    "RestartSec": parse_timespan,
    "StartLimitIntervalSec": parse_timespan,
    "TimeoutStopSec": parse_timespan,
    "StartLimitBurst": lambda text: int(text.strip()),
    "MemoryMax": parse_memory_limit,
    "CPUQuota": parse_cpu_quota,
}

# CONTRACT sections 2 and 6: the rate budget's env, its name in the audit trail, and the guards' switch.
RATE_ENV = "RUN_BUDGET_MAX_DECISIONS_PER_MIN"
RATE_BUDGET = "max_decision_rate"
GUARDS_ENABLED_ENV = "PROMOTION_GUARDS_ENABLED"
BEHAVIOURAL_LIMITS = (RATE_ENV,)
SOURCE_SUFFIXES = (".js", ".mjs", ".cjs", ".ts", ".mts", ".py")
NOT_SOURCE_PARTS = {"node_modules", "test", "tests", "__tests__", "docs", ".git"}
CANARY_TIMEOUT_S = 60.0  # the harness kills a canary run past this: a hung observation
RUN_DEADLINE_S = CANARY_TIMEOUT_S + 10  # waiting for the background run: its own kill, then a margin


# -- the systemd settings ------------------------------------------------------------------------------------


@pytest.mark.runbook(ITEM)
def test_service_units_carry_the_safety_directives(quantlab_target: Target, runbook_model: Runbook,
                                                   journal: Journal) -> None:
    """One check per listed service unit and setting, so every unit that lacks one is reported."""
    settings = runbook_model.unit_directives
    listed = [(path, source) for path, source in runbook_model.unit_files if path.endswith(".service")]
    units = [unit for path, _ in listed for unit in [_parsed(quantlab_target, path)] if isinstance(unit, UnitFile)]
    for unit in units:
        for directive in _legacy_spellings(unit):
            current = f"{directive.key}Sec" if directive.key.endswith("Interval") else directive.key
            journal.finding(f"{unit.name}: legacy [{directive.section}] {directive.key}=",
                            f"{directive.where}: systemd still reads it; the current spelling is [Unit] {current}=",
                            severity="info")
    journal.measure("units_checked", [unit.name for unit in units])
    checks = [Probe(path, partial(_read, quantlab_target, path),
                    holds(f"the unit file {path} is in the checkout and systemd reads it", source))
              for path, source in listed]
    checks += [Probe(unit.name, partial(_carries, unit, setting),
                     holds(f"every service unit carries {setting.name}={setting.value}", setting.source))
               for setting in settings for unit in units]
    if not settings:
        checks.append(_absent("the Safety Defaults", "the runbook lists no systemd setting",
                              holds("the Safety Defaults list systemd settings", _section(runbook_model))))
    if not listed:
        checks.append(_absent("the Start / Stop section", "it lists no service unit",
                              holds("the runbook lists service units", runbook_model.section_source("start_stop"))))
    journal.run(Experiment(f"{ITEM} (systemd settings)", steady_state=[], checks=checks))


def _section(runbook: Runbook) -> Source | None:
    try:
        return runbook.section_source("safety_defaults")
    except KeyError:
        return None


def _absent(name: str, seen: str, tolerance: Tolerance) -> Probe:
    """What the runbook should name and does not: a check that cannot hold."""
    return Probe(name, lambda: Observation(False, seen, final=True), tolerance)


def _parsed(target: Target, path: str) -> UnitFile | str:
    """The listed unit file parsed as systemd reads it, or why it cannot be."""
    full = target.root / path
    if not full.is_file():
        return f"{full} does not exist"
    try:
        return parse_unit(full)
    except UnitError as exc:
        return str(exc)


def _read(target: Target, path: str) -> Observation:
    unit = _parsed(target, path)
    return Observation(isinstance(unit, UnitFile), f"{path} read ({sum(map(len, unit.sections.values()))} directives)"
                       if isinstance(unit, UnitFile) else unit)


def _carries(unit: UnitFile, setting: Setting) -> Observation:
    """Whether `unit` carries `setting` where systemd reads it, with the same parsed value."""
    places = DIRECTIVE_PLACES.get(setting.name, (("Service", setting.name),))
    found = [d for d in (unit.find(section, key) for section, key in places) if d is not None]
    if not found:
        stray = [d for section in SECTIONS for d in unit.find_all(section, setting.name)]
        if stray:
            where = ", ".join(f"[{d.section}] {d.where}" for d in stray)
            wanted = " or ".join(f"[{section}]" for section in dict.fromkeys(s for s, _ in places))
            return _seen(unit, False, f"{setting.name}= is in {where}, where systemd ignores it (put it in {wanted})")
        consequence = WITHOUT.get(setting.name)
        service = unit.name.removesuffix(".service")
        return _seen(unit, False, f"no {setting.name}=" + (f": {consequence.format(service=service)}" if consequence
                                                           else ""))
    effective = max(found, key=lambda d: d.order)  # one field in systemd: the last assignment wins
    written = f"{effective.key}={effective.value} ({effective.where}, [{effective.section}])"
    parse = PARSERS.get(setting.name, str.strip)
    try:
        wanted_value = parse(setting.value)
    except ValueError as exc:
        return _seen(unit, False, f"the runbook's value {setting.value!r} does not parse ({exc})")
    try:
        value = parse(effective.value)
    except ValueError as exc:
        return _seen(unit, False, f"{effective.key}={effective.value} ({effective.where}) is invalid: {exc}")
    return _seen(unit, _same(value, wanted_value), written)


# What happens to a service whose unit lacks the setting, said where the check fails.
WITHOUT = {
    "MemoryMax": "a leak in {service} grows until the host's OOM killer picks a victim, which may be another service",
    "CPUQuota": "a busy loop in {service} can take every CPU from the other services",
    "Restart": "after a crash or an OOM kill {service} stays down until someone starts it",
    "RestartSec": "systemd restarts {service} after its default 100 ms, so a crash loop spins through its start "
                  "limit at once",
    "StartLimitIntervalSec": "systemd counts {service}'s starts over its default 10 s, so a crash loop that restarts "
                             "every 5 s is never given up",
    "StartLimitBurst": "{service} gets systemd's default burst of 5 starts, which no unit states",
}


def _seen(unit: UnitFile, ok: bool, detail: str) -> Observation:
    return Observation(ok, f"{unit.name}: {detail}", final=True)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _legacy_spellings(unit: UnitFile) -> list[Directive]:
    legacy = [unit.find("Unit", "StartLimitInterval"), unit.find("Service", "StartLimitInterval"),
              unit.find("Service", "StartLimitBurst")]
    return [d for d in legacy if d is not None]


# -- the env limits ------------------------------------------------------------------------------------------


@pytest.mark.runbook(ITEM)
def test_decision_rate_limit_default_observed_in_a_live_run(quantlab: QuantLabEnvironment, runbook_model: Runbook,
                                                            journal: Journal) -> None:
    """With the rate limit unset, a burst of decisions stops the run at the runbook's value (the audit trail's
    BUDGET_EXCEEDED entry says at which value it fired). The steady state: the limit is unset in the run's
    environment, and a healthy canary run passes (so a run that cannot be had blocks on the canary item)."""
    setting = _limit(runbook_model, RATE_ENV)
    _note_dotenv(quantlab.target, RATE_ENV, journal)
    burst = 2 * int(setting.value)

    def unset() -> Observation:
        value = quantlab.quantlab_env().get(RATE_ENV)
        return Observation(value is None, f"the environment sets {RATE_ENV}={value}" if value is not None else
                           f"{RATE_ENV} is not in the run's environment")

    journal.run(Experiment(
        f"{ITEM} ({RATE_ENV} default)",
        steady_state=[Probe("the run's environment", unset, holds(f"{RATE_ENV} is left unset for this run")),
                      kit.healthy_canary(quantlab, runbook_model)],
        checks=[Probe(f"a chatty strategy's run, {RATE_ENV} unset, a burst of {burst} events",
                      lambda: _rate_budget_fired_at(journal, quantlab, runbook_model, burst),
                      equals(int(setting.value), f"{RATE_ENV} defaults to {setting.value}", setting.source))],
    ))


@pytest.mark.runbook(ITEM)
def test_event_and_run_time_limit_defaults_read_from_source_no_behavioural_probe(
        quantlab_target: Target, runbook_model: Runbook, journal: Journal) -> None:
    """No quick run can reach a million events or an hour, so these defaults are the literals in the target's
    source next to the variable's name (or in the constant named there)."""
    limits = [s for s in runbook_model.env_limits if s.name not in BEHAVIOURAL_LIMITS]
    if not limits:
        pytest.skip("the runbook lists no env limit without a behavioural probe")
    files = _source_files(quantlab_target.root)
    found: dict[str, list[str]] = {}
    journal.measure("source_defaults", found)

    def read(setting: Setting) -> Observation:
        places, conflicts = _default_in_source(files, quantlab_target.root, setting)
        found[setting.name] = places
        return Observation(bool(places) and not conflicts,
                           f"other defaults next to {setting.name}: {conflicts}" if conflicts else
                           f"{setting.value} next to {setting.name} in {places}" if places else
                           f"no literal {setting.value} next to {setting.name} in {len(files)} source files",
                           {"found": places, "conflicts": conflicts}, final=True)

    journal.run(Experiment(f"{ITEM} (limit defaults in the source)", steady_state=[], checks=[
        Probe(f"the target's source ({setting.name})", partial(read, setting),
              holds(f"{setting.name} defaults to {setting.value} (read from the target's source: no behavioural probe "
                    "is affordable)", setting.source))
        for setting in limits]))


def _limit(runbook: Runbook, name: str) -> Setting:
    try:
        return runbook.env_limit(name)
    except KeyError:
        pytest.skip(f"the runbook's Safety Defaults list no {name}")


def _note_dotenv(target: Target, name: str, journal: Journal) -> None:
    """The canary loads core/.env (never over a set variable): a value there would stand in for the default."""
    dotenv = target.root / "core" / ".env"
    if dotenv.is_file() and re.search(rf"(?m)^\s*{re.escape(name)}\s*=", dotenv.read_text(errors="replace")):
        journal.finding(f"{dotenv} sets {name}", "the canary loads it, so the run saw that value, not the default",
                        severity="warning")


def _rate_budget_fired_at(journal: Journal, env: QuantLabEnvironment, runbook: Runbook, burst: int) -> Observation:
    """The limit the rate budget fired at in a chatty run given a burst of events: QuantLab records the limit, or
    the value one above it (a breach is the first decision over the limit); None when it did not fire."""
    started = kit.now()
    outcome, connected = _chatty_run_with_burst(env, runbook, burst)
    fired = [e for e in audit_entries(env.audit_dir, outcome.run_id or "")
             if e.get("action") == BUDGET_AUDIT_ACTION and (e.get("metadata") or {}).get("budget") == RATE_BUDGET]
    metadata = (fired[0].get("metadata") or {}) if fired else {}
    observed = metadata.get("limit", metadata["value"] - 1 if isinstance(metadata.get("value"), int) else None)
    journal.measure("observed_default", {RATE_ENV: observed})
    line = outcome.line or {}
    if fired:
        seen = f"the run stopped at {RATE_BUDGET} value {metadata.get('value')} (limit {observed})"
    elif line.get("status") != "PASS" and not line.get("stop_reason"):
        seen = (f"the chatty run ended {line.get('status') or 'without a canary line'} (exit {outcome.result.code}: "
                f"{line.get('error') or outcome.result.stderr[-200:]}), so no {RATE_BUDGET} could fire")
    else:
        seen = (f"no {RATE_BUDGET} breach after a burst of {burst} decisions (exchange connected: {connected}; stop "
                f"reason {line.get('stop_reason')}): the default is above {burst} or the run failed")
    return command_observation(outcome.result, observed, seen, {"audit": metadata, **kit.evidence(outcome)},
                               started=started)


def _chatty_run_with_burst(env: QuantLabEnvironment, runbook: Runbook, burst: int) -> tuple[CanaryOutcome, bool]:
    """The runbook's canary with a strategy deciding on every event, in a thread so the exchange can burst while
    it is live; waited for at most RUN_DEADLINE_S (a TimeoutError past that: an observation that does not hold)."""
    known = {c.id for c in env.exchange.record().connections}
    # Guards off: a chatty strategy's flips can trip the loss-streak guard before the rate budget fires.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="canary") as pool:
        future = pool.submit(kit.canary, env, runbook, seconds=10, strategy="chatty",
                             extra_env={GUARDS_ENABLED_ENV: "0"}, timeout=CANARY_TIMEOUT_S)
        connected = eventually(lambda: [c for c in env.exchange.record().open_connections if c.id not in known],
                               timeout=15)
        if connected:
            env.exchange.burst(burst)
        try:
            return future.result(timeout=RUN_DEADLINE_S), connected
        except TimeoutError:
            raise TimeoutError(f"the chatty canary run did not end within {RUN_DEADLINE_S:g} s") from None


def _source_files(root: Path) -> list[Path]:
    return [path for path in sorted(root.rglob("*"))
            if path.suffix in SOURCE_SUFFIXES and path.is_file() and not NOT_SOURCE_PARTS & set(path.relative_to(root).parts)
            and not re.search(r"\.(test|spec)\.", path.name)]


NUMBER = re.compile(r"(?<![\w.])(\d[\d_]*(?:\.\d+)?(?:[eE]\d+)?)(?![\w.])")
CONSTANT = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")


def _default_in_source(files: list[Path], root: Path, setting: Setting) -> tuple[list[str], list[str]]:
    """(places where the runbook's value is the default next to the name, places with another default there)."""
    wanted = float(setting.value)
    name = re.compile(rf"\b{re.escape(setting.name)}\b")
    found: list[str] = []
    conflicts: list[str] = []
    for path in files:
        lines = path.read_text(errors="replace").splitlines()
        for index, line in enumerate(lines):
            if not name.search(line):
                continue
            numbers = _numbers_near(lines, index, setting.name)
            where = f"{path.relative_to(root)}:{index + 1}"
            if not numbers:
                continue
            (found if wanted in numbers else conflicts).append(f"{where} ({', '.join(f'{n:g}' for n in numbers)})")
    return found, conflicts


def _numbers_near(lines: list[str], index: int, name: str) -> list[float]:
    """Numeric literals on the line (or the next two, for a call spread over lines), and the values of
    UPPER_SNAKE constants named there and assigned a number in the same file."""
    for window in (lines[index:index + 1], lines[index:index + 3]):
        text = " ".join(window).replace(name, " ")
        numbers = [float(n.replace("_", "")) for n in NUMBER.findall(text)]
        for constant in CONSTANT.findall(text):
            numbers += _constant_values(lines, constant)
        if numbers:
            return numbers
    return []


def _constant_values(lines: list[str], constant: str) -> list[float]:
    assignment = re.compile(rf"\b{re.escape(constant)}\b\s*[:=]\s*(\d[\d_]*(?:\.\d+)?(?:[eE]\d+)?)\b")
    return [float(m.group(1).replace("_", "")) for line in lines for m in [assignment.search(line)] if m]


# -- systemd-analyze verify ----------------------------------------------------------------------------------


@pytest.mark.runbook(ITEM)
def test_units_pass_systemd_analyze_verify(quantlab_target: Target, runbook_model: Runbook, journal: Journal,
                                           tmp_path: Path) -> None:
    """One check per listed unit: systemd-analyze verify accepts it; each complaint is a finding in systemd's own
    words, and each service's exposure (systemd-analyze security --offline=yes) is measured. Complaints about a
    binary this host lacks are findings about the host, not the unit's fault."""
    binary = systemd_analyze.tool()
    if binary is None:
        pytest.skip("systemd-analyze is not installed here; install systemd to verify the unit files")
    names = [Path(path).name for path, _ in runbook_model.unit_files]
    analyses = {a.unit: a for a in systemd_analyze.analyse(quantlab_target, tmp_path / "units", binary, names)}
    journal.measure("systemd_security_exposure", {name: {"exposure": a.exposure, "rating": a.rating,
                                                         "exposed_by": a.exposed_by}
                                                  for name, a in analyses.items() if name.endswith(".service")})
    for analysis in analyses.values():
        for complaint in analysis.host_complaints:
            journal.finding("systemd-analyze: a binary of the unit is missing on this host",
                            f"{analysis.unit}: {complaint}", severity="warning")
        for complaint in analysis.complaints:
            journal.finding(f"systemd-analyze verify: {analysis.unit}", complaint, severity="warning")

    def verified(path: str) -> Observation:
        analysis = analyses[Path(path).name]
        return Observation(analysis.verifies, " | ".join(analysis.complaints) or f"{analysis.unit}: no complaint of "
                           "its own", analysis.to_dict(), final=True)

    journal.run(Experiment(f"{ITEM} (systemd-analyze verify)", steady_state=[], checks=[
        Probe(f"systemd-analyze verify {Path(path).name}", partial(verified, path),
              holds(f"the unit file {path} is in the checkout and systemd-analyze verify accepts it (deploy root -> "
                    "checkout)", source))
        for path, source in runbook_model.unit_files]))


# -- MemoryMax= / CPUQuota= enforcement ----------------------------------------------------------------------


@pytest.mark.runbook(ITEM)
def test_memory_and_cpu_limits_are_applied_or_reported(quantlab: QuantLabEnvironment, runbook_model: Runbook,
                                                       journal: Journal) -> None:
    """The supervisor applies the runbook's MemoryMax=/CPUQuota= to every service (through cgroup v2 or v1 when this
    host lets it; otherwise one finding says they are not enforced here, and why). Where the supervisor applies
    them only at start, the services are started first and stopped after. A unit the checkout cannot run here is
    started all the same: its group holds the limits written at start whether or not its process stays up, so they are
    judged from the group's files, and an info finding says the unit itself could not run."""
    limits = [setting for setting in (_directive(runbook_model, "MemoryMax"), _directive(runbook_model, "CPUQuota"))
              if setting is not None]
    if not limits:
        pytest.skip("the runbook's Safety Defaults set neither MemoryMax= nor CPUQuota=")
    services = list(_listed_services(quantlab, runbook_model))
    pending = [(role, unit) for role, unit in services if quantlab.status(role).limits.reason.startswith("pending")]
    report: dict[str, str] = {}
    journal.measure("limits", report)
    checks = [Probe(f"{unit}'s limits", partial(_applied, journal, quantlab, role, unit, setting, report),
                    holds(f"{unit} runs with {setting.name}={setting.value}", setting.source))
              for role, unit in services for setting in limits]
    try:
        journal.run(Experiment(
            f"{ITEM} (MemoryMax=/CPUQuota= applied)",
            setup=[Action(f"start {unit} (the supervisor applies its limits at start)",
                          partial(_start_for_limits, journal, quantlab, role, unit)) for role, unit in pending],
            steady_state=[],
            checks=checks or [Probe("the listed service units", lambda: Observation(False, "no service unit to check"),
                                    holds("every service unit carries the limits", _section(runbook_model)))],
            rollbacks=[Action(f"stop {unit}", partial(quantlab.stop, role)) for role, unit in pending],
        ))
    finally:
        _report_enforcement(journal, report)


def _start_for_limits(journal: Journal, env: QuantLabEnvironment, role: str, unit: str) -> None:
    """Starts the unit so the supervisor writes its limits; a unit the checkout cannot run is noted, not blocking."""
    try:
        env.start(role, check=False)
    except SteadyStateNotReached as exc:
        journal.finding(f"{unit} cannot run here", f"its limits are judged from its group as the supervisor wrote "
                                                   f"them at start: {exc}", severity="info")


def _report_enforcement(journal: Journal, report: dict[str, str]) -> None:
    """One finding for the run, not one per unit: the hierarchy that enforces the limits, or why none does (one
    per distinct reason, which is one unless a unit's own group could not be made)."""
    by_reason: dict[str, list[str]] = {}
    for unit, how in report.items():
        by_reason.setdefault(how, []).append(unit)
    for how, units in by_reason.items():
        which = f"all {len(units)} service units" if len(units) == len(report) else ", ".join(units)
        if how.startswith("enforced"):
            journal.finding(f"MemoryMax=/CPUQuota= {how}", f"{which}, each in a group of its own", severity="info")
        else:
            state = "not enforced on this host" if how.startswith("not enforced") else how.partition(":")[0]
            journal.finding(f"MemoryMax=/CPUQuota= {state}", f"{which}: {how}", severity="info")

def _directive(runbook: Runbook, name: str) -> Setting | None:
    try:
        return runbook.unit_directive(name)
    except KeyError:
        return None


def _listed_services(env: QuantLabEnvironment, runbook: Runbook) -> Iterator[tuple[str, str]]:
    for path, _ in runbook.unit_files:
        name = Path(path).name
        if name.endswith(".service") and name in env.target.units:
            yield env.target.role(name).role, name


def _applied(journal: Journal, env: QuantLabEnvironment, role: str, unit: str, setting: Setting,
             report: dict[str, str]) -> Observation:
    """The value the supervisor applies, and, where this host enforces it, the service's cgroup files read back;
    where it does not, why (the report collects it for the one finding of the run)."""
    limits = env.status(role).limits
    enforced = limits.enforced and limits.cgroup is not None
    report.setdefault(unit, f"enforced through {limits.hierarchy}" if enforced else limits.reason)
    memory = setting.name == "MemoryMax"
    wanted = parse_memory_limit(setting.value) if memory else parse_cpu_quota(setting.value)
    applied = limits.memory_max if memory else limits.cpu_quota
    seen = f"the supervisor applies {setting.name} {applied}"
    ok = _same(applied, wanted)
    if enforced:
        files = [(Path(path), value) for directive, path, value in limits.files if directive == setting.name]
        for path, value in files:
            actual = path.read_text().strip() if path.exists() else "absent"
            seen += f"; {limits.hierarchy} {path} is {actual} (expected {value})"
            ok = ok and reads_back(value, actual)
        if not files:
            seen += f"; no {limits.hierarchy} file was written for it ({limits.reason})"
            ok = False
    else:
        seen += f" (not enforced here: {limits.reason})"
    return Observation(ok, seen, final=True)
