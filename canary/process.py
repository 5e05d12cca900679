"""Running the target's commands (config check, self-test, canary) with deadlines, in their own process group."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from quantlab_chaos import procgroup


class ChildOwner(Protocol):
    """Who else must know about a command's process group, e.g. the harness's reaper (harness/reaper.py)."""

    def child_env(self, env: Mapping[str, str] | None = None) -> dict[str, str]: ...

    def watch(self, pid: int) -> None: ...

    def forget(self, pid: int) -> None: ...


# Set by the harness (harness.reaper.install()) so its commands die with it even when it is SIGKILLed; the canary
# on its own leaves it unset and relies on its deadline and on systemd's KillMode.
owner: ChildOwner | None = None


class CommandNotFound(Exception):
    """The command's program is not installed (e.g. node)."""


@dataclass(frozen=True)
class CommandResult:
    """A finished (or timed-out) command: exit code, output, wall time."""

    argv: tuple[str, ...]
    code: int | None
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False

    def json_lines(self, stream: str = "stdout") -> list[dict[str, Any]]:
        """Every line of the stream that is a JSON object (other lines, like runtime warnings, are skipped)."""
        return json_objects(self.stdout if stream == "stdout" else self.stderr)


def json_objects(text: str) -> list[dict[str, Any]]:
    """Every line of `text` that is a JSON object; other lines are skipped."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                found.append(value)
    return found


def run_process(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float) -> CommandResult:
    """Runs a command in its own process group; on timeout the whole group is killed and the result says so."""
    started = time.monotonic()
    keeper = owner
    try:
        process = subprocess.Popen(list(argv), cwd=cwd, env=keeper.child_env(env) if keeper else dict(env),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
    except FileNotFoundError as exc:
        raise CommandNotFound(f"Cannot run {argv[0]!r}: not found on PATH. Install it (Node.js 20 for node) and retry.") from exc
    if keeper:
        keeper.watch(process.pid)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        procgroup.signal_group(process.pid, signal.SIGKILL)  # communicate() below reaps it and drains the pipes
        stdout, stderr = process.communicate()
        timed_out = True
    except BaseException:
        procgroup.signal_group(process.pid, signal.SIGKILL)  # communicate() below reaps it and drains the pipes
        process.communicate()
        raise
    finally:
        if keeper and process.poll() is not None:
            keeper.forget(process.pid)
    return CommandResult(tuple(argv), None if timed_out else process.returncode, stdout, stderr,
                         time.monotonic() - started, timed_out)

