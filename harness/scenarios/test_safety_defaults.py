"""Safety Defaults (systemd + limits): every service unit carries the runbook's systemd settings, and the env
limits default to the runbook's values.

- The directives are compared as systemd reads them: parsed values (`RestartSec=5s` is 5 seconds, `MemoryMax=2G`
  is 2 GiB) in the section systemd takes them from (StartLimit*= in [Unit], the rest in [Service]).
- A limit's default is observed in a live run where that is affordable (the decision-rate budget: a burst of
  decisions crosses it, and the audit trail says at which value). The event and run-time budgets cannot be
  crossed in a quick test (a million events, an hour), so their defaults are read from the target's source,
  and the test's name says so.
- `systemd-analyze verify` checks each unit (with the deploy root pointed at the checkout) where the tool exists.
- Whether MemoryMax=/CPUQuota= are enforced here (cgroup v2) is reported, with the values the supervisor applies.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from canary.checks import BUDGET_AUDIT_ACTION, CanaryOutcome, audit_entries
from harness import kit
from harness.environment import QuantLabEnvironment
from harness.outcomes import SteadyStateNotReached
from harness.journal import Journal
from harness.ports import eventually
from harness.runbook import Runbook, Setting, Source
from harness.services import LimitsStatus, cgroup_settings
from harness.target import Target
from harness.units import (
    DEPLOY_ROOT, RESOLVABLE_BINARIES, Directive, UnitError, UnitFile, parse_cpu_quota, parse_memory_limit,
    parse_timespan, parse_unit,
)

ITEM = "safety-defaults"

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
CANARY_TIMEOUT_S = 60.0
VERIFY_TIMEOUT_S = 60.0


# -- the systemd settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    unit: str
    detail: str


@pytest.mark.runbook(ITEM)
def test_service_units_carry_the_safety_directives(quantlab_target: Target, runbook_model: Runbook,
                                                   journal: Journal) -> None:
    settings = runbook_model.unit_directives
    journal.expect(bool(settings), expected="the Safety Defaults list systemd settings",
                   actual="the runbook lists none", source=_section(runbook_model))
    units = _service_units(quantlab_target, runbook_model, journal)
    mismatches = {setting.name: [m for unit in units for m in _check(unit, setting)] for setting in settings}
    failing = [setting for setting in settings if mismatches[setting.name]]
    for setting in failing[1:]:  # the first one fails the test; the report still lists every other one
        journal.finding(f"{setting.name}={setting.value} not carried", "; ".join(m.detail for m in mismatches[setting.name]),
                        severity="error")
    for unit in units:
        for directive in _legacy_spellings(unit):
            current = f"{directive.key}Sec" if directive.key.endswith("Interval") else directive.key
            journal.finding(f"{unit.name}: legacy [{directive.section}] {directive.key}=",
                            f"line {directive.line}: systemd still reads it; the current spelling is [Unit] {current}=",
                            severity="info")
    journal.measure("units_checked", [unit.name for unit in units])
    for setting in settings:
        found = mismatches[setting.name]
        journal.expect(not found, expected=f"every service unit carries {setting.name}={setting.value}",
                       actual="; ".join(f"{m.unit}: {m.detail}" for m in found), source=setting.source,
                       evidence={"units": [u.name for u in units]})


def _section(runbook: Runbook) -> Source | None:
    try:
        return runbook.section_source("safety_defaults")
    except KeyError:
        return None


def _service_units(target: Target, runbook: Runbook, journal: Journal) -> list[UnitFile]:
    """The service units the runbook lists, parsed; a listed unit missing from the checkout fails."""
    units = []
    for path, source in runbook.unit_files:
        if not path.endswith(".service"):
            continue
        full = target.root / path
        journal.expect(full.is_file(), expected=f"the unit file {path} is in the checkout",
                       actual=f"{full} does not exist", source=source)
        try:
            units.append(parse_unit(full))
        except UnitError as exc:
            journal.expect(False, expected=f"{path} is a unit file systemd reads", actual=str(exc), source=source)
    journal.expect(bool(units), expected="the runbook lists service units", actual="it lists none",
                   source=runbook.section_source("start_stop"))
    return units


def _check(unit: UnitFile, setting: Setting) -> list[Mismatch]:
    """Whether `unit` carries `setting` where systemd reads it, with the same parsed value."""
    places = DIRECTIVE_PLACES.get(setting.name, (("Service", setting.name),))
    found = [d for d in (unit.find(section, key) for section, key in places) if d is not None]
    if not found:
        stray = [d for section in SECTIONS for d in unit.find_all(section, setting.name)]
        if stray:
            where = ", ".join(f"[{d.section}] line {d.line}" for d in stray)
            wanted = " or ".join(f"[{section}]" for section in dict.fromkeys(s for s, _ in places))
            return [Mismatch(unit.name, f"{setting.name}= is in {where}, where systemd ignores it (put it in {wanted})")]
        return [Mismatch(unit.name, f"no {setting.name}=")]
    effective = max(found, key=lambda d: d.line)  # one field in systemd: the last assignment wins
    parse = PARSERS.get(setting.name, str.strip)
    try:
        wanted_value = parse(setting.value)
    except ValueError as exc:
        return [Mismatch(unit.name, f"the runbook's value {setting.value!r} does not parse ({exc})")]
    try:
        value = parse(effective.value)
    except ValueError as exc:
        return [Mismatch(unit.name, f"{effective.key}={effective.value} (line {effective.line}) is invalid: {exc}")]
    if not _same(value, wanted_value):
        return [Mismatch(unit.name, f"{effective.key}={effective.value} (line {effective.line}, [{effective.section}])")]
    return []


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
    BUDGET_EXCEEDED entry says at which value it fired)."""
    setting = _limit(runbook_model, RATE_ENV)
    expected = int(setting.value)
    journal.expect(RATE_ENV not in quantlab.quantlab_env(), expected=f"{RATE_ENV} is left unset for this run",
                   actual=f"the environment sets {RATE_ENV}", source=setting.source)
    _note_dotenv(quantlab.target, RATE_ENV, journal)
    burst = 2 * expected
    with journal.step("check", f"{RATE_ENV} unset; a chatty strategy; a burst of {burst} events"):
        outcome, connected = _chatty_run_with_burst(quantlab, runbook_model, burst)
    fired = [e for e in audit_entries(quantlab.audit_dir, outcome.run_id or "")
             if e.get("action") == BUDGET_AUDIT_ACTION and (e.get("metadata") or {}).get("budget") == RATE_BUDGET]
    metadata = (fired[0].get("metadata") or {}) if fired else {}
    line = outcome.line or {}
    if not fired and line.get("status") != "PASS" and not line.get("stop_reason"):
        raise SteadyStateNotReached(f"a live run that makes decisions: the runbook's canary, run with a chatty "
                                    f"strategy, ended {line.get('status') or 'without a canary line'} (exit "
                                    f"{outcome.result.code}: {line.get('error') or outcome.result.stderr[-200:]})",
                                    blocked_by=kit.CANARY_ITEM)
    # A breach is the first decision over the limit: QuantLab records the limit, or the value one above it.
    observed = metadata.get("limit", metadata["value"] - 1 if isinstance(metadata.get("value"), int) else None)
    journal.measure("observed_default", {RATE_ENV: observed})
    journal.expect(
        observed == expected,
        expected=f"{RATE_ENV} defaults to {setting.value}",
        actual=(f"the run stopped at {RATE_BUDGET} value {metadata.get('value')} (limit {observed})" if fired else
                f"no {RATE_BUDGET} breach after a burst of {burst} decisions (exchange connected: {connected}; "
                f"stop reason {(outcome.line or {}).get('stop_reason')}): the default is above {burst} or the run failed"),
        source=setting.source,
        evidence={"audit": metadata, **kit.evidence(outcome)},
    )


