"""One service under a supervisor: its state, its journal, and a start from ExecStartPre= to the started state, then
its main process's exit and the restart Restart= and RestartPreventExitStatus= call for.

Every start bumps the service's generation, and so does every stop: an attempt, an exit handler or a restart timer
that finds the generation moved on was superseded and does nothing, so a stop never races a restart into life.
All state is guarded by the supervisor's one lock (`Host.lock`), so a status is a consistent snapshot.
"""
from __future__ import annotations

import pwd
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from harness import reaper
from harness.sysd.cgroups import Cgroups, ServiceGroup
from harness.sysd.process import Run, StartFailure, build_env, spawn, working_directory
from harness.sysd.spec import ExecCommand, ServiceSpec
from harness.sysd.status import LimitsStatus, LogLine, StartLimit, describe_exit, exit_text, should_restart
from harness.sysd.stopping import cleanup_group, run_stop_commands, terminate
from quantlab_chaos.procgroup import KILL_WAIT_S, signal_group
from quantlab_chaos.redact import Redactor, is_secret_name
from quantlab_chaos.waiting import POLL_S

START_TIMEOUT_CAP_S = 90.0  # stands in for TimeoutStartSec=infinity so no start waits forever
LOG_MEMORY_LINES = 20000


@dataclass
class Host:
    """What the services of one supervisor share: the lock over all their state, the condition waiters sleep on
    (notified on every state change), the process groups started so far, the cgroups, and whether it is closed."""

    cgroups: Cgroups
    honour_user: bool
    lock: threading.RLock = field(default_factory=threading.RLock)
    pgids: set[int] = field(default_factory=set)
    closed: bool = False
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def forget_group(self, pgid: int) -> None:
        """The group is gone (or SIGKILLed for good): neither kill_now() nor the reaper needs it any more."""
        self.pgids.discard(pgid)
        reaper.forget(pgid)


