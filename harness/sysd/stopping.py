"""Stopping a service the way systemd does: ExecStop= (with $MAINPID), KillSignal= to what KillMode= names, SIGKILL
after TimeoutStopSec=, then ExecStopPost=; and, after a process exited by itself, the rest of its group.

Every process of a service leads a process group of its own, so a group signal reaches what it forked; children
that left the group (a new session) are found as descendants before the signal and killed too, and a cgroup, when
there is one, catches whatever is left.
"""
from __future__ import annotations

import os
import pwd
import signal
import time
from typing import TYPE_CHECKING

import psutil

from harness.sysd.process import Run, StartFailure, build_env, safe_cwd, spawn, user_for
from harness.sysd.spec import ExecCommand
from harness.sysd.status import describe_exit, exit_text
from quantlab_chaos.procgroup import KILL_WAIT_S, group_alive, signal_group, signal_pid
from quantlab_chaos.waiting import until_deadline

if TYPE_CHECKING:
    from harness.sysd.service import Service


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    if not group_alive(pgid):
        return []
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return members


def descendants(pid: int) -> list[psutil.Process]:
    """Every process `pid` forked, also those that left its process group (gone processes are skipped)."""
    try:
        children: list[psutil.Process] = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return children


def stop(svc: Service, timeout: float) -> None:
    """Stops a service: its control process, then its main process (ExecStop=, KillSignal=, SIGKILL after `timeout`,
    ExecStopPost=). A stop supersedes any start or restart in progress, so it never triggers Restart=."""
    with svc.host.lock:
        svc.generation += 1
        svc.cancel.set()
        control, svc.control = svc.control, None
    if control is not None and not control.exited.is_set():
        svc.log(f"Stopping control process {control.pid}.")
        terminate(svc, control, timeout)
    with svc.host.lock:
        run = svc.run
        running = run is not None and not run.exited.is_set()
        if running:
            assert run is not None
            run.stopping = True
            svc.set_state("deactivating", "stop")
        state = svc.active_state
    if not running:
        if state == "active" and svc.spec.type == "oneshot":  # RemainAfterExit=yes
            _stop_remained(svc)
        elif state in ("activating", "active", "deactivating"):
            svc.set_state("inactive", "dead")
            svc.log(f"Stopped {svc.name}.")
        return
    assert run is not None
    svc.log(f"Stopping {svc.name}...")
    if run.role == "main" and svc.spec.exec_stop:
        run_stop_commands(svc, run.env, "/", None, run.pid, only_stop=True, deadline=time.monotonic() + timeout)
    result = terminate(svc, run, timeout)
    run_stop_commands(svc, run.env, "/", None, None, post_only=True)
    with svc.host.lock:
        if svc.run is run:
            svc.run = None
        code, sig, _ = describe_exit(run.returncode if run.returncode is not None else -signal.SIGKILL)
        svc.exit_code, svc.exit_signal = code, sig
        svc.result, svc.message = result, ("" if result == "success" else f"stop ended with result '{result}'")
        svc.set_state(*(("inactive", "dead") if result == "success" else ("failed", "failed")))
    svc.log(f"Stopped {svc.name}." if result == "success" else f"Failed with result '{result}'.")


def _stop_remained(svc: Service) -> None:
    """A oneshot with RemainAfterExit=yes has no process left: a stop runs its ExecStop= lines and settles."""
    try:
        env, user = build_env(svc)
    except StartFailure:
        env, user = {}, None
    run_stop_commands(svc, env, safe_cwd(svc, env), user, None)
    svc.set_state("inactive", "dead")
    svc.log(f"Stopped {svc.name}.")


def terminate(svc: Service, run: Run, timeout: float) -> str:
    """KillSignal= to the group (per KillMode=), SIGKILL after `timeout`; returns systemd's result."""
    run.stopping = True
    spec = svc.spec
    escaped = descendants(run.pid) if spec.kill_mode in ("control-group", "mixed") else []
    if not run.exited.is_set():
        with svc.host.lock:
            if svc.run is run:
                svc.set_state("deactivating", "stop-sigterm")
        if spec.kill_mode == "control-group":
            signal_group(run.pid, spec.kill_signal)
        elif spec.kill_mode in ("mixed", "process"):
            signal_pid(run.pid, spec.kill_signal)
    whole_group = spec.kill_mode == "control-group"
    gone = until_deadline(lambda: run.exited.is_set() and (not whole_group or not group_members(run.pid)),
                          time.monotonic() + timeout)
    timed_out = False
    if not gone and spec.kill_mode != "none":
        timed_out = not run.exited.is_set() or whole_group
        svc.log(f"State 'stop-sigterm' timed out. Killing process group {run.pid}.")
        with svc.host.lock:
            if svc.run is run:
                svc.set_state("deactivating", "stop-sigkill")
        _kill_group(svc, run, escaped, include_group=spec.kill_mode != "process")
    elif spec.kill_mode == "mixed":
        _kill_group(svc, run, escaped, include_group=True)
    elif spec.kill_mode == "control-group":
        _kill_group(svc, run, escaped, include_group=False)
    run.exited.wait(KILL_WAIT_S)
    with svc.host.lock:
        if not group_members(run.pid):
            svc.host.forget_group(run.pid)
    if timed_out:
        return "timeout"
    _, sig, result = describe_exit(run.returncode if run.returncode is not None else -signal.SIGKILL)
    if sig == spec.kill_signal.name:
        return "success"  # the process died of the signal we sent to stop it
    return result


def _kill_group(svc: Service, run: Run, escaped: list[psutil.Process], include_group: bool) -> None:
    """SIGKILL to the group (when `include_group`), to the descendants that left it, and to the cgroup."""
    if include_group:
        signal_group(run.pid, signal.SIGKILL)
    for proc in escaped:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
        except psutil.Error:
            continue
    if svc.cgroup is not None:
        svc.cgroup.kill()
    if include_group:
        until_deadline(lambda: not group_members(run.pid), time.monotonic() + KILL_WAIT_S)


def cleanup_group(svc: Service, run: Run) -> None:
    """After a process exited by itself: what it left in its group goes, as under KillMode=control-group."""
    if svc.spec.kill_mode in ("control-group", "mixed") and group_members(run.pid):
        svc.log(f"Killing leftover processes of group {run.pid}.")
        signal_group(run.pid, svc.spec.kill_signal)
        if not until_deadline(lambda: not group_members(run.pid), time.monotonic() + svc.spec.timeout_stop):
            signal_group(run.pid, signal.SIGKILL)
            until_deadline(lambda: not group_members(run.pid), time.monotonic() + KILL_WAIT_S)
    with svc.host.lock:
        if not group_members(run.pid):
            svc.host.forget_group(run.pid)


def run_stop_commands(svc: Service, env: dict[str, str], cwd: str, user: pwd.struct_passwd | None,
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
        cwd = safe_cwd(svc, env)
    if user is None and svc.spec.user:
        user = user_for(svc)
    for cmd in commands:
        end = deadline if deadline is not None else time.monotonic() + svc.spec.timeout_stop
        try:
            run = spawn(svc, cmd, stop_env, cwd, user, "control")
        except StartFailure as failure:
            svc.log(f"{cmd}: {failure.message}")
            continue
        if not run.exited.wait(max(0.0, end - time.monotonic())):
            svc.log(f"Stop command {cmd} timed out. Killing.")
            signal_group(run.pid, signal.SIGKILL)
            run.exited.wait(KILL_WAIT_S)
        cleanup_group(svc, run)
        if run.returncode and not cmd.ignore_failure:
            svc.log(f"Stop command {cmd} exited, {exit_text(run.returncode)}")
