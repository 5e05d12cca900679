"""The runbook as a typed model: every extracted value keeps the runbook line it came from, so a check can quote it."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from quantlab_chaos import items

ENV_REFERENCE = re.compile(r"\$\{?([A-Z][A-Z0-9_]*)\}?")


@dataclass(frozen=True)
class Source:
    """Where a value stands in the runbook (1-based line) and that line's text, for messages."""

    line: int
    text: str

    def __str__(self) -> str:
        return f"runbook line {self.line}: {self.text.strip()}"


@dataclass(frozen=True)
class Identifiers:
    """The identifiers inside a piece of runbook text."""

    env_names: tuple[str, ...] = ()
    env_values: tuple[tuple[str, str], ...] = ()
    codes: tuple[str, ...] = ()
    http_statuses: tuple[int, ...] = ()
    ports: tuple[int, ...] = ()
    paths: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    other_literals: tuple[str, ...] = ()

    def env(self) -> dict[str, str]:
        return dict(self.env_values)


@dataclass(frozen=True)
class SystemctlCommand:
    action: str
    unit: str
    sudo: bool
    text: str
    source: Source


@dataclass(frozen=True)
class HttpRequest:
    """A curl command from the runbook as method, URL and headers."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    text: str
    source: Source

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def path(self) -> str:
        parts = urlsplit(self.url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def url_for(self, base_url: str, **placeholders: str) -> str:
        """The URL with host and port replaced by `base_url`, and `<name>` placeholders filled in."""
        path = self.path
        for name, value in placeholders.items():
            path = path.replace(f"<{name}>", value)
        return base_url.rstrip("/") + path

    def header_values(self, env: Mapping[str, str]) -> dict[str, str]:
        """Headers with `$VAR` references expanded from `env` (missing variables expand to empty, as in a shell)."""
        return {name: ENV_REFERENCE.sub(lambda m: env.get(m.group(1), ""), value) for name, value in self.headers}

    def placeholders(self) -> list[str]:
        return re.findall(r"<([a-z_]+)>", self.path)


@dataclass(frozen=True)
class ShellCommand:
    text: str
    argv: tuple[str, ...]
    source: Source


@dataclass(frozen=True)
class Failure:
    id: str
    number: int | None
    title: str
    symptom: str
    fix: str
    symptom_ids: Identifiers
    fix_ids: Identifiers
    source: Source
    symptom_source: Source
    fix_source: Source


@dataclass(frozen=True)
class BreakGlassStep:
    id: str
    title: str
    text: str
    ids: Identifiers
    requests: tuple[HttpRequest, ...]
    systemctl: tuple[SystemctlCommand, ...]
    source: Source


@dataclass(frozen=True)
class Setting:
    """A `NAME=value` the runbook prescribes (a unit directive or an env limit)."""

    name: str
    value: str
    source: Source


@dataclass(frozen=True)
class RunbookItem:
    """One provable thing in the runbook: scenarios are tagged with these ids."""

    id: str
    section: str
    title: str
    source: Source


@dataclass
class Runbook:
    path: Path
    title: str
    sections: list[tuple[str, str, Source]] = field(default_factory=list)  # (kind, heading, source)
    unit_files: list[tuple[str, Source]] = field(default_factory=list)
    systemctl: list[SystemctlCommand] = field(default_factory=list)
    health_checks: list[HttpRequest] = field(default_factory=list)
    self_tests: list[ShellCommand] = field(default_factory=list)
    kill_switch: HttpRequest | None = None
    canary: ShellCommand | None = None
    canary_expected: list[tuple[str, Source]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    break_glass: list[BreakGlassStep] = field(default_factory=list)
    unit_directives: list[Setting] = field(default_factory=list)
    env_limits: list[Setting] = field(default_factory=list)
    unknown_sections: list[tuple[str, Source]] = field(default_factory=list)

    # lookups used by scenarios
    def failure(self, failure_id: str) -> Failure:
        for failure in self.failures:
            if failure.id == failure_id:
                return failure
        raise KeyError(f"the runbook {self.path} has no failure '{failure_id}' (it has: {[f.id for f in self.failures]})")

    def break_glass_step(self, step_id: str) -> BreakGlassStep:
        for step in self.break_glass:
            if step.id == step_id:
                return step
        raise KeyError(f"the runbook {self.path} has no break-glass step '{step_id}'")

    def section_source(self, kind: str) -> Source:
        for section_kind, _, source in self.sections:
            if section_kind == kind:
                return source
        raise KeyError(f"the runbook {self.path} has no {kind} section")

    def unit_directive(self, name: str) -> Setting:
        return _find_setting(self.unit_directives, name, self.path)

    def env_limit(self, name: str) -> Setting:
        return _find_setting(self.env_limits, name, self.path)

    def unit_names(self) -> list[str]:
        return [Path(path).name for path, _ in self.unit_files]

    def items(self) -> list[RunbookItem]:
        """Every item a scenario must prove, in runbook order."""
        found: list[RunbookItem] = []
        for kind, heading, source in self.sections:
            if kind == "failures":
                found += [RunbookItem(items.failure_item(f.id), heading, f.title, f.source) for f in self.failures]
            elif kind == "break_glass":
                found += [RunbookItem(items.break_glass_item(s.id), heading, s.title, s.source) for s in self.break_glass]
            elif kind == "health_checks":
                if self.health_checks:
                    found.append(RunbookItem(items.HEALTH_CHECKS, heading, "Observer API health checks", self.health_checks[0].source))
                if self.self_tests:
                    found.append(RunbookItem(items.SELF_TEST, heading, "Config check and self-test", self.self_tests[0].source))
            else:
                found.append(RunbookItem(items.section_item(kind), heading, heading, source))
        return found

    def item(self, item_id: str) -> RunbookItem:
        for item in self.items():
            if item.id == item_id:
                return item
        raise KeyError(f"the runbook {self.path} has no item '{item_id}'")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["items"] = [asdict(item) for item in self.items()]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def _find_setting(settings: list[Setting], name: str, path: Path) -> Setting:
    for setting in settings:
        if setting.name == name:
            return setting
    raise KeyError(f"the runbook {path} prescribes no {name}")
