"""The service model: what the supervisor needs to run one service, read from a unit's [Unit]/[Service] directives.

`ServiceSpec.from_unit` interprets the directives in HONOURED the way systemd does; anything the harness cannot run
faithfully (Type=notify, a relative ExecStart=, a value systemd would reject) is a UnitError naming the line and the
fix, and every other directive is kept, so the supervisor can report it as not applied.
"""
from __future__ import annotations

import dataclasses
import math
import re
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from harness.sysd.cgroups import Limits
from harness.sysd.unitfile import Directive, UnitFile
from harness.sysd.values import (
    ExitStatusSet,
    parse_boolean,
    parse_cpu_quota,
    parse_exit_statuses,
    parse_memory_limit,
    parse_rlimit,
    parse_signal,
    parse_tasks_max,
    parse_timespan,
    split_words,
)
from quantlab_chaos.envfile import NAME_OK, where
from quantlab_chaos.errors import UnitError

SERVICE_TYPES = ("simple", "exec", "oneshot")
UNSUPPORTED_TYPES = ("forking", "notify", "notify-reload", "dbus", "idle")
RESTART_POLICIES = ("no", "on-success", "on-failure", "on-abnormal", "on-watchdog", "on-abort", "always")
KILL_MODES = ("control-group", "mixed", "process", "none")
EXEC_PREFIX_CHARS = "-@:+!"

# systemd's defaults (DefaultTimeoutStartSec=, DefaultRestartSec=, DefaultStartLimit*=).
DEFAULT_TIMEOUT_SEC = 90.0
DEFAULT_RESTART_SEC = 0.1
DEFAULT_START_LIMIT_INTERVAL = 10.0
DEFAULT_START_LIMIT_BURST = 5

# What the supervisor applies; everything else in [Unit]/[Service] is reported as not honoured.
HONOURED = {
    "Unit": frozenset({"Description", "Documentation", "StartLimitIntervalSec", "StartLimitInterval",
                       "StartLimitBurst"}),
    "Service": frozenset({"Type", "ExecStart", "ExecStartPre", "ExecStartPost", "ExecStop", "ExecStopPost",
                          "WorkingDirectory", "User", "Environment", "EnvironmentFile", "Restart", "RestartSec",
                          "RestartPreventExitStatus", "TimeoutSec", "TimeoutStartSec", "TimeoutStopSec",
                          "RemainAfterExit", "KillMode", "KillSignal", "MemoryMax", "MemoryHigh", "CPUQuota",
                          "TasksMax", "LimitNOFILE",
                          "StandardOutput", "StandardError", "StartLimitInterval", "StartLimitIntervalSec",
                          "StartLimitBurst"}),
}

T = TypeVar("T")
D = TypeVar("D")


@dataclass(frozen=True)
class ExecCommand:
    """One Exec*= command line: argv after systemd's quoting rules, plus its prefixes.

    Prefixes: `-` failure ignored, `@` the second word is argv[0], `:` no $VAR substitution,
    `+` full privileges, `!`/`!!` ambient capabilities (recorded only).
    """

    path: str
    argv: tuple[str, ...]
    prefixes: str = ""
    raw: str = ""
    line: int = 0

    @property
    def ignore_failure(self) -> bool:
        """`-`: the command's failure does not fail the service."""
        return "-" in self.prefixes

    @property
    def substitute_env(self) -> bool:
        """No `:`: $VAR and ${VAR} are replaced."""
        return ":" not in self.prefixes

    def expand(self, env: Mapping[str, str]) -> list[str]:
        """argv with `${VAR}` (one word) and a lone `$VAR` (split at whitespace) replaced; `$$` is `$`."""
        if not self.substitute_env:
            return list(self.argv)
        result: list[str] = []
        for word in self.argv:
            lone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
            if lone:
                result.extend(env.get(lone.group(1), "").split())
                continue
            result.append(re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                                 lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), ""), word))
        return result

    def with_path(self, path: str) -> ExecCommand:
        """The command running another binary (argv[0] follows unless `@` gave it its own)."""
        argv = self.argv if "@" in self.prefixes else (path, *self.argv[1:])
        return dataclasses.replace(self, path=path, argv=argv)

    def __str__(self) -> str:
        return self.prefixes + " ".join(self.argv if "@" not in self.prefixes else (self.path, *self.argv))