@pytest.mark.runbook(ITEM)
def test_event_and_run_time_limit_defaults_read_from_source_no_behavioural_probe(
        quantlab_target: Target, runbook_model: Runbook, journal: Journal) -> None:
    """No quick run can reach a million events or an hour, so these defaults are the literals in the target's
    source next to the variable's name (or in the constant named there)."""
    limits = [s for s in runbook_model.env_limits if s.name not in BEHAVIOURAL_LIMITS]
    if not limits:
        pytest.skip("the runbook lists no env limit without a behavioural probe")
    files = _source_files(quantlab_target.root)
    results = {setting.name: _default_in_source(files, quantlab_target.root, setting) for setting in limits}
    journal.measure("source_defaults", {name: found for name, (found, _) in results.items()})
    for setting in limits:
        found, conflicts = results[setting.name]
        journal.expect(bool(found) and not conflicts,
                       expected=f"{setting.name} defaults to {setting.value} (read from the target's source: no "
                                "behavioural probe is affordable)",
                       actual=(f"other defaults next to {setting.name}: {conflicts}" if conflicts else
                               f"no literal {setting.value} next to {setting.name} in {len(files)} source files"),
                       source=setting.source, evidence={"found": found, "conflicts": conflicts})


def _limit(runbook: Runbook, name: str) -> Setting:
    try:
        return runbook.env_limit(name)
    except KeyError:
        pytest.skip(f"the runbook's Safety Defaults list no {name}")


