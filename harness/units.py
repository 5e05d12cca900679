"""systemd unit files, read the way systemd reads them, and turned into specs the supervisor can boot.

`parse_unit` gives a `UnitFile` (sections, repeated keys in order, line numbers for reports);
`ServiceSpec.from_unit` interprets the [Unit]/[Service] directives the harness honours;
`rewrite_for_checkout` points a spec written for production (`/home/deploy/quantlab-backend`,
`/etc/quantlab/*.env`, `/usr/bin/node`) at a checkout and the env files the harness writes, and
records every substitution so it can be reported rather than hidden. `EnvFile` and `write_env_file`
read and write env files with systemd's EnvironmentFile= rules.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import resource
import shutil
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from quantlab_chaos.envfile import NAME_OK as _NAME_OK
from quantlab_chaos.envfile import EnvFile, write_env_file
from quantlab_chaos.envfile import where as _where
from quantlab_chaos.errors import ConfigError, UnitError
from quantlab_chaos.redact import REDACTED, is_secret_name, redact_env

DEPLOY_ROOT = "/home/deploy/quantlab-backend"
ENV_DIR = "/etc/quantlab"
RESOLVABLE_BINARIES = ("/usr/bin/node", "/usr/bin/python3", "/usr/bin/env")

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
                          "TimeoutSec", "TimeoutStartSec", "TimeoutStopSec", "RemainAfterExit", "KillMode",
                          "KillSignal", "MemoryMax", "CPUQuota", "LimitNOFILE", "StandardOutput", "StandardError",
                          "StartLimitInterval", "StartLimitIntervalSec", "StartLimitBurst"}),
}

_KEY_OK = re.compile(r"[A-Za-z0-9_-]+\Z")


# ---------------------------------------------------------------------------------------------
# Value syntax shared by several directives: time spans, sizes, booleans, quoting
# ---------------------------------------------------------------------------------------------

_TIME_UNITS = {
    "ns": 1e-9, "nsec": 1e-9,
    "us": 1e-6, "usec": 1e-6, "µs": 1e-6, "μs": 1e-6,
    "ms": 1e-3, "msec": 1e-3,
    "": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
    "M": 2629800.0, "month": 2629800.0, "months": 2629800.0,
    "y": 31557600.0, "year": 31557600.0, "years": 31557600.0,
}
_TIME_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-zµμ]*)")


def parse_timespan(text: str) -> float:
    """Seconds in a systemd time span (`5`, `5s`, `500ms`, `1min 30s`, `2h`, `infinity` -> math.inf).

    Raises ValueError for anything systemd would reject.
    """
    value = text.strip()
    if value == "infinity":
        return math.inf
    if not value:
        raise ValueError("empty time span")
    total, pos = 0.0, 0
    while pos < len(value):
        match = _TIME_PART.match(value, pos)
        if not match or match.group(2) not in _TIME_UNITS:
            raise ValueError(f"{text!r} is not a time span (examples: 5, 5s, 500ms, '1min 30s', 2h, infinity)")
        total += float(match.group(1)) * _TIME_UNITS[match.group(2)]
        pos = match.end()
        while pos < len(value) and value[pos].isspace():
            pos += 1
    return total


_SIZE_SUFFIX = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5, "E": 1024**6}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTPE]?)B?\Z")


def physical_memory_bytes() -> int:
    """Total RAM, the base of `MemoryMax=N%`."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def parse_memory_limit(text: str) -> int | None:
    """Bytes in a MemoryMax= value (`2G`, `512M`, `1073741824`, `50%`); None for `infinity`."""
    value = text.strip()
    if value == "infinity":
        return None
    if value.endswith("%"):
        percent = float(value[:-1])
        if not 0 <= percent <= 100:
            raise ValueError(f"{text!r} is not a percentage between 0% and 100%")
        return int(physical_memory_bytes() * percent / 100)
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{text!r} is not a size (use bytes, or K, M, G, T with base 1024, or N%, or infinity)")
    return int(float(match.group(1)) * _SIZE_SUFFIX[match.group(2)])


