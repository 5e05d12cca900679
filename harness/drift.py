"""The static drift check: does the runbook's text still match the system?

Every runbook item must have a scenario and every scenario an item; every unit, script, path, env name, code,
route and port the runbook names must exist in the target (its source and unit files); every safety default
must be carried by every listed unit. Each mismatch is reported with both sides.
"""
from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.sysd.unitfile import parse_unit
from harness.sysd.values import parse_timespan
from harness.target import Target
from quantlab_chaos import items
from quantlab_chaos.errors import UnitError
from quantlab_chaos.runbook import Runbook

SCENARIOS_DIR = Path(__file__).with_name("scenarios")
SOURCE_SUFFIXES = {".js", ".mjs", ".cjs", ".ts", ".mts", ".py", ".service", ".timer", ".json", ".sh"}
SKIPPED_DIRS = {"node_modules", ".git", "test", "tests", "docs", "__pycache__", "coverage", "dist"}
MAX_SOURCE_BYTES = 2_000_000
# Where systemd reads each safety directive from.
DIRECTIVE_SECTIONS = {"StartLimitIntervalSec": "Unit", "StartLimitBurst": "Unit"}


@dataclass(frozen=True)
class Drift:
    """One mismatch, in words (`runbook`, `system`) and as values a remedy can act on: `subject` is what it is about
    (a unit file's name, a path, a code, an env name), `want` the runbook's value, `have` the system's ("" where the
    system has none) and `where` the file and line that hold the system's side."""

    kind: str
    item: str
    runbook: str
    system: str
    line: int | None = None
    subject: str = ""
    want: str = ""
    have: str = ""
    where: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"runbook line {self.line}" if self.line else "runbook"
        return f"[{self.kind}] {self.item}: {where} says {self.runbook!r}; the system: {self.system}"


class SourceIndex:
    """The target's source text (no tests, docs or dependencies), searched for the runbook's identifiers."""

    def __init__(self, root: Path) -> None:
        self.files: dict[str, str] = {}
        for path in sorted(root.rglob("*")):
            if any(part in SKIPPED_DIRS for part in path.relative_to(root).parts[:-1]):
                continue
            if path.is_file() and path.suffix in SOURCE_SUFFIXES and path.stat().st_size < MAX_SOURCE_BYTES:
                if path.name in ("package-lock.json",):
                    continue
                self.files[str(path.relative_to(root))] = path.read_text(errors="replace")

    def where(self, needle: str) -> list[str]:
        return [name for name, text in self.files.items() if needle in text]

    def where_pattern(self, pattern: str) -> list[str]:
        compiled = re.compile(pattern)
        return [name for name, text in self.files.items() if compiled.search(text)]


def scenario_items(scenarios_dir: Path = SCENARIOS_DIR) -> dict[str, list[str]]:
    """Runbook item -> scenario test ids, from the `runbook` markers (collected by pytest itself)."""
    return by_item(collect_scenarios(scenarios_dir))


def by_item(scenarios: Iterable[tuple[str, str | None]]) -> dict[str, list[str]]:
    """Runbook item -> test ids, from (test id, item) pairs; the checks beyond the runbook (no item) left out."""
    items: dict[str, list[str]] = {}
    for nodeid, item in scenarios:
        if item is not None:
            items.setdefault(item, []).append(nodeid)
    return items


def collect_scenarios(scenarios_dir: Path = SCENARIOS_DIR) -> list[tuple[str, str | None]]:
    """Every scenario's test id with the runbook item it proves (None for the checks beyond the runbook), in
    collection order, as pytest itself collects them."""
    import pytest

    class Collector:
        def __init__(self) -> None:
            self.items: list[tuple[str, str | None]] = []

        def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
            for item in items:
                marker = item.get_closest_marker("runbook")
                self.items.append((item.nodeid, str(marker.args[0]) if marker and marker.args else None))

    collector = Collector()
    with contextlib.redirect_stdout(io.StringIO()) as output:
        # The rootdir fixed, so the test ids do not depend on the working folder: for the shipped scenarios the
        # project, as `quantlab-chaos run` has it (the ids are the run's); for another folder, that folder.
        shipped = scenarios_dir.resolve() == SCENARIOS_DIR.resolve()
        rootdir = SCENARIOS_DIR.parents[1] if shipped else scenarios_dir
        code = pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", "-p", "no:xdist", "--rootdir",
                            str(rootdir), "-W", "ignore::pytest.PytestAssertRewriteWarning", str(scenarios_dir)],
                           plugins=[collector])
    if code not in (0, 5):
        raise RuntimeError(f"collecting the scenarios in {scenarios_dir} failed (pytest exit {code}): "
                           f"{output.getvalue()[-500:]}")
    return collector.items