@dataclass(frozen=True)
class EnvFileRef:
    """One EnvironmentFile= line: the file, whether a leading '-' lets it be missing, and where it was written."""

    path: Path
    optional: bool = False
    line: int = 0


@dataclass(frozen=True)
class OutputSpec:
    """StandardOutput=/StandardError=: kind is inherit, null, journal, file, append, truncate, ..."""

    kind: str
    path: Path | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" if self.path else self.kind


@dataclass(frozen=True)
class Rewrite:
    """One substitution made to fit a production unit onto a checkout, kept for the report."""

    field: str
    before: str
    after: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.before} -> {self.after} ({self.reason})"


@dataclass(frozen=True)
class ServiceSpec:
    """What the supervisor needs to run one service, taken from a unit file."""

    name: str
    unit: UnitFile = field(repr=False)
    type: str = "simple"
    exec_start: tuple[ExecCommand, ...] = ()
    exec_start_pre: tuple[ExecCommand, ...] = ()
    exec_start_post: tuple[ExecCommand, ...] = ()
    exec_stop: tuple[ExecCommand, ...] = ()
    exec_stop_post: tuple[ExecCommand, ...] = ()
    working_directory: Path | None = None
    working_directory_optional: bool = False
    working_directory_home: bool = False
    user: str | None = None
    environment: tuple[tuple[str, str], ...] = ()
    environment_files: tuple[EnvFileRef, ...] = ()
    restart: str = "no"
    restart_sec: float = DEFAULT_RESTART_SEC
    restart_prevent_exit_status: ExitStatusSet = ExitStatusSet()
    start_limit_interval: float = DEFAULT_START_LIMIT_INTERVAL
    start_limit_burst: int = DEFAULT_START_LIMIT_BURST
    timeout_start: float = DEFAULT_TIMEOUT_SEC
    timeout_stop: float = DEFAULT_TIMEOUT_SEC
    remain_after_exit: bool = False
    kill_mode: str = "control-group"
    kill_signal: signal.Signals = signal.SIGTERM
    memory_max: int | None = None
    memory_high: int | None = None
    cpu_quota: float | None = None
    tasks_max: int | None = None
    limit_nofile: tuple[int, int] | None = None
    standard_output: OutputSpec | None = None
    standard_error: OutputSpec | None = None
    warnings: tuple[str, ...] = ()
    rewrites: tuple[Rewrite, ...] = ()

    @classmethod
    def from_unit(cls, unit: UnitFile) -> ServiceSpec:
        """Interprets a service unit; anything the harness cannot run faithfully is a UnitError."""
        return _SpecReader(unit).read()

    @property
    def cgroup_limits(self) -> Limits:
        """MemoryMax=, MemoryHigh=, CPUQuota= and TasksMax=, for the cgroup the service runs in."""
        return Limits(self.memory_max, self.memory_high, self.cpu_quota, self.tasks_max)

    @property
    def env_dict(self) -> dict[str, str]:
        """Environment= assignments folded in order (later wins)."""
        return dict(self.environment)

    def unhonoured_directives(self) -> list[Directive]:
        """[Unit]/[Service] directives the supervisor does not apply (e.g. After=, ProtectSystem=), to report."""
        return [item for item in self.unit.directives()
                if item.section in HONOURED and item.key not in HONOURED[item.section]]

    def all_commands(self) -> Iterable[tuple[str, ExecCommand]]:
        """(field name, command) for every Exec*= command, in the order a start and a stop run them."""
        for label in ("exec_start_pre", "exec_start", "exec_start_post", "exec_stop", "exec_stop_post"):
            for command in getattr(self, label):
                yield label, command