def parse_cpu_quota(text: str) -> float:
    """The percent of one CPU in a CPUQuota= value (`80%` -> 80.0; `200%` is two CPUs)."""
    value = text.strip()
    if not value.endswith("%"):
        raise ValueError(f"{text!r} is not a CPU quota (write it as a percentage, e.g. 80%)")
    percent = float(value[:-1])
    if percent <= 0:
        raise ValueError(f"{text!r} must be above 0%")
    return percent


def parse_rlimit(text: str) -> tuple[int, int]:
    """(soft, hard) from `N`, `soft:hard` or `infinity` (resource.RLIM_INFINITY for infinity)."""

    def one(part: str) -> int:
        part = part.strip()
        if part == "infinity":
            return resource.RLIM_INFINITY
        if not part.isdigit():
            raise ValueError(f"{text!r} is not a limit (use N, soft:hard or infinity)")
        return int(part)

    soft, _, hard = text.partition(":")
    return (one(soft), one(hard)) if hard else (one(soft), one(soft))


def parse_boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "yes", "y", "true", "t", "on"):
        return True
    if value in ("0", "no", "n", "false", "f", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use yes or no)")


def parse_signal(text: str) -> signal.Signals:
    value = text.strip().upper()
    if value.isdigit():
        return signal.Signals(int(value))
    return signal.Signals[value if value.startswith("SIG") else "SIG" + value]


_C_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
              "\\": "\\", '"': '"', "'": "'", "s": " ", ";": ";"}


def _unescape_one(text: str, pos: int) -> tuple[str, int]:
    """Decode the C escape whose backslash is at text[pos-1]; returns (char, next position)."""
    if pos >= len(text):
        raise ValueError("a backslash ends the value")
    char = text[pos]
    if char in _C_ESCAPES:
        return _C_ESCAPES[char], pos + 1
    if char.isspace():
        return char, pos + 1
    for lead, width, base in (("x", 2, 16), ("u", 4, 16), ("U", 8, 16)):
        if char == lead:
            digits = text[pos + 1:pos + 1 + width]
            if len(digits) != width or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError(f"bad escape \\{lead}{digits}")
            return chr(int(digits, base)), pos + 1 + width
    if char in "01234567":
        digits = text[pos:pos + 3]
        if len(digits) != 3 or any(c not in "01234567" for c in digits):
            raise ValueError(f"bad octal escape \\{digits}")
        return chr(int(digits, 8)), pos + 3
    raise ValueError(f"unknown escape \\{char}")


def split_words(text: str) -> list[str]:
    """Words of a command line or Environment= value, unquoted and C-unescaped as systemd does.

    Whitespace separates words; single or double quotes may start anywhere in a word and keep
    whitespace; backslash escapes (\\n, \\t, \\", \\xNN, ...) work inside and outside quotes.
    Raises ValueError on an unclosed quote or an unknown escape.
    """
    words: list[str] = []
    pos, size = 0, len(text)
    while True:
        while pos < size and text[pos].isspace():
            pos += 1
        if pos >= size:
            return words
        word: list[str] = []
        quote = ""
        while pos < size:
            char = text[pos]
            if char == "\\":
                decoded, pos = _unescape_one(text, pos + 1)
                word.append(decoded)
            elif quote:
                pos += 1
                if char == quote:
                    quote = ""
                else:
                    word.append(char)
            elif char in "'\"":
                quote, pos = char, pos + 1
            elif char.isspace():
                break
            else:
                word.append(char)
                pos += 1
        if quote:
            raise ValueError(f"the quote {quote} is never closed")
        words.append("".join(word))


# ---------------------------------------------------------------------------------------------
# Unit file syntax
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Directive:
    """One `Key=Value` line: value with specifiers expanded, raw as written, where it was."""

    section: str
    key: str
    value: str
    line: int
    raw: str = ""


