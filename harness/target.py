"""The target: a QuantLab checkout (the twin by default), its runbook, its unit files and its services' roles.

One profile fits the twin and real QuantLab: it knows QuantLab's layout (CONTRACT sections 1 and 8) and
discovers the unit files in the checkout. A checkout may add `.quantlab-chaos.toml` to say how a service is
probed (`[services."quantlab-replayd.service"] port_env = "REPLAYD_PORT"`, `health_path = "/health"`).
"""
from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from quantlab_chaos.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TWIN_ROOT = PROJECT_ROOT / "reference" / "quantlab"
RUNBOOK_IN_CHECKOUT = Path("docs/runbook.md")
PROFILE_FILE = ".quantlab-chaos.toml"
UNIT_GLOBS = ("ops/systemd/*.service", "ops/systemd/*.timer", "core/*/*.service", "core/*/*.timer")

CONFIG_CHECK = Path("core/release/ConfigCheck.js")
SELF_TEST = Path("core/release/SelfTest.js")
CANARY = Path("tools/run-canary-live.js")
REQUIRED_FILES = (CONFIG_CHECK, SELF_TEST, CANARY)


@dataclass(frozen=True)
class ServiceRole:
    """What a unit is for, and how the harness knows it is up."""

    role: str
    unit: str
    port_env: str | None = None
    health_path: str | None = None
    uses_exchange: bool = False
    declared: bool = False  # set by the checkout's .quantlab-chaos.toml: its port_env is known to be read


KNOWN_SERVICES: dict[str, ServiceRole] = {
    role.unit: role
    for role in (
        ServiceRole("observer", "quantlab-observer.service", "OBSERVER_PORT", "/observer/health"),
        ServiceRole("live", "quantlab-live.service", uses_exchange=True),
        ServiceRole("replayd", "quantlab-replayd.service", "REPLAYD_PORT", "/health"),
        ServiceRole("worker", "quantlab-worker.service", "WORKER_HEALTH_PORT", "/health"),
        ServiceRole("console", "quantlab-console-ui.service", "CONSOLE_PORT", "/health"),
        ServiceRole("compact", "quantlab-compact.service"),
    )
}


@dataclass(frozen=True)
class Target:
    """A QuantLab checkout as the harness drives it."""

    root: Path
    runbook: Path
    units: dict[str, Path] = field(default_factory=dict)
    services: dict[str, ServiceRole] = field(default_factory=dict)
    is_twin: bool = False

    @classmethod
    def load(cls, quantlab_root: str | os.PathLike[str] | None = None,
             runbook: str | os.PathLike[str] | None = None) -> Target:
        """The target at `quantlab_root` (default: QUANTLAB_ROOT, then the twin), checked for QuantLab's layout."""
        root = Path(quantlab_root or os.environ.get("QUANTLAB_ROOT") or TWIN_ROOT).expanduser().resolve()
        _check_layout(root)
        runbook_path = Path(runbook).expanduser().resolve() if runbook else root / RUNBOOK_IN_CHECKOUT
        if not runbook_path.is_file():
            hint = "pass --runbook FILE" if not runbook else "check the --runbook path"
            raise ConfigError(f"The runbook {runbook_path} does not exist; {hint} (QuantLab keeps it at docs/runbook.md).")
        units = _discover_units(root)
        services = _service_roles(root, units)
        return cls(root=root, runbook=runbook_path, units=units, services=services, is_twin=root == TWIN_ROOT.resolve())

    def unit_path(self, unit: str) -> Path:
        """The unit file's path in the checkout; ConfigError when the checkout has no such unit."""
        name = unit if "." in unit else f"{unit}.service"
        if name not in self.units:
            known = ", ".join(sorted(self.units)) or "none"
            raise ConfigError(f"The checkout {self.root} has no unit file {name} (found: {known}).")
        return self.units[name]

    def role(self, role_or_unit: str) -> ServiceRole:
        """The service for a role name ('observer') or unit name ('quantlab-observer.service')."""
        for service in self.services.values():
            if role_or_unit in (service.role, service.unit, service.unit.removesuffix(".service")):
                return service
        raise ConfigError(
            f"No service {role_or_unit!r} in {self.root}: known are "
            f"{', '.join(sorted(s.role for s in self.services.values())) or 'none'}. Use one of those names."
        )

    def check_units(self, services: Sequence[str] | None = None) -> None:
        """Refuses a checkout whose services cannot be booted from their unit files: ConfigError naming the
        file and line, or saying where unit files are looked for when there are none. `services` (roles or unit
        names) limits the check to those; by default every unit is checked."""
        from harness.sysd.spec import ServiceSpec
        from harness.sysd.unitfile import parse_unit

        if not any(name.endswith(".service") for name in self.units):
            raise ConfigError(
                f"{self.root} has no unit files ({', '.join(UNIT_GLOBS)} found nothing), so there is no service to "
                "boot. Point --quantlab-root at the checkout that holds QuantLab's systemd units."
            )
        wanted = {self.role(name).unit for name in services} if services else None
        for name, path in sorted(self.units.items()):
            if wanted is not None and name not in wanted:
                continue
            unit = parse_unit(path)  # UnitError (exit 2) names the file and line and says how to fix it
            if name.endswith(".service"):
                ServiceSpec.from_unit(unit)