def _note_dotenv(target: Target, name: str, journal: Journal) -> None:
    """The canary loads core/.env (never over a set variable): a value there would stand in for the default."""
    dotenv = target.root / "core" / ".env"
    if dotenv.is_file() and re.search(rf"(?m)^\s*{re.escape(name)}\s*=", dotenv.read_text(errors="replace")):
        journal.finding(f"{dotenv} sets {name}", "the canary loads it, so the run saw that value, not the default")


def _chatty_run_with_burst(env: QuantLabEnvironment, runbook: Runbook, burst: int) -> tuple[CanaryOutcome, bool]:
    known = {c.id for c in env.exchange.record().connections}
    # Guards off: a chatty strategy's flips can trip the loss-streak guard before the rate budget fires.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="canary") as pool:
        future = pool.submit(kit.canary, env, runbook, seconds=10, strategy="chatty",
                             extra_env={GUARDS_ENABLED_ENV: "0"}, timeout=CANARY_TIMEOUT_S)
        connected = eventually(lambda: [c for c in env.exchange.record().open_connections if c.id not in known],
                               timeout=15)
        if connected:
            env.exchange.burst(burst)
        return future.result(timeout=CANARY_TIMEOUT_S + 10), connected


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
    found, conflicts = [], []
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
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here; install systemd to verify the unit files")
    copies = _copies_with_checkout_root(quantlab_target, tmp_path / "units")
    environmental: list[str] = []
    for path, source in runbook_model.unit_files:
        copy = copies.get(Path(path).name)
        journal.expect(copy is not None, expected=f"the unit file {path} is in the checkout",
                       actual=f"{quantlab_target.root / path} does not exist", source=source)
        assert copy is not None
        complaints = _verify(tool, copy)
        own = [c for c in complaints if not _about_this_host(c)]
        environmental += [f"{Path(path).name}: {c}" for c in complaints if _about_this_host(c)]
        journal.expect(not own, expected=f"systemd-analyze verify accepts {path} (deploy root -> checkout)",
                       actual=" | ".join(own), source=source, evidence={"complaints": complaints})
    for complaint in environmental:
        journal.finding("systemd-analyze: a binary of the unit is missing on this host", complaint)


def _copies_with_checkout_root(target: Target, folder: Path) -> dict[str, Path]:
    """Every unit of the checkout copied into one folder (so a timer finds its service), deploy root rewritten."""
    folder.mkdir(parents=True)
    copies = {}
    for name, path in target.units.items():
        copy = folder / name
        copy.write_text(path.read_text().replace(DEPLOY_ROOT, str(target.root)))
        copies[name] = copy
    return copies