@dataclass
class UnitFile:
    """A parsed unit file. Repeated keys are kept in file order; an empty assignment resets lists."""

    name: str
    path: Path | None = None
    sections: dict[str, list[Directive]] = field(default_factory=dict)
    unresolved_specifiers: list[tuple[int, str]] = field(default_factory=list)

    @property
    def source(self) -> str:
        return str(self.path) if self.path else self.name

    def directives(self, section: str | None = None) -> list[Directive]:
        """Every directive in file order (optionally of one section), for reports and drift checks."""
        if section is not None:
            return list(self.sections.get(section, []))
        return [item for items in self.sections.values() for item in items]

    def find_all(self, section: str, key: str) -> list[Directive]:
        """The directives for `key` that are in effect: those after the last empty assignment."""
        found: list[Directive] = []
        for item in self.sections.get(section, []):
            if item.key == key:
                if item.value.strip() == "":
                    found = []
                else:
                    found.append(item)
        return found

    def find(self, section: str, key: str) -> Directive | None:
        """The last assignment of `key` (None if absent or reset by an empty assignment)."""
        items = [item for item in self.sections.get(section, []) if item.key == key]
        if not items or items[-1].value.strip() == "":
            return None
        return items[-1]

    def get(self, section: str, key: str, default: str | None = None) -> str | None:
        item = self.find(section, key)
        return item.value if item else default

    def get_all(self, section: str, key: str) -> list[str]:
        return [item.value for item in self.find_all(section, key)]

    def has_section(self, section: str) -> bool:
        return section in self.sections

    def error(self, line: int | None, problem: str, fix: str) -> UnitError:
        return UnitError(f"{_where(self.source, line)}: {problem}. {fix.rstrip('.')}.")


_SPECIFIER = re.compile(r"%(.)", re.DOTALL)


def _unit_name_parts(name: str) -> dict[str, str]:
    stem, _, _suffix = name.rpartition(".") if "." in name else (name, "", "")
    prefix, at, instance = stem.partition("@")
    return {"n": name, "N": stem, "p": prefix, "i": instance if at else "", "I": instance if at else ""}


def expand_specifiers(value: str, unit_name: str) -> tuple[str, list[str]]:
    """Expands %%, %n, %N, %p, %i, %I; other specifiers are left as written and returned for reporting."""
    parts = _unit_name_parts(unit_name)
    unresolved: list[str] = []

    def replace(match: re.Match[str]) -> str:
        letter = match.group(1)
        if letter == "%":
            return "%"
        if letter in parts:
            return parts[letter]
        unresolved.append("%" + letter)
        return match.group(0)

    return _SPECIFIER.sub(replace, value), unresolved


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """(first line number, line) with backslash continuations joined; comments inside are dropped."""
    pending: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped[:1] in ("#", ";"):
            continue  # comments are never continued, and may sit inside a continued line
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        yield start, " ".join(pending) if len(pending) > 1 else pending[0]
        pending = []
    if pending:
        yield start, " ".join(pending)


def parse_unit_text(text: str, name: str, path: Path | None = None) -> UnitFile:
    """Parses unit file text (systemd.syntax(7)); `name` (e.g. `quantlab-replayd.service`) feeds %n, %N, %i."""
    unit = UnitFile(name=name, path=path)
    section: str | None = None
    for number, line in _logical_lines(text):
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3 or "[" in line[1:-1] or "]" in line[1:-1]:
                raise unit.error(number, f"the section header {line!r} is malformed",
                                 "Write section headers as [Name] alone on their line, e.g. [Service]")
            section = line[1:-1]
            unit.sections.setdefault(section, [])
            continue
        key, eq, raw = line.partition("=")
        key = key.strip()
        if not eq:
            raise unit.error(number, f"the line {line!r} is neither a [Section] header nor a Key=Value assignment",
                             "Add the missing '=' or turn the line into a comment with '#'")
        if section is None:
            raise unit.error(number, f"the assignment {key}= comes before any [Section] header",
                             "Move it under [Unit], [Service] or [Install]")
        if not _KEY_OK.match(key):
            raise unit.error(number, f"{key!r} is not a valid directive name",
                             "Directive names use only letters, digits, '-' and '_'")
        value, unresolved = expand_specifiers(raw.strip(), name)
        unit.unresolved_specifiers.extend((number, spec) for spec in unresolved)
        unit.sections[section].append(Directive(section, key, value, number, raw.strip()))
    return unit