def _check_layout(root: Path) -> None:
    if not root.is_dir():
        raise ConfigError(f"--quantlab-root {root} is not a folder. Point it at a QuantLab checkout (the folder holding core/ and ops/).")
    missing = [str(path) for path in REQUIRED_FILES if not (root / path).is_file()]
    if missing:
        raise ConfigError(
            f"{root} does not look like a QuantLab checkout: {', '.join(missing)} missing. Point --quantlab-root at "
            "the checkout's top folder (the one holding core/, tools/ and ops/)."
        )
    if (root / "package.json").is_file() and not (root / "node_modules").is_dir():
        raise ConfigError(f"{root} has no node_modules: run 'npm ci' in {root} first (make bootstrap does it for the twin).")


def _discover_units(root: Path) -> dict[str, Path]:
    units: dict[str, Path] = {}
    for pattern in UNIT_GLOBS:
        for path in sorted(root.glob(pattern)):
            units.setdefault(path.name, path)
    return units


def _service_roles(root: Path, units: dict[str, Path]) -> dict[str, ServiceRole]:
    overrides = _read_profile(root)
    services: dict[str, ServiceRole] = {}
    for name in units:
        if not name.endswith(".service"):
            continue
        role = KNOWN_SERVICES.get(name, ServiceRole(name.removeprefix("quantlab-").removesuffix(".service"), name))
        if name in overrides:
            role = replace(role, **cast(dict[str, Any], overrides[name]), declared=True)  # checked by _read_profile
        services[name] = role
    return services


@dataclass(frozen=True)
class Acceptance:
    """A finding beyond the runbook that the operator accepts by name in the checkout's .quantlab-chaos.toml
    (`[accept]` table: `"<finding name>" = "<why>"`); it is reported as accepted and no longer fails the run."""

    name: str
    reason: str
    where: str  # ".quantlab-chaos.toml line N"


def accepted_findings(root: Path) -> dict[str, Acceptance]:
    """The `[accept]` entries of the checkout's profile, by finding name; ConfigError when one is malformed."""
    path = root / PROFILE_FILE
    if not path.is_file():
        return {}
    text = path.read_text()
    try:
        table = tomllib.loads(text).get("accept", {})
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); fix it or remove it.") from exc
    if not isinstance(table, dict):
        raise ConfigError(f'{path}: accept must be a table of "<finding name>" = "<why it is accepted>" lines.')
    accepted = {}
    lines = text.splitlines()
    for name, reason in table.items():
        if not isinstance(reason, str) or not reason.strip():
            raise ConfigError(f"{path}: [accept] {name!r} needs a reason (a non-empty string saying why it is "
                              "accepted, e.g. a ticket); write it as \"<finding name>\" = \"<why>\".")
        number = next((index + 1 for index, line in enumerate(lines) if name in line and "=" in line), None)
        accepted[name] = Acceptance(name, reason.strip(), f"{PROFILE_FILE} line {number or '?'}")
    return accepted


def _read_profile(root: Path) -> dict[str, dict[str, object]]:
    path = root / PROFILE_FILE
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); fix it or remove it.") from exc
    allowed = {"port_env", "health_path", "role", "uses_exchange"}
    result: dict[str, dict[str, object]] = {}
    for unit, values in data.get("services", {}).items():
        unknown = set(values) - allowed
        if unknown:
            raise ConfigError(f"{path}: [services.{unit!r}] has unknown keys {sorted(unknown)}; allowed are "
                              f"{sorted(allowed)}. Rename or remove the unknown keys.")
        result[unit] = dict(values)
    return result