def check_drift(runbook: Runbook, target: Target, scenarios: dict[str, list[str]] | None = None) -> list[Drift]:
    source = SourceIndex(target.root)
    drifts: list[Drift] = []
    drifts += _coverage(runbook, scenarios if scenarios is not None else scenario_items())
    drifts += _units(runbook, target)
    drifts += _commands(runbook, target)
    drifts += _identifiers(runbook, source)
    drifts += _routes_and_ports(runbook, target, source)
    drifts += _safety_defaults(runbook, target, source)
    return drifts


def _coverage(runbook: Runbook, scenarios: dict[str, list[str]]) -> Iterable[Drift]:
    items = {item.id: item for item in runbook.items()}
    for item_id, item in items.items():
        if item_id not in scenarios:
            yield Drift("no-scenario", item_id, item.title, "no scenario proves this item", item.source.line)
    for item_id, tests in scenarios.items():
        if item_id not in items:
            yield Drift("no-runbook-item", item_id, "(nothing)", f"scenario {tests[0]} proves an item the runbook lacks")


def _units(runbook: Runbook, target: Target) -> Iterable[Drift]:
    for path, source in runbook.unit_files:
        if not (target.root / path).is_file():
            found = target.units.get(Path(path).name)
            at = str(found.relative_to(target.root)) if found else ""
            elsewhere = f"it is at {at}" if found else "no such unit file in the checkout"
            yield Drift("unit-file", items.START_STOP, path, elsewhere, source.line, subject=path, want=path, have=at,
                        where=at)
    for command in runbook.systemctl + [c for step in runbook.break_glass for c in step.systemctl]:
        if command.unit not in target.units:
            yield Drift("unit", items.START_STOP, command.text, f"no unit file {command.unit} in the checkout",
                        command.source.line, subject=command.unit, want=command.unit)


def _commands(runbook: Runbook, target: Target) -> Iterable[Drift]:
    commands = list(runbook.self_tests) + ([runbook.canary] if runbook.canary else [])
    for command in commands:
        scripts = [arg for arg in command.argv[1:] if re.search(r"\.(m?js|ts|py)$", arg) and not arg.startswith("/")]
        for script in scripts[:1]:
            if not (target.root / script).is_file():
                yield Drift("script", items.SELF_TEST if command in runbook.self_tests else items.CANARY, command.text,
                            f"{script} does not exist in the checkout", command.source.line, subject=script, want=script)


def _identifiers(runbook: Runbook, source: SourceIndex) -> Iterable[Drift]:
    for failure in runbook.failures:
        item = items.failure_item(failure.id)
        for code in failure.symptom_ids.codes:
            if not source.where(code):
                yield Drift("code", item, code, "no source file of the target mentions this code", failure.symptom_source.line,
                            subject=code, want=code)
        for name in failure.fix_ids.env_names:
            pattern = re.escape(name.rstrip("*")) + (r"\w+" if name.endswith("*") else r"\b")
            if not source.where_pattern(pattern):
                yield Drift("env", item, name, "no source file of the target reads this variable", failure.fix_source.line,
                            subject=name, want=name)
        for path in failure.fix_ids.paths:
            if not source.where(path.rstrip("/")):
                yield Drift("path", item, path, "no source file of the target uses this path", failure.fix_source.line,
                            subject=path, want=path)
    for step in runbook.break_glass:
        for name in step.ids.env_names:
            if not source.where_pattern(re.escape(name) + r"\b"):
                yield Drift("env", items.break_glass_item(step.id), name, "no source file of the target reads this variable",
                            step.source.line, subject=name, want=name)