def parse_unit(path: str | os.PathLike[str]) -> UnitFile:
    """Reads and parses a unit file; a missing or unreadable file is a UnitError."""
    unit_path = Path(path)
    try:
        text = unit_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UnitError(f"{unit_path}: the unit file does not exist. Check the path (unit files are looked up "
                        f"relative to the QuantLab checkout) or create the unit.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UnitError(f"{unit_path}: the unit file cannot be read ({exc}). Fix its permissions or encoding "
                        f"(unit files are UTF-8 text).") from None
    return parse_unit_text(text, unit_path.name, unit_path)


# ---------------------------------------------------------------------------------------------
# The service model
# ---------------------------------------------------------------------------------------------

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
        return "-" in self.prefixes

    @property
    def substitute_env(self) -> bool:
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
        argv = self.argv if "@" in self.prefixes else (path, *self.argv[1:])
        return dataclasses.replace(self, path=path, argv=argv)

    def __str__(self) -> str:
        return self.prefixes + " ".join(self.argv if "@" not in self.prefixes else (self.path, *self.argv))


@dataclass(frozen=True)
class EnvFileRef:
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
    start_limit_interval: float = DEFAULT_START_LIMIT_INTERVAL
    start_limit_burst: int = DEFAULT_START_LIMIT_BURST
    timeout_start: float = DEFAULT_TIMEOUT_SEC
    timeout_stop: float = DEFAULT_TIMEOUT_SEC
    remain_after_exit: bool = False
    kill_mode: str = "control-group"
    kill_signal: signal.Signals = signal.SIGTERM
    memory_max: int | None = None
    cpu_quota: float | None = None
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
    def env_dict(self) -> dict[str, str]:
        """Environment= assignments folded in order (later wins)."""
        return dict(self.environment)

    def unhonoured_directives(self) -> list[Directive]:
        """[Unit]/[Service] directives the supervisor does not apply (e.g. After=, ProtectSystem=), to report."""
        return [item for item in self.unit.directives()
                if item.section in HONOURED and item.key not in HONOURED[item.section]]

    def all_commands(self) -> Iterable[tuple[str, ExecCommand]]:
        for label in ("exec_start_pre", "exec_start", "exec_start_post", "exec_stop", "exec_stop_post"):
            for command in getattr(self, label):
                yield label, command


class _SpecReader:
    """Reads one ServiceSpec; small methods per directive so each error names its line."""

    def __init__(self, unit: UnitFile) -> None:
        self.unit = unit
        self.warnings: list[str] = [
            f"{_where(unit.source, line)}: specifier {spec} is not resolved by the harness; left as written"
            for line, spec in unit.unresolved_specifiers
        ]

    def fail(self, item: Directive | None, problem: str, fix: str) -> UnitError:
        return self.unit.error(item.line if item else None, problem, fix)

    def value(self, key: str, parse: Callable[[str], object], default: object, what: str,
              section: str = "Service") -> object:
        item = self.unit.find(section, key)
        if item is None:
            return default
        try:
            return parse(item.value)
        except (ValueError, KeyError) as exc:
            raise self.fail(item, f"{key}={item.value} is invalid ({exc})", f"Set {key}= to {what}") from None

    def read(self) -> ServiceSpec:
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
            cpu_quota=self.value("CPUQuota", parse_cpu_quota, None, "a percentage such as 80%"),
            limit_nofile=self.value("LimitNOFILE", parse_rlimit, None, "N, soft:hard or infinity"),
            standard_output=self.output("StandardOutput"),
            standard_error=self.output("StandardError"),
            warnings=tuple(self.warnings),
        )

    def service_type(self) -> str:
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
        if value not in RESTART_POLICIES:
            raise ValueError(f"unknown policy {value!r}")
        return value

    @staticmethod
    def kill_mode(value: str) -> str:
        if value not in KILL_MODES:
            raise ValueError(f"unknown mode {value!r}")
        return value

    def commands(self, key: str) -> list[Directive]:
        return self.unit.find_all("Service", key)

    def parse_command(self, item: Directive) -> ExecCommand:
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
        pairs: list[tuple[str, str]] = []
        for item in self.unit.find_all("Service", "Environment"):
            try:
                words = split_words(item.value)
            except ValueError as exc:
                raise self.fail(item, f"Environment= cannot be split into assignments ({exc})",
                                'Quote each assignment whole, e.g. Environment="A=b c" D=e') from None
            for word in words:
                name, eq, value = word.partition("=")
                if not eq or not _NAME_OK.match(name):
                    self.warnings.append(f"{_where(self.unit.source, item.line)}: Environment= word {word!r} is "
                                         f"not NAME=value; systemd ignores it")
                    continue
                pairs.append((name, value))
        return tuple(pairs)

    def environment_files(self) -> tuple[EnvFileRef, ...]:
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
        # systemd stores both in one field, so the assignment that comes last in the file wins.
        candidates = [item for item in (self.unit.find("Unit", "StartLimitIntervalSec"),
                                        self.unit.find("Unit", "StartLimitInterval"),
                                        self.unit.find("Service", "StartLimitIntervalSec"),
                                        self.unit.find("Service", "StartLimitInterval")) if item]
        if not candidates:
            return DEFAULT_START_LIMIT_INTERVAL
        item = max(candidates, key=lambda d: d.line)
        try:
            return parse_timespan(item.value)
        except ValueError as exc:
            raise self.fail(item, f"{item.key}={item.value} is invalid ({exc})",
                            "Use a time span such as 60s") from None

    def start_limit_burst(self) -> int:
        candidates = [item for item in (self.unit.find("Unit", "StartLimitBurst"),
                                        self.unit.find("Service", "StartLimitBurst")) if item]
        if not candidates:
            return DEFAULT_START_LIMIT_BURST
        item = max(candidates, key=lambda d: d.line)
        if not item.value.strip().isdigit():
            raise self.fail(item, f"StartLimitBurst={item.value} is not a whole number", "Use e.g. StartLimitBurst=5")
        return int(item.value)

    def output(self, key: str) -> OutputSpec | None:
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


