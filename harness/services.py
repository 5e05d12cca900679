"""A supervisor that boots services from their unit files the way systemd would, without systemd.

`Supervisor` is a context manager that owns every process it starts. For each service added with
a `ServiceSpec` it builds the environment like systemd (base env, Environment=, EnvironmentFile=),
starts the process in its own process group, captures stdout/stderr journal-style, follows
Type=, Restart=, RestartSec=, StartLimitIntervalSec=/StartLimitBurst=, TimeoutStopSec= and
KillMode=, and applies MemoryMax=/CPUQuota= through cgroup v2 when it can (otherwise it says why
in `status().limits`). Nothing outlives it: close(), exceptions, atexit and SIGTERM/SIGHUP all kill
the process groups it started.

Deviations from systemd, on purpose: output sent to `StandardOutput=file:/append:` is also kept in
the harness journal; `User=` is honoured only when the harness runs as root and the user exists;
`restart()` also clears a start-limit-hit state (systemctl needs reset-failed for that).
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Union

import httpx
import psutil

from harness import reaper
from quantlab_chaos.errors import HarnessError
from quantlab_chaos.redact import REDACTED, is_secret_name
from quantlab_chaos.envfile import EnvFile
from harness.units import ExecCommand, OutputSpec, ServiceSpec
from quantlab_chaos.errors import UnitError

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLEAN_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})
POLL_S = 0.05
START_TIMEOUT_CAP_S = 90.0  # stands in for TimeoutStartSec=infinity so no start waits forever
KILL_WAIT_S = 5.0  # after SIGKILL; only a process stuck in the kernel takes longer
READER_JOIN_S = 0.5  # lets the last lines a process printed reach the journal before its exit is handled
LOG_MEMORY_LINES = 20000
HTTP_PROBE_TIMEOUT_S = 1.0
MIN_SECRET_LENGTH = 4  # shorter values ("1", "yes") would redact half the log and protect nothing
CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000

Readiness = Union[Callable[[], bool], str, int, tuple[str, int], None]


class ServiceError(HarnessError):
    """A service could not be started, stopped or found."""


class ServiceFailed(ServiceError):
    """A start did not reach the started state; the message carries the status and the last log lines."""


class ServiceTimeout(ServiceError, TimeoutError):
    """wait_for()/wait_until() ran out of time."""


# ---------------------------------------------------------------------------------------------
# Status and journal records
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LimitsStatus:
    """Whether MemoryMax=/CPUQuota= (cgroup v2) and LimitNOFILE= are enforced, and if not, why."""

    enforced: bool
    reason: str
    memory_max: int | None = None
    cpu_quota: float | None = None
    cgroup: str | None = None
    nofile: tuple[int, int] | None = None
    nofile_applied: bool = False


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
        lines.append(f"     Limits: enforced={limit.enforced} memory_max={limit.memory_max} cpu_quota={limit.cpu_quota}"
                     f" nofile={limit.nofile} ({limit.reason})")
        if self.message:
            lines.append(f"    Message: {self.message}")
        lines.extend(f"       Note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass(frozen=True)
class LogLine:
    ts: float
    stream: str  # stdout, stderr or supervisor
    pid: int | None
    text: str

    def format(self, unit: str) -> str:
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


def should_restart(policy: str, result: str) -> bool:
    """systemd's Restart= table: which results restart under which policy."""
    if policy == "always":
        return True
    if policy == "on-success":
        return result == "success"
    if policy == "on-failure":
        return result != "success"
    if policy == "on-abnormal":
        return result in ("signal", "core-dump", "timeout", "watchdog")
    if policy == "on-abort":
        return result in ("signal", "core-dump")
    if policy == "on-watchdog":
        return result == "watchdog"
    return False


class StartLimit:
    """systemd's start rate limit: at most `burst` starts within `interval` seconds; 0 disables it."""

    def __init__(self, interval: float, burst: int) -> None:
        self.interval, self.burst = interval, burst
        self.reset()

    def reset(self) -> None:
        self.begin: float | None = None
        self.count = 0

    def allow(self, now: float | None = None) -> bool:
        if self.interval <= 0 or self.burst <= 0:
            return True
        now = time.monotonic() if now is None else now
        if self.begin is None or now - self.begin > self.interval:
            self.begin, self.count = now, 0
        self.count += 1
        return self.count <= self.burst


# ---------------------------------------------------------------------------------------------
# Readiness probes
# ---------------------------------------------------------------------------------------------

def _http_ready(url: str) -> bool:
    # 401 counts: an observer without a token is up, it just refuses us.
    response = httpx.get(url, timeout=HTTP_PROBE_TIMEOUT_S, trust_env=False)
    return 200 <= response.status_code < 300 or response.status_code == 401


def _port_ready(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=0.5):
        return True


def make_probe(readiness: Readiness) -> Callable[[], bool] | None:
    """A no-argument probe for a readiness spec: callable, http(s) URL, port number or (host, port)."""
    if readiness is None:
        return None
    if isinstance(readiness, str):
        if not readiness.startswith(("http://", "https://")):
            raise ServiceError(f"readiness {readiness!r} is not an http(s) URL. Pass a URL, a TCP port, a "
                               f"(host, port) pair or a callable returning bool.")
        probe: Callable[[], bool] = lambda: _http_ready(readiness)  # noqa: E731
    elif isinstance(readiness, bool):
        raise ServiceError("readiness must be a URL, a port, a (host, port) pair or a callable, not a bool.")
    elif isinstance(readiness, int):
        probe = lambda: _port_ready("127.0.0.1", readiness)  # noqa: E731
    elif isinstance(readiness, tuple):
        host, port = readiness
        probe = lambda: _port_ready(host, int(port))  # noqa: E731
    elif callable(readiness):
        probe = readiness
    else:
        raise ServiceError(f"readiness {readiness!r} is not supported. Pass a URL, a TCP port, a (host, port) "
                           f"pair or a callable returning bool.")

    def safe() -> bool:
        try:
            return bool(probe())
        except Exception:  # noqa: BLE001 - a probe that raises means "not ready yet"
            return False

    return safe


# ---------------------------------------------------------------------------------------------
# cgroup v2 limits
# ---------------------------------------------------------------------------------------------

def cgroup_settings(memory_max: int | None, cpu_quota: float | None) -> dict[str, str]:
    """The cgroup v2 files and values for MemoryMax=/CPUQuota= (memory.max bytes, cpu.max quota period)."""
    settings: dict[str, str] = {}
    if memory_max is not None:
        settings["memory.max"] = str(memory_max)
    if cpu_quota is not None:
        # systemd rounds the per-period quota up to at least 1 ms.
        settings["cpu.max"] = f"{max(1000, round(cpu_quota / 100 * CPU_PERIOD_US))} {CPU_PERIOD_US}"
    return settings