def _verify(tool: str, unit: Path) -> list[str]:
    """systemd-analyze verify's complaints about one unit (it warns on stderr, often with exit status 0)."""
    for extra in (["--man=no"], []):
        try:
            done = subprocess.run([tool, "verify", *extra, str(unit)], capture_output=True, text=True,
                                  timeout=VERIFY_TIMEOUT_S, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                                 "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""})
        except subprocess.TimeoutExpired:
            return [f"systemd-analyze verify did not finish within {VERIFY_TIMEOUT_S:.0f} s"]
        output = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        if extra and any("--man" in line and ("unrecognized" in line or "unknown" in line) for line in output):
            continue  # an old systemd without --man=: verify without it
        if done.returncode != 0 and not output:
            output = [f"systemd-analyze verify exited {done.returncode}"]
        return output
    return []


def _about_this_host(complaint: str) -> bool:
    """A complaint about a binary this host lacks at the unit's absolute path (the supervisor looks it up on PATH)."""
    return "is not executable" in complaint and any(binary in complaint for binary in RESOLVABLE_BINARIES)


# -- MemoryMax= / CPUQuota= enforcement ----------------------------------------------------------------------


@pytest.mark.runbook(ITEM)
def test_memory_and_cpu_limits_are_applied_or_reported(quantlab: QuantLabEnvironment, runbook_model: Runbook,
                                                       journal: Journal) -> None:
    """The supervisor applies the runbook's MemoryMax=/CPUQuota= to every service (through cgroup v2 when this
    host has it; otherwise the report says they are not enforced here, and why)."""
    memory = _directive(runbook_model, "MemoryMax")
    cpu = _directive(runbook_model, "CPUQuota")
    if memory is None and cpu is None:
        pytest.skip("the runbook's Safety Defaults set neither MemoryMax= nor CPUQuota=")
    report: dict[str, str] = {}
    for role, unit in _listed_services(quantlab, runbook_model):
        limits = _limits_after_start(quantlab, role)
        report[unit] = "enforced" if limits.enforced else limits.reason
        for setting, value, parse in ((memory, limits.memory_max, parse_memory_limit),
                                      (cpu, limits.cpu_quota, parse_cpu_quota)):
            if setting is not None:
                journal.expect(_same(value, parse(setting.value)),
                               expected=f"{unit} runs with {setting.name}={setting.value}",
                               actual=f"the supervisor applies {setting.name} {value}", source=setting.source)
        if limits.enforced and limits.cgroup:
            _cgroup_has(journal, Path(limits.cgroup), unit, memory, cpu)
        else:
            journal.finding(f"{unit}: MemoryMax=/CPUQuota= not enforced", limits.reason, severity="info")
    journal.measure("limits", report)
    journal.expect(bool(report), expected="every service unit carries the limits", actual="no service unit to check",
                   source=_section(runbook_model))


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


def _limits_after_start(env: QuantLabEnvironment, role: str) -> LimitsStatus:
    """The limits status; a service is started (and stopped) when the supervisor applies limits only at start."""
    status = env.status(role)
    if not status.limits.reason.startswith("pending"):
        return status.limits
    try:
        env.start(role, check=False)
        return env.status(role).limits
    finally:
        env.stop(role)


def _cgroup_has(journal: Journal, cgroup: Path, unit: str, memory: Setting | None, cpu: Setting | None) -> None:
    wanted = cgroup_settings(parse_memory_limit(memory.value) if memory else None,
                             parse_cpu_quota(cpu.value) if cpu else None)
    for name, value in wanted.items():
        setting = memory if name.startswith("memory") else cpu
        actual = (cgroup / name).read_text().strip() if (cgroup / name).exists() else "absent"
        journal.expect(actual == value, expected=f"{unit}'s cgroup enforces {setting.name}={setting.value}",
                       actual=f"{cgroup / name} is {actual} (expected {value})", source=setting.source if setting else None)