class _SpecReader:
    """Reads one ServiceSpec; small methods per directive so each error names its line."""

    def __init__(self, unit: UnitFile) -> None:
        self.unit = unit
        self.warnings: list[str] = [
            f"{where(unit.source, line)}: specifier {spec} is not resolved by the harness; left as written"
            for line, spec in unit.unresolved_specifiers
        ]

    def fail(self, item: Directive | None, problem: str, fix: str) -> UnitError:
        """A UnitError at the directive's line (at the file when the problem is a directive that is missing)."""
        return self.unit.error(None, problem, fix, item)

    def value(self, key: str, parse: Callable[[str], T], default: D, what: str,
              section: str = "Service") -> T | D:
        """`key`'s value in effect, parsed; `default` when it is not set; a UnitError naming the line when invalid."""
        item = self.unit.find(section, key)
        if item is None:
            return default
        try:
            return parse(item.value)
        except (ValueError, KeyError) as exc:
            raise self.fail(item, f"{key}={item.value} is invalid ({exc})", f"Set {key}= to {what}") from None

    def read(self) -> ServiceSpec:
        """The whole spec; the checks that span several directives come first."""
        unit = self.unit
        if not unit.has_section("Service"):
            raise self.fail(None, "there is no [Service] section, so this is not a service unit",
                            "Point the harness at the .service file (timers and other units are not run)")
        kind = self.service_type()
        exec_start = self.commands("ExecStart")
        if not exec_start:
            raise self.fail(None, "there is no ExecStart= line", "Add ExecStart= with the command to run")
        if len(exec_start) > 1 and kind != "oneshot":
            raise self.fail(exec_start[1], f"Type={kind} allows one ExecStart= but {len(exec_start)} are set",
                            "Keep one ExecStart= or use Type=oneshot")
        restart = str(self.value("Restart", self.restart_policy, "no", "one of " + ", ".join(RESTART_POLICIES)))
        if kind == "oneshot" and restart in ("always", "on-success"):
            raise self.fail(unit.find("Service", "Restart"), f"Restart={restart} is not allowed for Type=oneshot",
                            "Use Restart=no or Restart=on-failure")
        timeout_all = self.value("TimeoutSec", parse_timespan, None, "a time span such as 90s")
        timeout_start_default = math.inf if kind == "oneshot" else DEFAULT_TIMEOUT_SEC
        workdir, workdir_optional, workdir_home = self.working_directory()
        return ServiceSpec(
            name=unit.name,
            unit=unit,
            type=kind,
            exec_start=tuple(self.parse_command(item) for item in exec_start),
            exec_start_pre=tuple(self.parse_command(item) for item in self.commands("ExecStartPre")),
            exec_start_post=tuple(self.parse_command(item) for item in self.commands("ExecStartPost")),
            exec_stop=tuple(self.parse_command(item) for item in self.commands("ExecStop")),
            exec_stop_post=tuple(self.parse_command(item) for item in self.commands("ExecStopPost")),
            working_directory=workdir,
            working_directory_optional=workdir_optional,
            working_directory_home=workdir_home,
            user=unit.get("Service", "User"),
            environment=self.environment(),
            environment_files=self.environment_files(),
            restart=restart,
            restart_sec=float(self.value("RestartSec", parse_timespan, DEFAULT_RESTART_SEC, "a time span such as 5s")),
            restart_prevent_exit_status=self.restart_prevent_exit_status(),
            start_limit_interval=self.start_limit_interval(),
            start_limit_burst=self.start_limit_burst(),
            timeout_start=float(self.value("TimeoutStartSec", parse_timespan,
                                           timeout_all if timeout_all is not None else timeout_start_default,
                                           "a time span such as 90s")),
            timeout_stop=float(self.value("TimeoutStopSec", parse_timespan,
                                          timeout_all if timeout_all is not None else DEFAULT_TIMEOUT_SEC,
                                          "a time span such as 90s")),
            remain_after_exit=bool(self.value("RemainAfterExit", parse_boolean, False, "yes or no")),
            kill_mode=str(self.value("KillMode", self.kill_mode, "control-group", "one of " + ", ".join(KILL_MODES))),
            kill_signal=self.value("KillSignal", parse_signal, signal.SIGTERM, "a signal name such as SIGTERM"),
            memory_max=self.value("MemoryMax", parse_memory_limit, None, "bytes with K, M, G or T, N%, or infinity"),
            memory_high=self.value("MemoryHigh", parse_memory_limit, None, "bytes with K, M, G or T, N%, or infinity"),
            cpu_quota=self.value("CPUQuota", parse_cpu_quota, None, "a percentage such as 80%"),
            tasks_max=self.value("TasksMax", parse_tasks_max, None, "a number of tasks, N%, or infinity"),
            limit_nofile=self.value("LimitNOFILE", parse_rlimit, None, "N, soft:hard or infinity"),
            standard_output=self.output("StandardOutput"),
            standard_error=self.output("StandardError"),
            warnings=tuple(self.warnings),
        )

    def service_type(self) -> str:
        """Type=, refused unless the supervisor can run it the way systemd would."""
        item = self.unit.find("Service", "Type")
        kind = item.value if item else "simple"
        if kind in SERVICE_TYPES:
            return kind
        if kind in UNSUPPORTED_TYPES:
            raise self.fail(item, f"Type={kind} is not supported by the harness supervisor",
                            "Use Type=simple, Type=exec or Type=oneshot (the supervisor does not speak sd_notify, "
                            "D-Bus or forking daemons)")
        raise self.fail(item, f"Type={kind} is not a systemd service type",
                        "Use Type=simple, Type=exec or Type=oneshot")

    @staticmethod
    def restart_policy(value: str) -> str:
        """Restart=: one of systemd's policies."""
        if value not in RESTART_POLICIES:
            raise ValueError(f"unknown policy {value!r}")
        return value

    @staticmethod
    def kill_mode(value: str) -> str:
        """KillMode=: one of systemd's modes."""
        if value not in KILL_MODES:
            raise ValueError(f"unknown mode {value!r}")
        return value

    def restart_prevent_exit_status(self) -> ExitStatusSet:
        """RestartPreventExitStatus=: a list directive, so its lines add up and an empty one resets the list."""
        found = ExitStatusSet()
        for item in self.unit.find_all("Service", "RestartPreventExitStatus"):
            try:
                found |= parse_exit_statuses(item.value)
            except ValueError as exc:
                raise self.fail(item, f"RestartPreventExitStatus={item.value} is invalid ({exc})",
                                "List exit statuses (0-255, or names such as EXEC) and signal names such as SIGABRT, "
                                "separated by spaces") from None
        return found

    def commands(self, key: str) -> list[Directive]:
        """The Exec*= lines in effect for `key`, unparsed (so an error can still name its line)."""
        return self.unit.find_all("Service", key)

    def parse_command(self, item: Directive) -> ExecCommand:
        """One Exec*= line: its prefixes, then its words with systemd's quoting."""
        text = item.value.strip()
        prefixes = ""
        while text and text[0] in EXEC_PREFIX_CHARS:
            prefixes += text[0]
            text = text[1:]
        try:
            words = split_words(text)
        except ValueError as exc:
            raise self.fail(item, f"{item.key}= cannot be split into words ({exc})",
                            'Quote arguments with "..." or \'...\' and escape backslashes as \\\\') from None
        if "@" in prefixes:
            if len(words) < 2:
                raise self.fail(item, f"{item.key}=@ needs the program and then its argv[0]",
                                "Write it as @/path/to/program name args...")
            path, argv = words[0], tuple(words[1:])
        elif not words:
            raise self.fail(item, f"{item.key}= has no command", "Write the program path and its arguments")
        else:
            path, argv = words[0], tuple(words)
        if "/" in path and not path.startswith("/"):
            raise self.fail(item, f"{item.key}= starts with the relative path {path}",
                            "Use an absolute path (or a bare program name that is found on PATH)")
        return ExecCommand(path=path, argv=argv, prefixes=prefixes, raw=item.value, line=item.line)

    def working_directory(self) -> tuple[Path | None, bool, bool]:
        """(path, optional because of a leading '-', '~' for the user's home) from WorkingDirectory=."""
        item = self.unit.find("Service", "WorkingDirectory")
        if item is None:
            return None, False, False
        value = item.value.strip()
        optional = value.startswith("-")
        value = value.lstrip("-")
        if value == "~":
            return None, optional, True
        if not value.startswith("/"):
            raise self.fail(item, f"WorkingDirectory={item.value} is not an absolute path",
                            "Use an absolute path, '~' for the user's home, or prefix '-' to allow it to be missing")
        return Path(value), optional, False

    def environment(self) -> tuple[tuple[str, str], ...]:
        """Environment= assignments in order; a word that is not NAME=value is skipped with a warning (as systemd)."""
        pairs: list[tuple[str, str]] = []
        for item in self.unit.find_all("Service", "Environment"):
            try:
                words = split_words(item.value)
            except ValueError as exc:
                raise self.fail(item, f"Environment= cannot be split into assignments ({exc})",
                                'Quote each assignment whole, e.g. Environment="A=b c" D=e') from None
            for word in words:
                name, eq, value = word.partition("=")
                if not eq or not NAME_OK.match(name):
                    self.warnings.append(f"{where(self.unit.file_of(item), item.line)}: Environment= word {word!r} is "
                                         f"not NAME=value; systemd ignores it")
                    continue
                pairs.append((name, value))
        return tuple(pairs)

    def environment_files(self) -> tuple[EnvFileRef, ...]:
        """EnvironmentFile= lines in effect, each absolute and optionally '-'-prefixed."""
        refs = []
        for item in self.unit.find_all("Service", "EnvironmentFile"):
            value = item.value.strip()
            optional = value.startswith("-")
            path = value[1:] if optional else value
            if not path.startswith("/"):
                raise self.fail(item, f"EnvironmentFile={item.value} is not an absolute path",
                                "Use an absolute path; prefix '-' if the file may be missing")
            refs.append(EnvFileRef(Path(path), optional, item.line))
        return tuple(refs)

    def start_limit_interval(self) -> float:
        # [Unit] StartLimitIntervalSec= is current; [Service] StartLimitInterval= is the legacy spelling.
        # systemd stores both in one field, so the assignment that comes last (drop-ins after the file) wins.
        candidates = [item for item in (self.unit.find("Unit", "StartLimitIntervalSec"),
                                        self.unit.find("Unit", "StartLimitInterval"),
                                        self.unit.find("Service", "StartLimitIntervalSec"),
                                        self.unit.find("Service", "StartLimitInterval")) if item]
        if not candidates:
            return DEFAULT_START_LIMIT_INTERVAL
        item = max(candidates, key=lambda d: d.order)
        try:
            return parse_timespan(item.value)
        except ValueError as exc:
            raise self.fail(item, f"{item.key}={item.value} is invalid ({exc})",
                            "Use a time span such as 60s") from None

    def start_limit_burst(self) -> int:
        """StartLimitBurst= from [Unit] or [Service]; the later assignment wins, as for the interval."""
        candidates = [item for item in (self.unit.find("Unit", "StartLimitBurst"),
                                        self.unit.find("Service", "StartLimitBurst")) if item]
        if not candidates:
            return DEFAULT_START_LIMIT_BURST
        item = max(candidates, key=lambda d: d.order)
        if not item.value.strip().isdigit():
            raise self.fail(item, f"StartLimitBurst={item.value} is not a whole number", "Use e.g. StartLimitBurst=5")
        return int(item.value)

    def output(self, key: str) -> OutputSpec | None:
        """StandardOutput=/StandardError=, None when unset (the supervisor's journal only)."""
        item = self.unit.find("Service", key)
        if item is None:
            return None
        kind, colon, path = item.value.strip().partition(":")
        if kind in ("file", "append", "truncate"):
            if not colon or not path.startswith("/"):
                raise self.fail(item, f"{key}={item.value} needs an absolute path", f"Write {key}={kind}:/abs/path")
            return OutputSpec(kind, Path(path))
        if kind in ("inherit", "null", "tty", "journal", "kmsg", "journal+console", "kmsg+console", "socket", "fd"):
            return OutputSpec(item.value.strip())
        raise self.fail(item, f"{key}={item.value} is not an output systemd knows",
                        "Use inherit, null, journal, file:PATH, append:PATH or truncate:PATH")

