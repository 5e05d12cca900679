"""A supervisor that boots services from their unit files the way systemd would, without systemd.

`Supervisor` is a context manager that owns every process it starts. For each service added with
a `ServiceSpec` it builds the environment like systemd (base env, Environment=, EnvironmentFile=),
starts the process in its own process group, captures stdout/stderr journal-style, follows
Type=, Restart=, RestartSec=, RestartPreventExitStatus=, StartLimitIntervalSec=/StartLimitBurst=,
TimeoutStopSec= and KillMode=, and applies MemoryMax=, MemoryHigh=, CPUQuota= and TasksMax= through cgroup v2 or,
where v2 lacks the controllers, cgroup v1, when it can (`status().limits` says which, or why not; `cgroups_summary`
says it once for the whole supervisor). Nothing outlives it: close(), exceptions, atexit and SIGTERM/SIGHUP all kill
the process groups it started.

Deviations from systemd, on purpose: output sent to `StandardOutput=file:/append:` is also kept in
the harness journal; `User=` is honoured only when the harness runs as root and the user exists;
`restart()` also clears a start-limit-hit state (systemctl needs reset-failed for that).
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path

from harness.readiness import Readiness, make_probe
from harness.sysd import exit_hooks, stopping
from harness.sysd.cgroups import CGROUP_ROOT, Cgroups, ServiceGroup
from harness.sysd.process import build_env
from harness.sysd.service import Host, Service
from harness.sysd.spec import ServiceSpec
from harness.sysd.status import LimitsStatus, ServiceError, ServiceFailed, ServiceStatus, ServiceTimeout, StartLimit
from quantlab_chaos.procgroup import KILL_WAIT_S, signal_group
from quantlab_chaos.redact import redact_env
from quantlab_chaos.waiting import POLL_S


class Supervisor:
    """Runs services from unit files; `with Supervisor(tmp_path) as sup: sup.add(...); sup.start(...)`."""

    def __init__(self, runtime_dir: str | os.PathLike[str], *, cgroup_root: Path = CGROUP_ROOT,
                 honour_user: bool = True, close_timeout: float = 10.0, cgroups: Cgroups | None = None) -> None:
        self.runtime_dir = Path(runtime_dir)
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.close_timeout = close_timeout
        self._services: dict[str, Service] = {}
        self._host = Host(cgroups=cgroups if cgroups is not None else Cgroups(cgroup_root), honour_user=honour_user)
        exit_hooks.register(self)

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
        if self._host.closed:
            raise ServiceError("this Supervisor is closed. Create a new one for new services.")
        with self._host.lock:
            if name in self._services:
                raise ServiceError(f"a service named {name!r} was already added. Use another name or restart() it.")
            log_path = self.runtime_dir / (re.sub(r"[^A-Za-z0-9_.@-]", "_", name) + ".log")
            service = Service(
                name=name, spec=spec, host=self._host, extra_env=dict(extra_env or {}),
                override_env=dict(override_env or {}), probe=make_probe(readiness), log_path=log_path,
                limiter=StartLimit(spec.start_limit_interval, spec.start_limit_burst),
                limits=self._initial_limits(spec),
            )
            service.cgroup_wanted = self._host.cgroups.available and spec.cgroup_limits.requested
            for warning in spec.warnings:
                service.note(warning)
            for rewrite in spec.rewrites:
                service.note(f"rewritten {rewrite}")
            for item in spec.unhonoured_directives():
                service.note(f"{item.section}: {item.key}={item.value} (line {item.line}) "
                             f"is not applied by the harness")
            self._services[name] = service

    def _initial_limits(self, spec: ServiceSpec) -> LimitsStatus:
        cgroups = self._host.cgroups
        if not spec.cgroup_limits.requested:
            reason = "not requested: the unit sets no MemoryMax=, MemoryHigh=, CPUQuota= or TasksMax="
        elif not cgroups.available:
            reason = cgroups.reason
        else:
            reason = f"pending: applied through {cgroups.kind} when the service starts"
        return LimitsStatus(False, reason, memory_max=spec.memory_max, cpu_quota=spec.cpu_quota,
                            nofile=spec.limit_nofile, memory_high=spec.memory_high, tasks_max=spec.tasks_max,
                            hierarchy=cgroups.kind)

    @property
    def cgroups_summary(self) -> str:
        """Once for all its services: the hierarchy the limits are enforced through, or why they are not."""
        return self._host.cgroups.describe()

    def cgroup(self, name: str) -> ServiceGroup | None:
        """The service's cgroup (its accounting: CPU time, OOM kills), once a start made it; None without one."""
        return self._get(name).cgroup

    def _get(self, name: str) -> Service:
        try:
            return self._services[name]
        except KeyError:
            raise ServiceError(f"no service named {name!r}. Add it with Supervisor.add() first "
                               f"(known: {', '.join(self._services) or 'none'}).") from None

    # -- queries --------------------------------------------------------------------------------

    def status(self, name: str) -> ServiceStatus:
        """Like `systemctl status`: active/sub state, result, main PID, last exit, restarts, limits."""
        svc = self._get(name)
        with self._host.lock:
            run = svc.run
            main_pid = run.pid if run is not None and run.role == "main" and not run.exited.is_set() else None
            return ServiceStatus(
                name=name, active_state=svc.active_state, sub_state=svc.sub_state, result=svc.result,
                main_pid=main_pid, exit_code=svc.exit_code, signal=svc.exit_signal, n_restarts=svc.n_restarts,
                since=datetime.fromtimestamp(svc.since).astimezone(), message=svc.message, limits=svc.limits,
                notes=tuple(svc.notes),
            )

    def is_active(self, name: str) -> bool:
        """Like `systemctl is-active`: True when the service's ActiveState is active."""
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
        """The file the service's journal is also written to."""
        return self._get(name).log_path

    def environment(self, name: str, *, redact: bool = True) -> dict[str, str]:
        """The environment the service's next start gets (secret-looking values redacted by default)."""
        env, _ = build_env(self._get(name))
        return redact_env(env) if redact else env

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
            with self._host.changed:
                # Short waits: a notify between the check and the wait, or a new log line, is not missed for long.
                self._host.changed.wait(min(remaining, POLL_S))

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
        error.status, error.log_tail = status, tuple(tail)
        return error

    # -- control --------------------------------------------------------------------------------

    def start(self, name: str, timeout: float | None = None, *, check: bool = True) -> ServiceStatus:
        """Starts a service and waits until it is started: simple/exec once spawned and ready,
        oneshot once its ExecStart= lines ran. Raises ServiceFailed when it fails and `check`."""
        svc = self._get(name)
        with self._host.lock:
            if self._host.closed:
                raise ServiceError("this Supervisor is closed. Create a new one to start services.")
            if svc.active_state == "active":
                return self.status(name)
            in_progress = svc.active_state == "activating" and svc.sub_state != "auto-restart"
        if in_progress:  # like a second `systemctl start`: join the start already running
            status = self.wait_until(name, lambda s: s.active_state != "activating" or s.sub_state == "auto-restart",
                                     svc.deadline(timeout) - time.monotonic(), what="a started state")
            if check and (status.active_state == "failed" or status.sub_state == "auto-restart"):
                raise self._error(ServiceFailed, name, f"{name} failed to start ({status.result}): {status.message}")
            return status
        started = svc.start(timeout)
        status = self.status(name)
        if check and not started:
            raise self._error(ServiceFailed, name,
                              f"{name} failed to start ({status.result}): {status.message or 'see its log'}")
        return status

    def stop(self, name: str) -> ServiceStatus:
        """Stops a service like systemctl: ExecStop=, KillSignal to the group, SIGKILL after TimeoutStopSec=.
        A stop never triggers Restart=."""
        svc = self._get(name)
        stopping.stop(svc, svc.spec.timeout_stop)
        return self.status(name)

    def restart(self, name: str, timeout: float | None = None) -> ServiceStatus:
        """stop() then start(); clears a failed or start-limit-hit state first."""
        self.reset_failed(name)
        self.stop(name)
        return self.start(name, timeout)

    def reset_failed(self, name: str) -> None:
        """Like `systemctl reset-failed`: forget the failure and the start rate counter."""
        self._get(name).reset_failed()

    def close(self) -> None:
        """Stops every service (in parallel), kills what is left, removes cgroups. Safe to call twice."""
        with self._host.lock:
            if self._host.closed:
                return
            self._host.closed = True
            services = list(self._services.values())
        stoppers = [threading.Thread(target=stopping.stop, args=(svc, min(svc.spec.timeout_stop, self.close_timeout)),
                                     name=f"stop-{svc.name}", daemon=True) for svc in services]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join(self.close_timeout + KILL_WAIT_S)
        self.kill_now()
        for pgid in tuple(self._host.pgids):  # SIGKILLed just now: nothing is left for the reaper to do
            self._host.forget_group(pgid)
        self._host.cgroups.close()
        exit_hooks.unregister(self)

    def kill_now(self) -> None:
        """SIGKILL every process group this supervisor started; lock-free, for signal handlers and atexit."""
        for pgid in tuple(self._host.pgids):
            signal_group(pgid, signal.SIGKILL)
