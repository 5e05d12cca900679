"""What the supervisor reports, in systemd's words: the status of a service (`systemctl status`), its journal lines,
how a process's end is classified, and when systemd restarts a service or refuses to start it again.

The errors live here too, so a caller can catch them without importing the supervisor.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from datetime import datetime

from harness.sysd.values import ExitStatusSet
from quantlab_chaos.errors import HarnessError

# Deaths systemd counts as a clean exit for a daemon (is_clean_exit with EXIT_CLEAN_DAEMON).
CLEAN_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})
NO_EXIT_STATUSES = ExitStatusSet()


class ServiceError(HarnessError):
    """A service could not be started, stopped or found."""

    # Set by the supervisor when it raises: what the message quotes, for a caller that wants it whole.
    status: ServiceStatus | None = None
    log_tail: tuple[str, ...] = ()


class ServiceFailed(ServiceError):
    """A start did not reach the started state; the message carries the status and the last log lines."""


class ServiceTimeout(ServiceError, TimeoutError):
    """wait_for()/wait_until() ran out of time."""


@dataclass(frozen=True)
class LimitsStatus:
    """Whether the cgroup limits (MemoryMax=, MemoryHigh=, CPUQuota=, TasksMax=) are enforced, through which
    hierarchy ("cgroup v1" or "cgroup v2") and in which group, and if not, why; and whether LimitNOFILE= is applied.
    `files` are the cgroup files written: (directive, path, value)."""

    enforced: bool
    reason: str
    memory_max: int | None = None
    cpu_quota: float | None = None
    cgroup: str | None = None
    nofile: tuple[int, int] | None = None
    nofile_applied: bool = False
    memory_high: int | None = None
    tasks_max: int | None = None
    hierarchy: str | None = None
    groups: tuple[str, ...] = ()
    files: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class ServiceStatus:
    """A snapshot like `systemctl status`: ActiveState, SubState, Result, MainPID, NRestarts, ..."""

    name: str
    active_state: str
    sub_state: str
    result: str
    main_pid: int | None
    exit_code: int | None
    signal: str | None
    n_restarts: int
    since: datetime
    message: str
    limits: LimitsStatus
    notes: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        """ActiveState=active (running, or a oneshot that remained after exit)."""
        return self.active_state == "active"

    def __str__(self) -> str:
        lines = [
            f"{self.name}",
            f"     Active: {self.active_state} ({self.sub_state}) since {self.since.isoformat(timespec='seconds')}; "
            f"result: {self.result}",
        ]
        if self.main_pid:
            lines.append(f"   Main PID: {self.main_pid}")
        if self.exit_code is not None or self.signal:
            last = f"code={self.exit_code}" if self.signal is None else f"signal={self.signal}"
            lines.append(f"  Last exit: {last}")
        lines.append(f"   Restarts: {self.n_restarts}")
        limit = self.limits
        lines.append(f"     Limits: enforced={limit.enforced} memory_max={limit.memory_max} memory_high={limit.memory_high}"
                     f" cpu_quota={limit.cpu_quota} tasks_max={limit.tasks_max} nofile={limit.nofile} ({limit.reason})")
        if self.message:
            lines.append(f"    Message: {self.message}")
        lines.extend(f"       Note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass(frozen=True)
class LogLine:
    """One journal record of a service: what a process printed, or what the supervisor did."""

    ts: float
    stream: str  # stdout, stderr or supervisor
    pid: int | None
    text: str

    def format(self, unit: str) -> str:
        """The line as `journalctl -u` would show it: `<time> <unit>[pid] <stream>: text`."""
        stamp = datetime.fromtimestamp(self.ts).astimezone().isoformat(timespec="milliseconds")
        who = f"{unit}[{self.pid}]" if self.pid else unit
        return f"{stamp} {who} {self.stream}: {self.text}"


def describe_exit(returncode: int) -> tuple[int | None, str | None, str]:
    """(exit code, signal name, systemd result) for a Popen returncode."""
    if returncode >= 0:
        return returncode, None, "success" if returncode == 0 else "exit-code"
    number = -returncode
    try:
        sig = signal.Signals(number)
    except ValueError:
        return None, str(number), "signal"
    return None, sig.name, "success" if sig in CLEAN_SIGNALS else "signal"


def exit_text(returncode: int) -> str:
    """A Popen returncode the way systemd logs it: `code=exited, status=3` or `code=killed, status=9/KILL`."""
    if returncode >= 0:
        return f"code=exited, status={returncode}"
    try:
        name = signal.Signals(-returncode).name.removeprefix("SIG")
    except ValueError:
        name = str(-returncode)
    return f"code=killed, status={-returncode}/{name}"


def should_restart(policy: str, result: str, *, main_exit: int | None = None,
                   prevent: ExitStatusSet = NO_EXIT_STATUSES) -> bool:
    """systemd's restart decision (service_shall_restart): RestartPreventExitStatus= first, then the Restart= table.

    `main_exit` is the Popen returncode of the main process when its end concluded the run; None when the run ended
    otherwise (a failed ExecStartPre=, a command that could not be started), which `prevent` never matches. A
    status in `prevent` keeps the service down whatever Restart= says.
    """
    if main_exit is not None and prevent.matches(main_exit):
        return False
    if policy == "always":
        return True
    if policy == "on-success":
        return result == "success"
    if policy == "on-failure":
        return result != "success"
    if policy == "on-abnormal":
        return result in ("signal", "core-dump", "timeout", "watchdog", "oom-kill")
    if policy == "on-abort":
        return result in ("signal", "core-dump")
    if policy == "on-watchdog":
        return result == "watchdog"
    return False


class StartLimit:
    """systemd's start rate limit: at most `burst` starts within `interval` seconds; 0 disables it."""

    def __init__(self, interval: float, burst: int) -> None:
        self.interval, self.burst = interval, burst
        self.begin: float | None = None
        self.count = 0

    def reset(self) -> None:
        """Forget the starts so far (`systemctl reset-failed`)."""
        self.begin = None
        self.count = 0

    def allow(self, now: float | None = None) -> bool:
        """Counts one start; False when it is one too many for the current window."""
        if self.interval <= 0 or self.burst <= 0:
            return True
        now = time.monotonic() if now is None else now
        if self.begin is None or now - self.begin > self.interval:
            self.begin, self.count = now, 0
        self.count += 1
        return self.count <= self.burst