def _routes_and_ports(runbook: Runbook, target: Target, source: SourceIndex) -> Iterable[Drift]:
    requests = list(runbook.health_checks) + ([runbook.kill_switch] if runbook.kill_switch else [])
    requests += [r for step in runbook.break_glass for r in step.requests]
    for request in requests:
        route = re.sub(r"<[a-z_]+>", "", request.path.split("?")[0]).rstrip("/")
        route_start = route.split("//")[0]
        if not source.where(route_start.rsplit("/", 1)[0] if route_start.count("/") > 2 else route_start):
            yield Drift("route", items.HEALTH_CHECKS, request.path, "no source file of the target serves this path",
                        request.source.line, subject=request.path, want=request.path)
    ports = {request.port for request in requests}
    observer = target.units.get("quantlab-observer.service")
    if observer is None or not ports:
        return
    try:
        unit = parse_unit(observer)
    except UnitError as exc:
        yield Drift("unit-file", items.HEALTH_CHECKS, str(observer), f"unparseable: {exc}")
        return
    assigned = [(value, directive) for directive in unit.find_all("Service", "Environment")
                for value in re.findall(r"OBSERVER_PORT=(\d+)", directive.value)]
    for port in ports:
        if assigned and str(port) not in [value for value, _ in assigned]:
            line = next(r.source.line for r in requests if r.port == port)
            value, directive = assigned[-1]
            yield Drift("port", items.HEALTH_CHECKS, f"observer on port {port}",
                        f"{observer.relative_to(target.root)} sets OBSERVER_PORT={value}", line, subject=observer.name,
                        want=str(port), have=value, where=f"{observer.relative_to(target.root)} {directive.where}")


def _safety_defaults(runbook: Runbook, target: Target, source: SourceIndex) -> Iterable[Drift]:
    listed = [target.root / path for path, _ in runbook.unit_files if (target.root / path).is_file()]
    for path in listed:
        try:
            unit = parse_unit(path)
        except UnitError as exc:
            yield Drift("unit-file", items.SAFETY_DEFAULTS, str(path.relative_to(target.root)), f"unparseable: {exc}")
            continue
        for setting in runbook.unit_directives:
            section = DIRECTIVE_SECTIONS.get(setting.name, "Service")
            found = unit.find(section, setting.name)
            actual = found.value if found else None
            if actual is None or not _same_value(setting.name, setting.value, actual):
                relative = path.relative_to(target.root)
                yield Drift("safety-default", items.SAFETY_DEFAULTS, f"{setting.name}={setting.value}",
                            f"{relative} [{section}] has {setting.name}={actual}" if actual is not None else
                            f"{relative} [{section}] lacks {setting.name}", setting.source.line, subject=path.name,
                            want=setting.value, have=actual or "",
                            where=f"{relative} {found.where}" if found else f"{relative} [{section}]")
    for setting in runbook.env_limits:
        files = source.where(setting.name)
        if not files:
            yield Drift("env-limit", items.SAFETY_DEFAULTS, f"{setting.name}={setting.value}",
                        "no source file of the target reads this variable", setting.source.line, subject=setting.name,
                        want=setting.value)
        elif not any(setting.value in _plain_numbers(source.files[name]) for name in files):
            yield Drift("env-limit", items.SAFETY_DEFAULTS, f"{setting.name}={setting.value}",
                        f"{', '.join(files[:2])} read it, but none has the default {setting.value}", setting.source.line,
                        subject=setting.name, want=setting.value, where=", ".join(files[:2]))


def _plain_numbers(text: str) -> str:
    """1_000_000 and 1,000,000 read as 1000000."""
    return re.sub(r"(?<=\d)[_,](?=\d{3})", "", text)


def _same_value(name: str, expected: str, actual: str) -> bool:
    if expected.strip() == actual.strip():
        return True
    if name.endswith("Sec"):
        try:
            return parse_timespan(expected) == parse_timespan(actual)
        except Exception:  # noqa: BLE001 - an unparseable span is simply different
            return False
    return False


def report(drifts: list[Drift], runbook: Runbook, target: Target) -> dict[str, Any]:
    return {
        "target": str(target.root),
        "runbook": str(runbook.path),
        "items": len(runbook.items()),
        "clean": not drifts,
        "drift": [d.to_dict() for d in drifts],
    }

