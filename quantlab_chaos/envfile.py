"""Environment files read and written with systemd's EnvironmentFile= rules (shared by the harness and the canary)."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from quantlab_chaos.errors import UnitError

NAME_OK = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def where(source: str | os.PathLike[str] | None, line: int | None) -> str:
    """`file:line` for messages, `<unit>` when the text has no file."""
    name = str(source) if source else "<unit>"
    return f"{name}:{line}" if line else name


@dataclass
class EnvFile:
    """An env file read with systemd's rules: KEY=VALUE lines, '#'/';' comments at line start,
    single quotes literal, double quotes with backslash escapes for \\ \" ` $, backslash-newline
    continuations, no `export` and no inline comments. Invalid lines are skipped with a warning,
    as systemd does."""

    path: Path | None
    values: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> EnvFile:
        env_path = Path(path)
        try:
            text = env_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UnitError(f"{env_path}: the environment file does not exist. Write it before starting the "
                            f"service, or mark it optional in the unit with EnvironmentFile=-{env_path}.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UnitError(f"{env_path}: the environment file cannot be read ({exc}). Fix its permissions "
                            f"or encoding.") from None
        return cls.parse(text, env_path)

    @classmethod
    def parse(cls, text: str, path: Path | None = None) -> EnvFile:
        env = cls(path=path)
        for line, key, value in _env_assignments(text):
            at = where(path or "<env file>", line)
            if NAME_OK.match(key):
                env.values[key] = value
            elif key.startswith("export "):
                env.warnings.append(f"{at}: '{key}' is ignored: systemd env files have no 'export'; "
                                    f"write {key[7:].strip()}=... instead")
            else:
                env.warnings.append(f"{at}: {key!r} is not a valid variable name; ignored")
        return env


def _env_assignments(text: str) -> list[tuple[int, str, str]]:
    """(line, key, value) triples; a state machine mirroring systemd's env-file parser."""
    found: list[tuple[int, str, str]] = []
    state = "pre_key"
    key: list[str] = []
    value: list[str] = []
    line, key_line = 1, 1
    value_space_at: int | None = None

    def push() -> None:
        nonlocal value_space_at
        name = "".join(key).strip()
        text_value = "".join(value)
        if value_space_at is not None:
            text_value = text_value[:value_space_at]
        if name:
            found.append((key_line, name, text_value))
        key.clear()
        value.clear()
        value_space_at = None

    for char in text:
        newline = char == "\n"
        if state == "pre_key":
            if char in "#;":
                state = "comment"
            elif not char.isspace():
                state, key_line = "key", line
                key.append(char)
        elif state == "key":
            if newline:
                state = "pre_key"
                key.clear()
            elif char == "=":
                state = "pre_value"
            else:
                key.append(char)
        elif state == "pre_value":
            if newline:
                push()
                state = "pre_key"
            elif char == "'":
                state = "single"
            elif char == '"':
                state = "double"
            elif char == "\\":
                state = "value_escape"
            elif not char.isspace():
                state = "value"
                value.append(char)
        elif state == "value":
            if newline:
                push()
                state = "pre_key"
            elif char == "\\":
                state, value_space_at = "value_escape", None
            else:
                if char.isspace():
                    value_space_at = len(value) if value_space_at is None else value_space_at
                else:
                    value_space_at = None
                value.append(char)
        elif state == "value_escape":
            state = "value"
            if not newline:
                value.append(char)
        elif state == "single":
            if char == "'":
                state = "pre_value"
            else:
                value.append(char)
        elif state == "double":
            if char == '"':
                state = "pre_value"
            elif char == "\\":
                state = "double_escape"
            else:
                value.append(char)
        elif state == "double_escape":
            state = "double"
            if char in '"\\`$':
                value.append(char)
            elif not newline:
                value.extend(("\\", char))
        elif state == "comment":
            if char == "\\":
                state = "comment_escape"
            elif newline:
                state = "pre_key"
        elif state == "comment_escape":
            state = "comment"
        if newline:
            line += 1
    if state not in ("pre_key", "key", "comment", "comment_escape"):
        push()
    return found


def _quote_env_value(value: str) -> str:
    escaped = "".join("\\" + char if char in '"\\`$' else char for char in value)
    return f'"{escaped}"'


def write_env_file(path: str | os.PathLike[str], values: Mapping[str, str]) -> Path:
    """Writes `values` as an env file systemd reads back unchanged; mode 0600, replaced atomically."""
    env_path = Path(path)
    bad = [name for name in values if not NAME_OK.match(name)]
    if bad:
        raise UnitError(f"{env_path}: {', '.join(map(repr, bad))} cannot be written to an env file. Use names "
                        f"made of letters, digits and '_' that do not start with a digit.")
    body = "".join(f"{name}={_quote_env_value(str(value))}\n" for name, value in values.items())
    env_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = env_path.with_name(f".{env_path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, body.encode("utf-8"))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, env_path)
    return env_path