def _mounts(mountinfo: Path) -> list[tuple[str, str]]:
    """(mount point, fs type) from /proc/self/mountinfo."""
    found = []
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and right:
            found.append((fields[4].replace("\\040", " "), right.split()[0]))
    return found


def probe_cgroup_v2(root: Path = CGROUP_ROOT, mountinfo: Path = Path("/proc/self/mountinfo")) -> tuple[bool, str]:
    """(True, "") when MemoryMax=/CPUQuota= can be enforced here, else (False, why not)."""
    if os.geteuid() != 0:
        return False, "not enforced: the harness is not running as root (cgroup limits need root)"
    mounts = _mounts(mountinfo)
    kinds = {point: kind for point, kind in mounts}
    if kinds.get(str(root)) != "cgroup2":
        elsewhere = [point for point, kind in mounts if kind == "cgroup2"]
        detail = ""
        if elsewhere:
            offered = [_read(Path(point) / "cgroup.controllers") or "none" for point in elsewhere]
            detail = "; cgroup2 is mounted at " + ", ".join(
                f"{point} (controllers: {ctl})" for point, ctl in zip(elsewhere, offered))
        found = kinds.get(str(root), "nothing")
        return False, (f"not enforced: cgroup v2 is not mounted at {root} (found {found}: a cgroup v1 or hybrid "
                       f"host{detail}); boot with systemd.unified_cgroup_hierarchy=1 to enforce MemoryMax=/CPUQuota=")
    controllers = set((_read(root / "cgroup.controllers") or "").split())
    missing = sorted({"memory", "cpu"} - controllers)
    if missing:
        return False, (f"not enforced: the cgroup v2 controllers {', '.join(missing)} are not available at {root} "
                       f"(available: {', '.join(sorted(controllers)) or 'none'})")
    return True, ""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


class Cgroups:
    """A harness-owned parent cgroup with one child per service; removed on close()."""

    def __init__(self, root: Path = CGROUP_ROOT, mountinfo: Path = Path("/proc/self/mountinfo")) -> None:
        self.root = root
        self.available, self.reason = probe_cgroup_v2(root, mountinfo)
        self.parent: Path | None = None
        self.children: dict[str, Path] = {}

    def _enable(self, cgroup: Path) -> None:
        wanted = {"memory", "cpu"} - set((_read(cgroup / "cgroup.subtree_control") or "").split())
        if wanted:
            (cgroup / "cgroup.subtree_control").write_text(" ".join("+" + name for name in sorted(wanted)))

    def create(self, service: str, settings: Mapping[str, str]) -> Path:
        """Creates (or reuses) the service's cgroup with `settings`; raises OSError with the kernel's reason."""
        if self.parent is None:
            self._enable(self.root)
            parent = self.root / f"quantlab-harness-{os.getpid()}-{id(self):x}"
            parent.mkdir(exist_ok=True)
            self.parent = parent
            self._enable(parent)
        child = self.children.get(service)
        if child is None:
            child = self.parent / re.sub(r"[^A-Za-z0-9_.@-]", "_", service)
            child.mkdir(exist_ok=True)
            self.children[service] = child
        for name, value in settings.items():
            (child / name).write_text(value)
        return child

    @staticmethod
    def attach(cgroup: Path, pid: int) -> None:
        (cgroup / "cgroup.procs").write_text(str(pid))

    @staticmethod
    def kill(cgroup: Path) -> None:
        """Kills everything left in the cgroup, including processes that escaped their process group."""
        kill_file = cgroup / "cgroup.kill"
        try:
            if kill_file.exists():
                kill_file.write_text("1")
            else:
                for pid in (_read(cgroup / "cgroup.procs") or "").split():
                    _signal_pid(int(pid), signal.SIGKILL)
        except OSError:
            pass

    def close(self) -> None:
        for child in list(self.children.values()):
            self.kill(child)
            _rmdir_when_empty(child)
        self.children.clear()
        if self.parent is not None:
            _rmdir_when_empty(self.parent)
            self.parent = None


def _rmdir_when_empty(cgroup: Path) -> None:
    deadline = time.monotonic() + KILL_WAIT_S
    while True:
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() >= deadline:
                return
            time.sleep(POLL_S)


# ---------------------------------------------------------------------------------------------
# Process groups
# ---------------------------------------------------------------------------------------------

def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return members


def _wait_gone(check: Callable[[], bool], deadline: float) -> bool:
    """Polls until check() is true or the deadline passes; True when it became true."""
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


# ---------------------------------------------------------------------------------------------
# The supervisor
# ---------------------------------------------------------------------------------------------

class _Tee:
    """StandardOutput=file:/append:/truncate: target, shared by stdout and stderr of one process."""

    def __init__(self, output: OutputSpec) -> None:
        assert output.path is not None
        flags = os.O_WRONLY | os.O_CREAT
        flags |= {"append": os.O_APPEND, "truncate": os.O_TRUNC}.get(output.kind, 0)
        self.fd = os.open(output.path, flags, 0o644)
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            if self.fd >= 0:
                os.write(self.fd, (text + "\n").encode("utf-8", "replace"))

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


@dataclass
class _Run:
    """One process of a service (main, ExecStartPre, ...) and its capture threads."""

    proc: subprocess.Popen[bytes]
    role: str
    env: dict[str, str]
    readers: list[threading.Thread] = field(default_factory=list)
    tees: list[_Tee] = field(default_factory=list)
    exited: threading.Event = field(default_factory=threading.Event)
    handled: threading.Event = field(default_factory=threading.Event)  # its exit handler has finished
    returncode: int | None = None
    stopping: bool = False
    registered: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


class _StartFailure(Exception):
    """A start step failed before or while spawning; carries systemd's result and exit status."""

    def __init__(self, result: str, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.result, self.message, self.exit_code = result, message, exit_code


@dataclass
class _Service:
    name: str
    spec: ServiceSpec
    extra_env: dict[str, str]
    override_env: dict[str, str]
    probe: Callable[[], bool] | None
    log_path: Path
    limiter: StartLimit
    limits: LimitsStatus
    active_state: str = "inactive"
    sub_state: str = "dead"
    result: str = "success"
    message: str = ""
    exit_code: int | None = None
    exit_signal: str | None = None
    n_restarts: int = 0
    since: float = field(default_factory=time.time)
    generation: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    run: _Run | None = None
    notes: list[str] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)
    journal: deque[LogLine] = field(default_factory=lambda: deque(maxlen=LOG_MEMORY_LINES))
    log_lock: threading.Lock = field(default_factory=threading.Lock)
    cgroup: Path | None = None
    cgroup_wanted: bool = False
    control: _Run | None = None

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