@dataclass
class Service:
    """A service as the supervisor runs it: its spec, its systemd state, and the process it is running."""

    name: str
    spec: ServiceSpec
    host: Host
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
    main_exit: int | None = None  # the main process's returncode in this start, for RestartPreventExitStatus=
    n_restarts: int = 0
    since: float = field(default_factory=time.time)
    generation: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    run: Run | None = None
    notes: list[str] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)
    redactor: Redactor = field(default_factory=lambda: Redactor(()))
    journal: deque[LogLine] = field(default_factory=lambda: deque(maxlen=LOG_MEMORY_LINES))
    log_lock: threading.Lock = field(default_factory=threading.Lock)
    cgroup: ServiceGroup | None = None
    cgroup_wanted: bool = False
    oom_kills_seen: int = 0  # the group's OOM kill count when the current main process was spawned
    control: Run | None = None

    # -- bookkeeping ------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        """A note for `status().notes` (a deviation from the unit the harness had to make), once."""
        if text not in self.notes:
            self.notes.append(text)

    def set_state(self, active: str, sub: str) -> None:
        """ActiveState/SubState, waking everyone who waits on a state."""
        with self.host.changed:
            if self.active_state != active:
                self.since = time.time()
            self.active_state, self.sub_state = active, sub
            self.host.changed.notify_all()

    def enter_failed(self, result: str, message: str) -> None:
        """Failed with `result`, without a restart (start-limit-hit, or the supervisor itself failed)."""
        with self.host.lock:
            self.result, self.message = result, self.redactor(message)
            self.set_state("failed", "failed")
        self.log(message)
        self.log(f"Failed with result '{result}'.")

    def log(self, text: str, stream: str = "supervisor", pid: int | None = None) -> str:
        """Adds a journal line (secret values replaced by ***) and returns the text as logged."""
        with self.log_lock:
            text = self.redactor(text)
            record = LogLine(time.time(), stream, pid, text)
            self.journal.append(record)
            with self.log_path.open("a", encoding="utf-8") as handle:
                handle.write(record.format(self.name) + "\n")
        return text

    def remember_secrets(self, env: Mapping[str, str]) -> None:
        """Masks the secret-looking values of `env` in the journal from now on (and keeps masking earlier ones)."""
        with self.log_lock:
            self.secrets.update(value for key, value in env.items() if is_secret_name(key))
            self.redactor = Redactor(self.secrets)

    def claim(self, run: Run) -> bool:
        """Exactly one party handles a run's end: its exit handler, a stop, or a failed start."""
        with self.host.lock:
            if run.stopping:
                return False
            run.stopping = True
            return True

    def register(self, generation: int, run: Run) -> bool:
        """Makes `run` the service's main or control process unless a stop/start superseded this attempt."""
        with self.host.lock:
            if self.generation == generation and not self.host.closed:
                if run.role == "control":
                    self.control = run
                else:
                    self.run = run
                return True
        run.stopping = True
        signal_group(run.pid, signal.SIGKILL)
        return False

    def deadline(self, timeout: float | None) -> float:
        """The monotonic time a start must be done by: `timeout`, else TimeoutStartSec= (infinity is capped)."""
        seconds = timeout if timeout is not None else self.spec.timeout_start
        if seconds == float("inf"):
            seconds = START_TIMEOUT_CAP_S
        return time.monotonic() + seconds

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process in the service's group since its main process started
        (systemd's result `oom-kill`)."""
        kills = self.cgroup.oom_kills() if self.cgroup is not None else None
        return kills is not None and kills > self.oom_kills_seen

    def reset_failed(self) -> None:
        """Like `systemctl reset-failed`: forget the failure and the start rate counter."""
        with self.host.lock:
            self.limiter.reset()
            if self.active_state == "failed":
                self.set_state("inactive", "dead")
                self.result = "success"

    # -- starting -------------------------------------------------------------------------------

    def start(self, timeout: float | None) -> bool:
        """A manual start: supersedes whatever was in progress, counts against the start limit, then one attempt."""
        with self.host.lock:
            self.cancel.set()
            self.cancel = threading.Event()
            self.generation += 1
            generation = self.generation
            if not self.limiter.allow():
                self.enter_failed("start-limit-hit",
                                  "start request repeated too quickly; call reset_failed() or restart()")
                return False
        return self.attempt_start(generation, self.deadline(timeout))

    def attempt_start(self, generation: int, deadline: float) -> bool:
        """One start attempt (manual or automatic). True when the service reached its started state."""
        spec = self.spec
        self.set_state("activating", "start-pre" if spec.exec_start_pre else "start")
        with self.host.lock:
            self.result, self.message, self.main_exit = "success", "", None
        self.log(f"Starting {self.name}...")
        try:
            env, user = build_env(self)
            self.remember_secrets(env)
            cwd = working_directory(self, env)
            for cmd in spec.exec_start_pre:
                if not self.run_control(generation, cmd, env, cwd, user, deadline, "start-pre"):
                    return False
            if spec.type == "oneshot":
                return self.run_oneshot(generation, env, cwd, user, deadline)
            return self.run_simple(generation, env, cwd, user, deadline)
        except StartFailure as failure:
            with self.host.lock:
                self.exit_code, self.exit_signal = failure.exit_code, None
            self.log(failure.message)
            self.conclude(generation, failure.result, failure.message)
            return False

    @staticmethod
    def wait_run(run: Run, deadline: float, cancel: threading.Event) -> str:
        """'exited', 'cancelled' or 'timeout'."""
        while not run.exited.wait(POLL_S):
            if cancel.is_set():
                return "cancelled"
            if time.monotonic() >= deadline:
                return "timeout"
        return "exited"

    def run_control(self, generation: int, cmd: ExecCommand, env: dict[str, str], cwd: str,
                    user: pwd.struct_passwd | None, deadline: float, sub_state: str) -> bool:
        """Runs an ExecStartPre=/ExecStartPost= command to completion; False (already concluded) on failure."""
        cancel = self.cancel
        self.set_state("activating", sub_state)
        run = spawn(self, cmd, env, cwd, user, "control", generation=generation)
        if not run.registered:
            return False
        outcome = self.wait_run(run, deadline, cancel)
        with self.host.lock:
            if self.control is run:
                self.control = None
        if outcome == "cancelled":
            return False
        if outcome == "timeout":
            self.log(f"Control process {run.pid} ({cmd.path}) timed out. Killing.")
            terminate(self, run, 0.0)
            self.conclude(generation, "timeout", f"{sub_state} command {cmd} timed out")
            return False
        cleanup_group(self, run)
        code, sig, result = describe_exit(run.returncode or 0)
        if result != "success" and not cmd.ignore_failure:
            with self.host.lock:
                self.exit_code, self.exit_signal = code, sig
            message = f"{sub_state} command {cmd} failed ({'status=' + str(code) if sig is None else 'signal=' + sig})"
            self.log(f"Control process exited, {exit_text(run.returncode or 0)}")
            self.conclude(generation, result, message)
            return False
        return True

    def run_oneshot(self, generation: int, env: dict[str, str], cwd: str, user: pwd.struct_passwd | None,
                    deadline: float) -> bool:
        """Type=oneshot: every ExecStart= in turn to completion, then ExecStartPost=; started once they all ran."""
        cancel = self.cancel
        self.set_state("activating", "start")
        for cmd in self.spec.exec_start:
            run = spawn(self, cmd, env, cwd, user, "main", generation=generation)
            if not run.registered:
                return False
            outcome = self.wait_run(run, deadline, cancel)
            if outcome == "cancelled":
                return False
            if outcome == "timeout":
                self.log("Start operation timed out. Terminating.")
                terminate(self, run, self.spec.timeout_stop)
                with self.host.lock:
                    self.main_exit = run.returncode
                self.conclude(generation, "timeout", f"ExecStart {cmd} did not finish in time")
                return False
            cleanup_group(self, run)
            code, sig, result = describe_exit(run.returncode or 0)
            with self.host.lock:
                self.exit_code, self.exit_signal, self.main_exit = code, sig, run.returncode or 0
            if result != "success" and not cmd.ignore_failure:
                self.log(f"Main process exited, {exit_text(run.returncode or 0)}")
                run_stop_commands(self, env, cwd, user, None, post_only=True)
                self.conclude(generation, result, f"ExecStart {cmd} failed")
                return False
        for cmd in self.spec.exec_start_post:
            if not self.run_control(generation, cmd, env, cwd, user, deadline, "start-post"):
                return False
        with self.host.lock:
            if self.generation != generation:
                return False
            self.run = None
        if self.spec.remain_after_exit:
            self.set_state("active", "exited")
        else:
            run_stop_commands(self, env, cwd, user, None)
            self.set_state("inactive", "dead")
        self.log(f"Finished {self.name}.")
        return True

    def run_simple(self, generation: int, env: dict[str, str], cwd: str, user: pwd.struct_passwd | None,
                   deadline: float) -> bool:
        """Type=simple/exec: the main process, ExecStartPost=, then the readiness probe; started once it passes."""
        cancel = self.cancel
        self.set_state("activating", "start")

        def on_exit(finished: Run) -> None:
            self.on_main_exit(generation, finished)

        run = spawn(self, self.spec.exec_start[0], env, cwd, user, "main", on_exit=on_exit, generation=generation)
        if not run.registered:
            return False
        self.log(f"Main process {run.pid} started.")
        for cmd in self.spec.exec_start_post:
            if not self.run_post(generation, run, cmd, env, cwd, user, deadline):
                return False
        ready = self.await_ready(run, deadline, cancel)
        if ready is None:
            if not self.claim(run):  # it exited just now; its exit handler concludes
                run.handled.wait(self.spec.timeout_stop + KILL_WAIT_S)
                return False
            self.log("Readiness check did not pass in time. Stopping.")
            terminate(self, run, self.spec.timeout_stop)
            with self.host.lock:
                self.main_exit = run.returncode
            self.conclude(generation, "timeout", "the readiness check did not pass before the start timeout; "
                                                 "the process was stopped")
            return False
        if not ready:
            if not cancel.is_set():
                # Let the exit handler record the exit, so the caller sees why the start failed.
                run.handled.wait(max(0.0, deadline - time.monotonic()) + 1.0)
            return False
        with self.host.lock:
            if self.generation != generation or run.exited.is_set():
                return False
            self.set_state("active", "running")
        self.log(f"Started {self.name}.")
        return True

    def run_post(self, generation: int, run: Run, cmd: ExecCommand, env: dict[str, str], cwd: str,
                 user: pwd.struct_passwd | None, deadline: float) -> bool:
        """One ExecStartPost= of a simple service; its failure stops the main process too."""
        ok = self.run_control(generation, cmd, env, cwd, user, deadline, "start-post")
        if not ok and self.claim(run):
            terminate(self, run, self.spec.timeout_stop)
        return ok

    def await_ready(self, run: Run, deadline: float, cancel: threading.Event) -> bool | None:
        """True when ready, False when the process exited or the start was cancelled, None on timeout."""
        if self.probe is None:
            return not run.exited.is_set()
        while True:
            if cancel.is_set() or run.exited.is_set():
                return False
            if self.probe():
                return not run.exited.is_set()
            if time.monotonic() >= deadline:
                return None
            cancel.wait(POLL_S)

    # -- exits and restarts -----------------------------------------------------------------------

    def on_main_exit(self, generation: int, run: Run) -> None:
        """The main process of a simple service exited by itself: ExecStop=/ExecStopPost= as systemd runs them, then
        a restart or a settled state."""
        returncode = run.returncode if run.returncode is not None else 0
        with self.host.lock:
            if run.stopping or self.generation != generation or self.run is not run:
                return
            run.stopping = True
            code, sig, result = describe_exit(returncode)
            oom_killed = result != "success" and self.oom_killed()
            result = "oom-kill" if oom_killed else result
            self.exit_code, self.exit_signal, self.main_exit = code, sig, returncode
            was_active = self.active_state == "active"
            self.set_state("deactivating", "stop-sigterm")
        self.log(f"Main process exited, {exit_text(returncode)}")
        if oom_killed:
            self.log("A process of this unit has been killed by the OOM killer.")
        cleanup_group(self, run)
        run_stop_commands(self, run.env, "/", None, None, post_only=not was_active)
        with self.host.lock:
            if self.run is run:
                self.run = None
        self.conclude(generation, result, f"main process exited, {exit_text(returncode)}")

    def conclude(self, generation: int, result: str, message: str) -> None:
        """After a run ended on its own or a start failed: restart per Restart= (unless RestartPreventExitStatus=
        lists the main process's exit), or settle."""
        spec = self.spec
        prevented = False
        with self.host.lock:
            if self.generation != generation or self.host.closed:
                return
            self.result, self.message = result, ("" if result == "success" else self.redactor(message))
            main_exit = self.main_exit
            restart = should_restart(spec.restart, result, main_exit=main_exit,
                                     prevent=spec.restart_prevent_exit_status)
            if restart:
                self.set_state("activating", "auto-restart")
                cancel = self.cancel
                threading.Thread(target=self.restart_later, args=(generation, cancel),
                                 name=f"{self.name}-restart", daemon=True).start()
            else:
                prevented = should_restart(spec.restart, result)
                self.set_state(*(("inactive", "dead") if result == "success" else ("failed", "failed")))
        if restart:
            self.log(f"Scheduled restart job in {spec.restart_sec:g}s (Restart={spec.restart}, result '{result}').")
            return
        if prevented and main_exit is not None:
            self.log(f"Restart prevented by exit status ({exit_text(main_exit)}; "
                     f"RestartPreventExitStatus={spec.restart_prevent_exit_status}).")
        if result == "success":
            self.log("Deactivated successfully.")
        else:
            self.log(f"Failed with result '{result}'.")

    def restart_later(self, generation: int, cancel: threading.Event) -> None:
        """Waits RestartSec= (unless cancelled by a stop or start), then an automatic start, if the limit allows."""
        if cancel.wait(self.spec.restart_sec):
            return
        with self.host.lock:
            if self.generation != generation or self.host.closed:
                return
            hit = not self.limiter.allow()
            if not hit:
                self.n_restarts += 1
            count = self.n_restarts
        if hit:
            self.enter_failed("start-limit-hit", f"Start request repeated too quickly "
                                                 f"(more than {self.spec.start_limit_burst} starts within "
                                                 f"{self.spec.start_limit_interval:g}s).")
            return
        self.log(f"Scheduled restart job, restart counter is at {count}.")
        try:
            self.attempt_start(generation, self.deadline(None))
        except Exception as exc:  # noqa: BLE001 - a thread has nobody to raise to; the journal says it
            self.enter_failed("resources", f"automatic restart crashed in the supervisor: {exc!r}")