# ---------------------------------------------------------------------------------------------
# Fitting a production unit onto a checkout
# ---------------------------------------------------------------------------------------------

EnvFileMap = Mapping[str, "os.PathLike[str] | str"] | Callable[[Path], "os.PathLike[str] | str | None"]


def _replace_root(text: str, root: str, checkout: str) -> str:
    return re.sub(re.escape(root.rstrip("/")) + r"(?=/|$|[^\w.-])", lambda _m: checkout, text)


def _env_file_target(ref: EnvFileRef, env_file_map: EnvFileMap) -> Path | None:
    if callable(env_file_map):
        target = env_file_map(ref.path)
    else:
        target = env_file_map.get(str(ref.path), env_file_map.get(ref.path.name))
    return Path(target) if target is not None else None


def rewrite_for_checkout(
    spec: ServiceSpec,
    *,
    checkout: str | os.PathLike[str],
    deploy_root: str = DEPLOY_ROOT,
    env_file_map: EnvFileMap | None = None,
    search_path: str | None = None,
    env_dir: str = ENV_DIR,
    resolve_binaries: Iterable[str] = RESOLVABLE_BINARIES,
) -> ServiceSpec:
    """`spec` with the deploy root replaced by `checkout`, `/etc/quantlab/*.env` replaced by the
    harness's env files, and missing `/usr/bin/node|python3|env` replaced by the binary on PATH.

    `env_file_map` maps an env file's full path or its file name (`replayd.env`) to the file the
    harness wrote, or is a callable taking the production path. Binaries in `resolve_binaries` that
    do not exist are looked up on `search_path` (default: $PATH). Every change is in `.rewrites`.
    """
    resolvable = frozenset(resolve_binaries)
    root = deploy_root.rstrip("/")
    target = str(Path(checkout).resolve())
    rewrites: list[Rewrite] = list(spec.rewrites)

    def rebase(field_name: str, text: str) -> str:
        changed = _replace_root(text, root, target)
        if changed != text:
            rewrites.append(Rewrite(field_name, text, changed, "deploy root -> checkout"))
        return changed

    def command(label: str, cmd: ExecCommand) -> ExecCommand:
        argv = tuple(rebase(f"{label}[{index}]", word) for index, word in enumerate(cmd.argv))
        rebased = dataclasses.replace(cmd, path=_replace_root(cmd.path, root, target), argv=argv)
        if "@" in cmd.prefixes and rebased.path != cmd.path:
            rewrites.append(Rewrite(f"{label}.path", cmd.path, rebased.path, "deploy root -> checkout"))
        return _resolve_binary(label, rebased, rewrites, search_path, resolvable)

    def commands(label: str) -> tuple[ExecCommand, ...]:
        return tuple(command(label, cmd) for cmd in getattr(spec, label))

    workdir = spec.working_directory
    if workdir is not None:
        workdir = Path(rebase("WorkingDirectory", str(workdir)))
    env_files = tuple(_rewrite_env_file(ref, root, target, env_file_map, env_dir, spec, rewrites)
                      for ref in spec.environment_files)
    environment = tuple((name, _rebase_env_value(name, value, root, target, rewrites))
                        for name, value in spec.environment)
    outputs = {}
    for label in ("standard_output", "standard_error"):
        output: OutputSpec | None = getattr(spec, label)
        if output is not None and output.path is not None:
            output = OutputSpec(output.kind, Path(rebase(label, str(output.path))))
        outputs[label] = output
    return dataclasses.replace(
        spec,
        exec_start=commands("exec_start"),
        exec_start_pre=commands("exec_start_pre"),
        exec_start_post=commands("exec_start_post"),
        exec_stop=commands("exec_stop"),
        exec_stop_post=commands("exec_stop_post"),
        working_directory=workdir,
        environment_files=env_files,
        environment=environment,
        rewrites=tuple(rewrites),
        **outputs,
    )