_LIVE: set[Supervisor] = set()
_HANDLERS_INSTALLED = False


def _kill_all_supervised() -> None:
    """Signal- and atexit-safe: SIGKILL every process group any open Supervisor started (no locks)."""
    for supervisor in tuple(_LIVE):
        supervisor.kill_now()


def _on_fatal_signal(signum: int, _frame: object) -> None:
    _kill_all_supervised()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_exit_hooks() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_kill_all_supervised)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        # Only where nobody else handles the signal: default action would kill us and orphan the services.
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _on_fatal_signal)


class Supervisor:
    """Runs services from unit files; `with Supervisor(tmp_path) as sup: sup.add(...); sup.start(...)`."""

    def __init__(self, runtime_dir: str | os.PathLike[str], *, cgroup_root: Path = CGROUP_ROOT,
                 honour_user: bool = True, close_timeout: float = 10.0) -> None:
        self.runtime_dir = Path(runtime_dir)
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.honour_user = honour_user
        self.close_timeout = close_timeout
        self._services: dict[str, _Service] = {}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._pgids: set[int] = set()
        self._cgroups = Cgroups(cgroup_root)
        self._closed = False
        _install_exit_hooks()
        _LIVE.add(self)

    # -- context manager ------------------------------------------------------------------------

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- registration ---------------------------------------------------------------------------

    def add(self, name: str, spec: ServiceSpec, *, extra_env: Mapping[str, str] | None = None,
            override_env: Mapping[str, str] | None = None, readiness: Readiness = None) -> None:
        """Registers a service. `extra_env` joins the base env (the unit may override it);
        `override_env` is applied on top of everything the unit sets. `readiness` decides when a
        simple/exec service counts as started: a callable, an http(s) URL answering 2xx or 401,
        a TCP port on 127.0.0.1, or a (host, port) pair."""
        if self._closed:
            raise ServiceError("this Supervisor is closed. Create a new one for new services.")
        with self._lock:
            if name in self._services:
                raise ServiceError(f"a service named {name!r} was already added. Use another name or restart() it.")
            log_path = self.runtime_dir / (re.sub(r"[^A-Za-z0-9_.@-]", "_", name) + ".log")
            service = _Service(
                name=name, spec=spec, extra_env=dict(extra_env or {}), override_env=dict(override_env or {}),
                probe=make_probe(readiness), log_path=log_path,
                limiter=StartLimit(spec.start_limit_interval, spec.start_limit_burst),
                limits=self._initial_limits(spec),
            )
            service.cgroup_wanted = self._cgroups.available and (spec.memory_max is not None
                                                                 or spec.cpu_quota is not None)
            for warning in spec.warnings:
                service.note(warning)
            for rewrite in spec.rewrites:
                service.note(f"rewritten {rewrite}")
            for item in spec.unhonoured_directives():
                service.note(f"{item.section}: {item.key}={item.value} (line {item.line}) "
                             f"is not applied by the harness")
            self._services[name] = service

    def _initial_limits(self, spec: ServiceSpec) -> LimitsStatus:
        common = dict(memory_max=spec.memory_max, cpu_quota=spec.cpu_quota, nofile=spec.limit_nofile)
        if spec.memory_max is None and spec.cpu_quota is None:
            return LimitsStatus(False, "not requested: the unit sets no MemoryMax= or CPUQuota=", **common)
        if not self._cgroups.available:
            return LimitsStatus(False, self._cgroups.reason, **common)
        return LimitsStatus(False, "pending: applied when the service starts", **common)

    @property
    def names(self) -> list[str]:
        return list(self._services)

    def _get(self, name: str) -> _Service:
        try:
            return self._services[name]
        except KeyError:
            raise ServiceError(f"no service named {name!r}. Add it with Supervisor.add() first "
                               f"(known: {', '.join(self._services) or 'none'}).") from None

    # -- queries --------------------------------------------------------------------------------

    def status(self, name: str) -> ServiceStatus:
        """Like `systemctl status`: active/sub state, result, main PID, last exit, restarts, limits."""
        svc = self._get(name)
        with self._lock:
            run = svc.run
            main_pid = run.pid if run is not None and run.role == "main" and not run.exited.is_set() else None
            return ServiceStatus(
                name=name, active_state=svc.active_state, sub_state=svc.sub_state, result=svc.result,
                main_pid=main_pid, exit_code=svc.exit_code, signal=svc.exit_signal, n_restarts=svc.n_restarts,
                since=datetime.fromtimestamp(svc.since).astimezone(), message=svc.message, limits=svc.limits,
                notes=tuple(svc.notes),
            )

    def is_active(self, name: str) -> bool:
        return self.status(name).active

    def logs(self, name: str, lines: int | None = None, since: datetime | float | None = None) -> list[str]:
        """Journal lines (`<time> <name>[pid] <stream>: text`), oldest first; the last `lines`, or those
        at or after `since` (a datetime or epoch seconds). Also written to <runtime_dir>/<name>.log."""
        svc = self._get(name)
        with svc.log_lock:
            records = list(svc.journal)
        if since is not None:
            cutoff = since.timestamp() if isinstance(since, datetime) else float(since)
            records = [record for record in records if record.ts >= cutoff]
        if lines is not None:
            records = records[-lines:] if lines > 0 else []
        return [record.format(name) for record in records]

    def log_path(self, name: str) -> Path:
        return self._get(name).log_path

    def environment(self, name: str, *, redact: bool = True) -> dict[str, str]:
        """The environment the service's next start gets (secret-looking values redacted by default)."""
        svc = self._get(name)
        env, _ = self._build_env(svc)
        return {key: (REDACTED if redact and is_secret_name(key) and value else value) for key, value in env.items()}

    def wait_until(self, name: str, predicate: Callable[[ServiceStatus], bool], timeout: float,
                   what: str = "condition") -> ServiceStatus:
        """Waits until predicate(status) holds; ServiceTimeout (with status and log tail) otherwise."""
        self._get(name)
        deadline = time.monotonic() + timeout
        while True:
            current = self.status(name)
            if predicate(current):  # evaluated without the lock: it may poll logs or the network
                return current
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._error(ServiceTimeout, name, f"{name} did not reach {what} within {timeout:.1f} s")
            with self._changed:
                # Short waits: a notify between the check and the wait, or a new log line, is not missed for long.
                self._changed.wait(min(remaining, POLL_S))

    def wait_for(self, name: str, state: str | Iterable[str], timeout: float) -> ServiceStatus:
        """Waits until the active state or sub state is `state` (or one of several)."""
        wanted = {state} if isinstance(state, str) else set(state)
        return self.wait_until(name, lambda s: s.active_state in wanted or s.sub_state in wanted, timeout,
                               what=" or ".join(sorted(wanted)))

    def _error(self, kind: type[ServiceError], name: str, what: str) -> ServiceError:
        """`kind` with the status and last log lines, ending in what to do; both also kept as attributes."""
        status, tail = self.status(name), self.logs(name, lines=15)
        error = kind(f"{what}. Status: {status} Last log lines: {' | '.join(tail) or '(no output)'}. "
                     f"Fix the cause shown in the service's output or in its unit file, then start it again.")
        error.status, error.log_tail = status, tail  # type: ignore[attr-defined]
        return error

    # -- control --------------------------------------------------------------------------------

    def start(self, name: str, timeout: float | None = None, *, check: bool = True) -> ServiceStatus:
        """Starts a service and waits until it is started: simple/exec once spawned and ready,
        oneshot once its ExecStart= lines ran. Raises ServiceFailed when it fails and `check`."""
        svc = self._get(name)
        with self._lock:
            if self._closed:
                raise ServiceError("this Supervisor is closed. Create a new one to start services.")
            if svc.active_state == "active":
                return self.status(name)
            in_progress = svc.active_state == "activating" and svc.sub_state != "auto-restart"
        if in_progress:  # like a second `systemctl start`: join the start already running
            status = self.wait_until(name, lambda s: s.active_state != "activating" or s.sub_state == "auto-restart",
                                     self._deadline(svc.spec, timeout) - time.monotonic(), what="a started state")
            if check and (status.active_state == "failed" or status.sub_state == "auto-restart"):
                raise self._error(ServiceFailed, name, f"{name} failed to start ({status.result}): {status.message}")
            return status
        with self._lock:
            svc.cancel.set()
            svc.cancel = threading.Event()
            svc.generation += 1
            generation = svc.generation
            if not svc.limiter.allow():
                self._enter_failed(svc, "start-limit-hit",
                                   "start request repeated too quickly; call reset_failed() or restart()")
                started = False
            else:
                started = None
        if started is None:
            started = self._attempt_start(svc, generation, self._deadline(svc.spec, timeout))
        status = self.status(name)
        if check and not started:
            raise self._error(ServiceFailed, name,
                              f"{name} failed to start ({status.result}): {status.message or 'see its log'}")
        return status

    def stop(self, name: str) -> ServiceStatus:
        """Stops a service like systemctl: ExecStop=, KillSignal to the group, SIGKILL after TimeoutStopSec=.
        A stop never triggers Restart=."""
        svc = self._get(name)
        self._stop(svc, svc.spec.timeout_stop)
        return self.status(name)

    def restart(self, name: str, timeout: float | None = None) -> ServiceStatus:
        """stop() then start(); clears a failed or start-limit-hit state first."""
        self.reset_failed(name)
        self.stop(name)
        return self.start(name, timeout)

    def reset_failed(self, name: str) -> None:
        """Like `systemctl reset-failed`: forget the failure and the start rate counter."""
        svc = self._get(name)
        with self._lock:
            svc.limiter.reset()
            if svc.active_state == "failed":
                self._set_state(svc, "inactive", "dead")
                svc.result = "success"

    def close(self) -> None:
        """Stops every service (in parallel), kills what is left, removes cgroups. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            services = list(self._services.values())
        stoppers = [threading.Thread(target=self._stop, args=(svc, min(svc.spec.timeout_stop, self.close_timeout)),
                                     name=f"stop-{svc.name}", daemon=True) for svc in services]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join(self.close_timeout + KILL_WAIT_S)
        self.kill_now()
        for pgid in tuple(self._pgids):  # SIGKILLed just now: nothing is left for the reaper to do
            self._forget_group(pgid)
        self._cgroups.close()
        _LIVE.discard(self)

    def _forget_group(self, pgid: int) -> None:
        self._pgids.discard(pgid)
        reaper.forget(pgid)

    def kill_now(self) -> None:
        """SIGKILL every process group this supervisor started; lock-free, for signal handlers and atexit."""
        for pgid in tuple(self._pgids):
            _signal_group(pgid, signal.SIGKILL)

    # -- state bookkeeping ----------------------------------------------------------------------

    def _set_state(self, svc: _Service, active: str, sub: str) -> None:
        with self._changed:
            if svc.active_state != active:
                svc.since = time.time()
            svc.active_state, svc.sub_state = active, sub
            self._changed.notify_all()

    def _enter_failed(self, svc: _Service, result: str, message: str) -> None:
        with self._lock:
            svc.result, svc.message = result, _redact(message, svc.secrets)
            self._set_state(svc, "failed", "failed")
        self._log(svc, message)
        self._log(svc, f"Failed with result '{result}'.")

    def _log(self, svc: _Service, text: str, stream: str = "supervisor", pid: int | None = None) -> str:
        """Adds a journal line (secret values replaced by ***) and returns the text as logged."""
        with svc.log_lock:
            text = _redact(text, svc.secrets)
            record = LogLine(time.time(), stream, pid, text)
            svc.journal.append(record)
            with svc.log_path.open("a", encoding="utf-8") as handle:
                handle.write(record.format(svc.name) + "\n")
        return text

    @staticmethod
    def _deadline(spec: ServiceSpec, timeout: float | None) -> float:
        seconds = timeout if timeout is not None else spec.timeout_start
        if seconds == float("inf"):
            seconds = START_TIMEOUT_CAP_S
        return time.monotonic() + seconds

    def _claim(self, run: _Run) -> bool:
        """Exactly one party handles a run's end: its exit handler, a stop, or a failed start."""
        with self._lock:
            if run.stopping:
                return False
            run.stopping = True
            return True

    # -- environment and process creation -------------------------------------------------------

    def _user(self, svc: _Service) -> pwd.struct_passwd | None:
        user = svc.spec.user
        if not user:
            return None
        if not self.honour_user:
            svc.note(f"User={user} ignored: the supervisor was told not to switch users")
            return None
        if os.geteuid() != 0:
            svc.note(f"User={user} ignored: the harness is not running as root; the service runs as "
                     f"{pwd.getpwuid(os.geteuid()).pw_name}")
            return None
        try:
            return pwd.getpwnam(user)
        except KeyError:
            svc.note(f"User={user} ignored: no such user on this host; the service runs as root")
            return None

    def _build_env(self, svc: _Service) -> tuple[dict[str, str], pwd.struct_passwd | None]:
        spec = svc.spec
        user = self._user(svc)
        env = {
            "PATH": os.environ.get("PATH", BASE_PATH),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": user.pw_dir if user else os.environ.get("HOME", "/root"),
        }
        if user:
            env.update(USER=user.pw_name, LOGNAME=user.pw_name, SHELL=user.pw_shell)
        env.update(svc.extra_env)
        env.update(spec.env_dict)
        for ref in spec.environment_files:
            if not ref.path.exists():
                if ref.optional:
                    continue
                raise _StartFailure("resources", f"EnvironmentFile={ref.path} does not exist; write it before "
                                                 f"starting {svc.name} or mark it optional with '-'")
            try:
                env_file = EnvFile.read(ref.path)
            except UnitError as exc:
                raise _StartFailure("resources", str(exc)) from None
            for warning in env_file.warnings:
                svc.note(warning)
            env.update(env_file.values)
        env.update(svc.override_env)
        return env, user

    def _remember_secrets(self, svc: _Service, env: Mapping[str, str]) -> None:
        with svc.log_lock:
            svc.secrets.update(value for key, value in env.items()
                               if is_secret_name(key) and len(value) >= MIN_SECRET_LENGTH)

    def _working_directory(self, svc: _Service, env: Mapping[str, str]) -> str:
        spec = svc.spec
        if spec.working_directory_home:
            return env.get("HOME", "/")
        if spec.working_directory is None:
            return "/"
        if spec.working_directory.is_dir():
            return str(spec.working_directory)
        if spec.working_directory_optional:
            svc.note(f"WorkingDirectory=-{spec.working_directory} is missing; the service runs in /")
            return "/"
        raise _StartFailure("exit-code", f"200/CHDIR: WorkingDirectory={spec.working_directory} does not exist; "
                                         f"create it or fix the unit", exit_code=200)

    @staticmethod
    def _executable(cmd: ExecCommand, env: Mapping[str, str]) -> str:
        if cmd.path.startswith("/"):
            if os.access(cmd.path, os.X_OK) and not os.path.isdir(cmd.path):
                return cmd.path
            raise _StartFailure("exit-code", f"203/EXEC: {cmd.path} is not an executable file; install it or "
                                             f"fix the unit's command", exit_code=203)
        found = shutil.which(cmd.path, path=env.get("PATH", BASE_PATH))
        if found is None:
            raise _StartFailure("exit-code", f"203/EXEC: {cmd.path} was not found on PATH={env.get('PATH')}; "
                                             f"install it or use an absolute path", exit_code=203)
        return found

    def _limits_for_spawn(self, svc: _Service) -> Path | None:
        """The service's cgroup when MemoryMax=/CPUQuota= can be enforced; records why not otherwise."""
        limits = svc.limits
        if svc.cgroup_wanted:
            try:
                svc.cgroup = self._cgroups.create(svc.name, cgroup_settings(svc.spec.memory_max, svc.spec.cpu_quota))
                svc.limits = dataclasses.replace(limits, enforced=True, cgroup=str(svc.cgroup),
                                                 reason="enforced through cgroup v2")
            except OSError as exc:
                svc.cgroup, svc.cgroup_wanted = None, False
                svc.limits = dataclasses.replace(limits, enforced=False, cgroup=None,
                                                 reason=f"not enforced: creating the cgroup failed ({exc})")
        return svc.cgroup

    def _spawn(self, svc: _Service, cmd: ExecCommand, env: dict[str, str], cwd: str,
               user: pwd.struct_passwd | None, role: str, on_exit: Callable[[_Run], None] | None = None,
               generation: int | None = None) -> _Run:
        """Starts one process of the service. With `generation`, it becomes the service's main or control
        process before anything watches it, so even an instant exit is seen as this service's exit."""
        argv = cmd.expand(env)
        executable = self._executable(cmd, env)
        cgroup = self._limits_for_spawn(svc)
        gated = cgroup is not None or svc.spec.limit_nofile is not None
        tees = self._open_tees(svc)
        # The owner's mark lets the reaper find the service's processes even if the harness dies mid-start.
        kwargs: dict[str, object] = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=reaper.child_env(env),
                                         cwd=cwd, start_new_session=True, close_fds=True)
        if user is not None:
            kwargs.update(user=user.pw_uid, group=user.pw_gid,
                          extra_groups=os.getgrouplist(user.pw_name, user.pw_gid))
        gate_write = None
        try:
            if gated:
                # The child waits in a shell on a pipe until its limits are applied, then execs the
                # real command; so no instruction of the service runs unconfined.
                gate_read, gate_write = os.pipe()
                args = self._gated_argv(cmd, argv, executable)
                try:
                    proc = subprocess.Popen(args, stdin=gate_read, **kwargs)  # type: ignore[call-overload]
                finally:
                    os.close(gate_read)
            else:
                proc = subprocess.Popen(  # type: ignore[call-overload]
                    argv, executable=executable, stdin=subprocess.DEVNULL, **kwargs)
        except OSError as exc:
            for tee in tees.values():
                tee.close()
            if gate_write is not None:
                os.close(gate_write)
            who = f" as {user.pw_name}" if user is not None else ""
            raise _StartFailure("exit-code", f"203/EXEC: starting {executable}{who} in {cwd} failed "
                                             f"({exc.strerror or exc}); check the path and its permissions",
                                exit_code=203) from None
        with self._lock:
            self._pgids.add(proc.pid)
        reaper.watch(proc.pid)  # ended by the reaper if this process dies without closing us
        run = _Run(proc=proc, role=role, env=env, tees=list({id(t): t for t in tees.values()}.values()))
        if gate_write is not None:
            try:
                self._apply_limits(svc, proc.pid, cgroup)
            finally:
                os.close(gate_write)  # releases the gate: the shell execs the real command
        run.registered = generation is None or self._register(svc, generation, run)
        self._start_capture(svc, run, tees, on_exit)
        return run

    @staticmethod
    def _gated_argv(cmd: ExecCommand, argv: list[str], executable: str) -> list[str]:
        if "@" in cmd.prefixes and shutil.which("bash"):
            script = 'read -r _; argv0=$1; shift; exec -a "$argv0" "$@" </dev/null'
            return ["bash", "-c", script, "quantlab-gate", argv[0], executable, *argv[1:]]
        return ["/bin/sh", "-c", 'read -r _; exec "$@" </dev/null', "quantlab-gate", executable, *argv[1:]]

    def _apply_limits(self, svc: _Service, pid: int, cgroup: Path | None) -> None:
        if cgroup is not None:
            try:
                Cgroups.attach(cgroup, pid)
            except OSError as exc:
                svc.limits = dataclasses.replace(svc.limits, enforced=False,
                                                 reason=f"not enforced: moving pid {pid} into {cgroup} failed ({exc})")
        nofile = svc.spec.limit_nofile
        if nofile is not None:
            try:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, nofile)
                svc.limits = dataclasses.replace(svc.limits, nofile_applied=True)
            except (OSError, ValueError) as exc:
                svc.limits = dataclasses.replace(svc.limits, nofile_applied=False)
                svc.note(f"LimitNOFILE={nofile[0]}:{nofile[1]} not applied ({exc})")

    def _open_tees(self, svc: _Service) -> dict[str, _Tee]:
        out, err = svc.spec.standard_output, svc.spec.standard_error
        tees: dict[str, _Tee] = {}
        try:
            if out is not None and out.path is not None:
                tees["stdout"] = _Tee(out)
            if err is not None and err.path is not None:
                tees["stderr"] = tees["stdout"] if out == err and "stdout" in tees else _Tee(err)
            elif (err is None or err.kind == "inherit") and "stdout" in tees:
                tees["stderr"] = tees["stdout"]
        except OSError as exc:
            for tee in tees.values():
                tee.close()
            raise _StartFailure("exit-code", f"209/STDOUT: opening the unit's output file failed ({exc}); create "
                                             f"its directory or fix StandardOutput=", exit_code=209) from None
        return tees

    def _start_capture(self, svc: _Service, run: _Run, tees: Mapping[str, _Tee],
                       on_exit: Callable[[_Run], None] | None) -> None:
        for stream, pipe in (("stdout", run.proc.stdout), ("stderr", run.proc.stderr)):
            reader = threading.Thread(target=self._pump, args=(svc, run.pid, stream, pipe, tees.get(stream)),
                                      name=f"{svc.name}-{stream}", daemon=True)
            reader.start()
            run.readers.append(reader)
        threading.Thread(target=self._reap, args=(run, on_exit), name=f"{svc.name}-reap", daemon=True).start()

    def _pump(self, svc: _Service, pid: int, stream: str, pipe: IO[bytes], tee: _Tee | None) -> None:
        with pipe:
            for raw in iter(pipe.readline, b""):
                logged = self._log(svc, raw.decode("utf-8", "replace").rstrip("\r\n"), stream, pid)
                if tee is not None:
                    try:
                        tee.write(logged)
                    except OSError:
                        pass

    def _reap(self, run: _Run, on_exit: Callable[[_Run], None] | None) -> None:
        run.returncode = run.proc.wait()
        joined_by = time.monotonic() + READER_JOIN_S
        for reader in run.readers:
            reader.join(max(0.0, joined_by - time.monotonic()))
        for tee in run.tees:
            tee.close()
        run.exited.set()
        with self._changed:
            self._changed.notify_all()
        try:
            if on_exit is not None:
                on_exit(run)
        finally:
            run.handled.set()

    # -- starting -------------------------------------------------------------------------------

    def _attempt_start(self, svc: _Service, generation: int, deadline: float) -> bool:
        """One start attempt (manual or automatic). True when the service reached its started state."""
        spec = svc.spec
        self._set_state(svc, "activating", "start-pre" if spec.exec_start_pre else "start")
        with self._lock:
            svc.result, svc.message = "success", ""
        self._log(svc, f"Starting {svc.name}...")
        try:
            env, user = self._build_env(svc)
            self._remember_secrets(svc, env)
            cwd = self._working_directory(svc, env)
            for cmd in spec.exec_start_pre:
                if not self._run_control(svc, generation, cmd, env, cwd, user, deadline, "start-pre"):
                    return False
            if spec.type == "oneshot":
                return self._run_oneshot(svc, generation, env, cwd, user, deadline)
            return self._run_simple(svc, generation, env, cwd, user, deadline)
        except _StartFailure as failure:
            with self._lock:
                svc.exit_code, svc.exit_signal = failure.exit_code, None
            self._log(svc, failure.message)
            self._conclude(svc, generation, failure.result, failure.message)
            return False

    def _register(self, svc: _Service, generation: int, run: _Run) -> bool:
        """Makes `run` the service's main or control process unless a stop/start superseded this attempt."""
        with self._lock:
            if svc.generation == generation and not self._closed:
                if run.role == "control":
                    svc.control = run
                else:
                    svc.run = run
                return True
        run.stopping = True
        _signal_group(run.pid, signal.SIGKILL)
        return False

    def _wait_run(self, svc: _Service, run: _Run, deadline: float, cancel: threading.Event) -> str:
        """'exited', 'cancelled' or 'timeout'."""
        while not run.exited.wait(POLL_S):
            if cancel.is_set():
                return "cancelled"
            if time.monotonic() >= deadline:
                return "timeout"
        return "exited"

    def _run_control(self, svc: _Service, generation: int, cmd: ExecCommand, env: dict[str, str], cwd: str,
                     user: pwd.struct_passwd | None, deadline: float, sub_state: str) -> bool:
        """Runs an ExecStartPre=/ExecStartPost= command to completion; False (already concluded) on failure."""
        cancel = svc.cancel
        self._set_state(svc, "activating", sub_state)
        run = self._spawn(svc, cmd, env, cwd, user, "control", generation=generation)
        if not run.registered:
            return False
        outcome = self._wait_run(svc, run, deadline, cancel)
        with self._lock:
            if svc.control is run:
                svc.control = None
        if outcome == "cancelled":
            return False
        if outcome == "timeout":
            self._log(svc, f"Control process {run.pid} ({cmd.path}) timed out. Killing.")
            self._terminate(svc, run, 0.0)
            self._conclude(svc, generation, "timeout", f"{sub_state} command {cmd} timed out")
            return False
        self._cleanup_group(svc, run)
        code, sig, result = describe_exit(run.returncode or 0)
        if result != "success" and not cmd.ignore_failure:
            with self._lock:
                svc.exit_code, svc.exit_signal = code, sig
            message = f"{sub_state} command {cmd} failed ({'status=' + str(code) if sig is None else 'signal=' + sig})"
            self._log(svc, f"Control process exited, {_exit_text(run.returncode or 0)}")
            self._conclude(svc, generation, result, message)
            return False
        return True

    def _run_oneshot(self, svc: _Service, generation: int, env: dict[str, str], cwd: str,
                     user: pwd.struct_passwd | None, deadline: float) -> bool:
        cancel = svc.cancel
        self._set_state(svc, "activating", "start")
        for cmd in svc.spec.exec_start:
            run = self._spawn(svc, cmd, env, cwd, user, "main", generation=generation)
            if not run.registered:
                return False
            outcome = self._wait_run(svc, run, deadline, cancel)
            if outcome == "cancelled":
                return False
            if outcome == "timeout":
                self._log(svc, "Start operation timed out. Terminating.")
                self._terminate(svc, run, svc.spec.timeout_stop)
                self._conclude(svc, generation, "timeout", f"ExecStart {cmd} did not finish in time")
                return False
            self._cleanup_group(svc, run)
            code, sig, result = describe_exit(run.returncode or 0)
            with self._lock:
                svc.exit_code, svc.exit_signal = code, sig
            if result != "success" and not cmd.ignore_failure:
                self._log(svc, f"Main process exited, {_exit_text(run.returncode or 0)}")
                self._run_stop_commands(svc, env, cwd, user, None, post_only=True)
                self._conclude(svc, generation, result, f"ExecStart {cmd} failed")
                return False
        for cmd in svc.spec.exec_start_post:
            if not self._run_control(svc, generation, cmd, env, cwd, user, deadline, "start-post"):
                return False
        with self._lock:
            if svc.generation != generation:
                return False
            svc.run = None
        if svc.spec.remain_after_exit:
            self._set_state(svc, "active", "exited")
        else:
            self._run_stop_commands(svc, env, cwd, user, None)
            self._set_state(svc, "inactive", "dead")
        self._log(svc, f"Finished {svc.name}.")
        return True

    def _run_simple(self, svc: _Service, generation: int, env: dict[str, str], cwd: str,
                    user: pwd.struct_passwd | None, deadline: float) -> bool:
        cancel = svc.cancel
        self._set_state(svc, "activating", "start")
        run = self._spawn(svc, svc.spec.exec_start[0], env, cwd, user, "main",
                          on_exit=lambda finished: self._on_main_exit(svc, generation, finished),
                          generation=generation)
        if not run.registered:
            return False
        self._log(svc, f"Main process {run.pid} started.")
        for cmd in svc.spec.exec_start_post:
            if not self._run_post(svc, generation, run, cmd, env, cwd, user, deadline):
                return False
        ready = self._await_ready(svc, run, deadline, cancel)
        if ready is None:
            if not self._claim(run):  # it exited just now; its exit handler concludes
                run.handled.wait(svc.spec.timeout_stop + KILL_WAIT_S)
                return False
            self._log(svc, "Readiness check did not pass in time. Stopping.")
            self._terminate(svc, run, svc.spec.timeout_stop)
            self._conclude(svc, generation, "timeout", "the readiness check did not pass before the start timeout; "
                                                       "the process was stopped")
            return False
        if not ready:
            if not cancel.is_set():
                # Let the exit handler record the exit, so the caller sees why the start failed.
                run.handled.wait(max(0.0, deadline - time.monotonic()) + 1.0)
            return False
        with self._lock:
            if svc.generation != generation or run.exited.is_set():
                return False
            self._set_state(svc, "active", "running")
        self._log(svc, f"Started {svc.name}.")
        return True

    def _run_post(self, svc: _Service, generation: int, run: _Run, cmd: ExecCommand, env: dict[str, str],
                  cwd: str, user: pwd.struct_passwd | None, deadline: float) -> bool:
        ok = self._run_control(svc, generation, cmd, env, cwd, user, deadline, "start-post")
        if not ok and self._claim(run):
            self._terminate(svc, run, svc.spec.timeout_stop)
        return ok

    def _await_ready(self, svc: _Service, run: _Run, deadline: float, cancel: threading.Event) -> bool | None:
        """True when ready, False when the process exited or the start was cancelled, None on timeout."""
        if svc.probe is None:
            return not run.exited.is_set()
        while True:
            if cancel.is_set() or run.exited.is_set():
                return False
            if svc.probe():
                return not run.exited.is_set()
            if time.monotonic() >= deadline:
                return None
            cancel.wait(POLL_S)

    # -- exits, restarts, stops -----------------------------------------------------------------

    def _on_main_exit(self, svc: _Service, generation: int, run: _Run) -> None:
        returncode = run.returncode if run.returncode is not None else 0
        with self._lock:
            if run.stopping or svc.generation != generation or svc.run is not run:
                return
            run.stopping = True
            code, sig, result = describe_exit(returncode)
            svc.exit_code, svc.exit_signal = code, sig
            was_active = svc.active_state == "active"
            self._set_state(svc, "deactivating", "stop-sigterm")
        self._log(svc, f"Main process exited, {_exit_text(returncode)}")
        self._cleanup_group(svc, run)
        self._run_stop_commands(svc, run.env, "/", None, None, post_only=not was_active)
        with self._lock:
            if svc.run is run:
                svc.run = None
        self._conclude(svc, generation, result, f"main process exited, {_exit_text(returncode)}")

    def _conclude(self, svc: _Service, generation: int, result: str, message: str) -> None:
        """After a run ended on its own or a start failed: restart per Restart=, or settle."""
        with self._lock:
            if svc.generation != generation or self._closed:
                return
            svc.result, svc.message = result, ("" if result == "success" else _redact(message, svc.secrets))
            if should_restart(svc.spec.restart, result):
                self._set_state(svc, "activating", "auto-restart")
                cancel = svc.cancel
                threading.Thread(target=self._restart_later, args=(svc, generation, cancel),
                                 name=f"{svc.name}-restart", daemon=True).start()
                restart = True
            else:
                restart = False
                self._set_state(svc, *(("inactive", "dead") if result == "success" else ("failed", "failed")))
        if restart:
            self._log(svc, f"Scheduled restart job in {svc.spec.restart_sec:g}s (Restart={svc.spec.restart}, "
                           f"result '{result}').")
        elif result == "success":
            self._log(svc, "Deactivated successfully.")
        else:
            self._log(svc, f"Failed with result '{result}'.")

    def _restart_later(self, svc: _Service, generation: int, cancel: threading.Event) -> None:
        if cancel.wait(svc.spec.restart_sec):
            return
        with self._lock:
            if svc.generation != generation or self._closed:
                return
            if not svc.limiter.allow():
                hit = True
            else:
                hit = False
                svc.n_restarts += 1
                count = svc.n_restarts
        if hit:
            self._enter_failed(svc, "start-limit-hit", f"Start request repeated too quickly "
                                                       f"(more than {svc.spec.start_limit_burst} starts within "
                                                       f"{svc.spec.start_limit_interval:g}s).")
            return
        self._log(svc, f"Scheduled restart job, restart counter is at {count}.")
        try:
            self._attempt_start(svc, generation, self._deadline(svc.spec, None))
        except Exception as exc:  # noqa: BLE001 - a thread has nobody to raise to; the journal says it
            self._enter_failed(svc, "resources", f"automatic restart crashed in the supervisor: {exc!r}")

    def _stop(self, svc: _Service, timeout: float) -> None:
        with self._lock:
            svc.generation += 1
            svc.cancel.set()
            control, svc.control = svc.control, None
        if control is not None and not control.exited.is_set():
            self._log(svc, f"Stopping control process {control.pid}.")
            self._terminate(svc, control, timeout)
        with self._lock:
            run = svc.run
            running = run is not None and not run.exited.is_set()
            if running:
                assert run is not None
                run.stopping = True
                self._set_state(svc, "deactivating", "stop")
            state = svc.active_state
        if not running:
            if state == "active" and svc.spec.type == "oneshot":  # RemainAfterExit=yes
                self._stop_remained(svc)
            elif state in ("activating", "active", "deactivating"):
                self._set_state(svc, "inactive", "dead")
                self._log(svc, f"Stopped {svc.name}.")
            return
        assert run is not None
        self._log(svc, f"Stopping {svc.name}...")
        if run.role == "main" and svc.spec.exec_stop:
            self._run_stop_commands(svc, run.env, "/", None, run.pid, only_stop=True,
                                    deadline=time.monotonic() + timeout)
        result = self._terminate(svc, run, timeout)
        self._run_stop_commands(svc, run.env, "/", None, None, post_only=True)
        with self._lock:
            if svc.run is run:
                svc.run = None
            code, sig, _ = describe_exit(run.returncode if run.returncode is not None else -signal.SIGKILL)
            svc.exit_code, svc.exit_signal = code, sig
            svc.result, svc.message = result, ("" if result == "success" else f"stop ended with result '{result}'")
            self._set_state(svc, *(("inactive", "dead") if result == "success" else ("failed", "failed")))
        self._log(svc, f"Stopped {svc.name}." if result == "success" else f"Failed with result '{result}'.")

    def _stop_remained(self, svc: _Service) -> None:
        try:
            env, user = self._build_env(svc)
        except _StartFailure:
            env, user = {}, None
        self._run_stop_commands(svc, env, self._safe_cwd(svc, env), user, None)
        self._set_state(svc, "inactive", "dead")
        self._log(svc, f"Stopped {svc.name}.")

    def _safe_cwd(self, svc: _Service, env: Mapping[str, str]) -> str:
        try:
            return self._working_directory(svc, env)
        except _StartFailure:
            return "/"

    def _terminate(self, svc: _Service, run: _Run, timeout: float) -> str:
        """KillSignal= to the group (per KillMode=), SIGKILL after `timeout`; returns systemd's result."""
        run.stopping = True
        spec = svc.spec
        escaped = _descendants(run.pid) if spec.kill_mode in ("control-group", "mixed") else []
        if not run.exited.is_set():
            with self._lock:
                if svc.run is run:
                    self._set_state(svc, "deactivating", "stop-sigterm")
            if spec.kill_mode == "control-group":
                _signal_group(run.pid, spec.kill_signal)
            elif spec.kill_mode in ("mixed", "process"):
                _signal_pid(run.pid, spec.kill_signal)
        whole_group = spec.kill_mode == "control-group"
        gone = _wait_gone(lambda: run.exited.is_set() and (not whole_group or not group_members(run.pid)),
                          time.monotonic() + timeout)
        timed_out = False
        if not gone and spec.kill_mode != "none":
            timed_out = not run.exited.is_set() or whole_group
            self._log(svc, f"State 'stop-sigterm' timed out. Killing process group {run.pid}.")
            with self._lock:
                if svc.run is run:
                    self._set_state(svc, "deactivating", "stop-sigkill")
            self._kill_group(svc, run, escaped, include_group=spec.kill_mode != "process")
        elif spec.kill_mode == "mixed":
            self._kill_group(svc, run, escaped, include_group=True)
        elif spec.kill_mode == "control-group":
            self._kill_group(svc, run, escaped, include_group=False)
        run.exited.wait(KILL_WAIT_S)
        with self._lock:
            if not group_members(run.pid):
                self._forget_group(run.pid)
        if timed_out:
            return "timeout"
        _, sig, result = describe_exit(run.returncode if run.returncode is not None else -signal.SIGKILL)
        if sig == spec.kill_signal.name:
            return "success"  # the process died of the signal we sent to stop it
        return result

    def _kill_group(self, svc: _Service, run: _Run, escaped: list[psutil.Process], include_group: bool) -> None:
        if include_group:
            _signal_group(run.pid, signal.SIGKILL)
        for proc in escaped:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    proc.kill()
            except psutil.Error:
                continue
        if svc.cgroup is not None:
            Cgroups.kill(svc.cgroup)
        if include_group:
            _wait_gone(lambda: not group_members(run.pid), time.monotonic() + KILL_WAIT_S)

    def _cleanup_group(self, svc: _Service, run: _Run) -> None:
        """After a process exited by itself: what it left in its group goes, as under KillMode=control-group."""
        if svc.spec.kill_mode in ("control-group", "mixed") and group_members(run.pid):
            self._log(svc, f"Killing leftover processes of group {run.pid}.")
            _signal_group(run.pid, svc.spec.kill_signal)
            if not _wait_gone(lambda: not group_members(run.pid), time.monotonic() + svc.spec.timeout_stop):
                _signal_group(run.pid, signal.SIGKILL)
                _wait_gone(lambda: not group_members(run.pid), time.monotonic() + KILL_WAIT_S)
        with self._lock:
            if not group_members(run.pid):
                self._forget_group(run.pid)

    def _run_stop_commands(self, svc: _Service, env: dict[str, str], cwd: str, user: pwd.struct_passwd | None,
                           main_pid: int | None, *, post_only: bool = False, only_stop: bool = False,
                           deadline: float | None = None) -> None:
        """ExecStop= (with $MAINPID) then ExecStopPost=; failures are logged, never fatal."""
        commands: list[ExecCommand] = []
        if not post_only:
            commands.extend(svc.spec.exec_stop)
        if not only_stop:
            commands.extend(svc.spec.exec_stop_post)
        if not commands:
            return
        stop_env = dict(env)
        if main_pid is not None:
            stop_env["MAINPID"] = str(main_pid)
        if cwd == "/":
            cwd = self._safe_cwd(svc, env)
        if user is None and svc.spec.user:
            user = self._user(svc)
        for cmd in commands:
            end = deadline if deadline is not None else time.monotonic() + svc.spec.timeout_stop
            try:
                run = self._spawn(svc, cmd, stop_env, cwd, user, "control")
            except _StartFailure as failure:
                self._log(svc, f"{cmd}: {failure.message}")
                continue
            if not run.exited.wait(max(0.0, end - time.monotonic())):
                self._log(svc, f"Stop command {cmd} timed out. Killing.")
                _signal_group(run.pid, signal.SIGKILL)
                run.exited.wait(KILL_WAIT_S)
            self._cleanup_group(svc, run)
            if run.returncode and not cmd.ignore_failure:
                self._log(svc, f"Stop command {cmd} exited, {_exit_text(run.returncode)}")


def _redact(text: str, secrets: Iterable[str]) -> str:
    """Every secret masked, longest first: a secret that contains another is masked whole, not left with its tail
    showing after the shorter one was replaced inside it."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _exit_text(returncode: int) -> str:
    if returncode >= 0:
        return f"code=exited, status={returncode}"
    try:
        name = signal.Signals(-returncode).name.removeprefix("SIG")
    except ValueError:
        name = str(-returncode)
    return f"code=killed, status={-returncode}/{name}"


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
