"""Unit file syntax (systemd.syntax(7)): sections, `Key=Value` lines, comments, backslash continuations, and the
specifiers that name the unit (%n, %N, %p, %i, %I).

`parse_unit` gives a `UnitFile`: repeated keys kept in file order (an empty assignment resets a list), values with
specifiers expanded, and each directive's line number, so every error and report can point at the line.

It reads the unit's drop-ins as systemd does (systemd.unit(5), "drop-in directories"): every `*.conf` in
`<unit>.d/` beside the unit file, and in the less specific `<type>.d/` and dash-prefix directories
(`quantlab-.service.d/`), taken in the order of their file names; of two files with the same name the one in the
more specific directory is read. Their directives follow the unit file's, so a later assignment overrides an earlier
one and an empty one resets a list, exactly as in one file.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from quantlab_chaos.envfile import where
from quantlab_chaos.errors import UnitError

_KEY_OK = re.compile(r"[A-Za-z0-9_-]+\Z")


@dataclass(frozen=True)
class Directive:
    """One `Key=Value` line: value with specifiers expanded, raw as written, where it was."""

    section: str
    key: str
    value: str
    line: int
    raw: str = ""
    origin: str = ""  # the drop-in it comes from (`<unit>.d/10-x.conf`); "" for the unit file itself
    order: int = 0  # its place among every directive of the unit and its drop-ins: the larger, the later

    @property
    def where(self) -> str:
        """`line 12`, or `quantlab-worker.service.d/10-x.conf line 3` for a drop-in's directive."""
        return f"{self.origin} line {self.line}" if self.origin else f"line {self.line}"


@dataclass
class UnitFile:
    """A parsed unit file. Repeated keys are kept in file order; an empty assignment resets lists."""

    name: str
    path: Path | None = None
    sections: dict[str, list[Directive]] = field(default_factory=dict)
    unresolved_specifiers: list[tuple[int, str]] = field(default_factory=list)
    dropins: list[Path] = field(default_factory=list)  # the drop-in files read after the unit file, in order

    @property
    def source(self) -> str:
        """The file's path, or the unit's name when it was parsed from text: what messages point at."""
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
        """The value in effect for `key`, or `default`."""
        item = self.find(section, key)
        return item.value if item else default

    def get_all(self, section: str, key: str) -> list[str]:
        """The values in effect for a list-valued `key` (Environment=, ExecStartPre=, ...), in file order."""
        return [item.value for item in self.find_all(section, key)]

    def has_section(self, section: str) -> bool:
        """Whether the file has a [section] header (even an empty one)."""
        return section in self.sections

    def file_of(self, item: Directive) -> str:
        """The file a directive was read from: the unit file, or the drop-in beside it."""
        return str(self.path.parent / item.origin) if item.origin and self.path else self.source

    def error(self, line: int | None, problem: str, fix: str, item: Directive | None = None) -> UnitError:
        """A UnitError in the house style: `file:line: problem. Fix.` (the drop-in's file for its directive)."""
        if item is not None:
            return UnitError(f"{where(self.file_of(item), item.line)}: {problem}. {fix.rstrip('.')}.")
        return UnitError(f"{where(self.source, line)}: {problem}. {fix.rstrip('.')}.")


_SPECIFIER = re.compile(r"%(.)", re.DOTALL)


def _unit_name_parts(name: str) -> dict[str, str]:
    """The unit-name specifiers of `name` (`worker@blue.service`: n, N, p, i, I)."""
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
        order = sum(map(len, unit.sections.values()))
        unit.sections[section].append(Directive(section, key, value, number, raw.strip(), order=order))
    return unit


def dropin_files(unit_path: Path) -> list[Path]:
    """The drop-ins systemd reads for the unit at `unit_path`, in the order it applies them (see the module doc)."""
    name = unit_path.name
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        return []
    # Least specific first: `service.d`, then each dash prefix (`quantlab-.service.d`), then the unit's own.
    parts = stem.split("-")
    folders = [f"{suffix}.d"] + [f"{'-'.join(parts[:n])}-.{suffix}.d" for n in range(1, len(parts))] + [f"{name}.d"]
    chosen: dict[str, Path] = {}
    for folder in folders:
        directory = unit_path.parent / folder
        if directory.is_dir():
            for conf in directory.glob("*.conf"):
                if conf.is_file():
                    chosen[conf.name] = conf  # a more specific folder's file of the same name wins
    return [chosen[file_name] for file_name in sorted(chosen)]


def _with_dropin(unit: UnitFile, dropin: UnitFile, origin: str) -> None:
    """Appends the drop-in's directives after everything read so far (systemd's override order)."""
    order = sum(map(len, unit.sections.values()))
    for directive in dropin.directives():
        unit.sections.setdefault(directive.section, []).append(replace(directive, origin=origin, order=order))
        order += 1
    for section in dropin.sections:
        unit.sections.setdefault(section, [])
    unit.unresolved_specifiers.extend(dropin.unresolved_specifiers)


def parse_unit(path: str | os.PathLike[str], *, dropins: bool = True) -> UnitFile:
    """Reads and parses a unit file and (unless `dropins` is False) its drop-ins; a missing or unreadable file is a
    UnitError naming it."""
    unit_path = Path(path)
    unit = parse_unit_text(_read(unit_path, "unit file"), unit_path.name, unit_path)
    for conf in dropin_files(unit_path) if dropins else []:
        unit.dropins.append(conf)
        origin = f"{conf.parent.name}/{conf.name}"
        _with_dropin(unit, parse_unit_text(_read(conf, "drop-in"), unit_path.name, conf), origin)
    return unit


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UnitError(f"{path}: the {what} does not exist. Check the path (unit files are looked up "
                        f"relative to the QuantLab checkout) or create the unit.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UnitError(f"{path}: the {what} cannot be read ({exc}). Fix its permissions or encoding "
                        f"(unit files are UTF-8 text).") from None