def _rebase_env_value(name: str, value: str, root: str, target: str, rewrites: list[Rewrite]) -> str:
    changed = _replace_root(value, root, target)
    if changed != value:
        shown = (REDACTED, REDACTED) if is_secret_name(name) else (value, changed)
        rewrites.append(Rewrite(f"Environment {name}", shown[0], shown[1], "deploy root -> checkout"))
    return changed


def _rewrite_env_file(ref: EnvFileRef, root: str, target: str, env_file_map: EnvFileMap | None, env_dir: str,
                      spec: ServiceSpec, rewrites: list[Rewrite]) -> EnvFileRef:
    if str(ref.path.parent) == env_dir.rstrip("/") and ref.path.suffix == ".env":
        replacement = _env_file_target(ref, env_file_map) if env_file_map is not None else None
        if replacement is None:
            raise UnitError(f"{_where(spec.unit.source, ref.line)}: EnvironmentFile={ref.path} has no env file "
                            f"written by the harness. Add {ref.path.name!r} (or its full path) to env_file_map.")
        rewrites.append(Rewrite("EnvironmentFile", str(ref.path), str(replacement), "harness env file"))
        return dataclasses.replace(ref, path=replacement)
    rebased = _replace_root(str(ref.path), root, target)
    if rebased != str(ref.path):
        rewrites.append(Rewrite("EnvironmentFile", str(ref.path), rebased, "deploy root -> checkout"))
        return dataclasses.replace(ref, path=Path(rebased))
    return ref


def _resolve_binary(label: str, cmd: ExecCommand, rewrites: list[Rewrite], search_path: str | None,
                    resolvable: frozenset[str]) -> ExecCommand:
    if cmd.path not in resolvable or os.access(cmd.path, os.X_OK):
        return cmd
    found = shutil.which(Path(cmd.path).name, path=search_path if search_path is not None else os.environ.get("PATH"))
    if found is None:
        return cmd  # the start fails with 203/EXEC and says which binary is missing
    rewrites.append(Rewrite(f"{label}.path", cmd.path, found, f"{cmd.path} does not exist here; using PATH"))
    return cmd.with_path(found)


def load_service(
    unit_path: str | os.PathLike[str],
    *,
    checkout: str | os.PathLike[str],
    env_file_map: EnvFileMap | None = None,
    deploy_root: str = DEPLOY_ROOT,
    search_path: str | None = None,
) -> ServiceSpec:
    """parse_unit + ServiceSpec.from_unit + rewrite_for_checkout, the usual way to get a bootable spec."""
    spec = ServiceSpec.from_unit(parse_unit(unit_path))
    return rewrite_for_checkout(spec, checkout=checkout, deploy_root=deploy_root, env_file_map=env_file_map,
                                search_path=search_path)
