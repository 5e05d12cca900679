"""Stopping a process group: the one way the harness and the canary end what they started.

Every command runs in a session of its own (`start_new_session=True`), so its pid is its process group and one
signal reaches everything it forked. `stop` asks first (SIGTERM, or the signal given), waits, then SIGKILLs.
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

KILL_WAIT_S = 5.0  # after SIGKILL; only a process stuck in the kernel takes longer


def signal_group(pgid: int, sig: int) -> bool:
    """Sends `sig` to process group `pgid`; False when the group is gone (or not ours)."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def signal_pid(pid: int, sig: int) -> bool:
    """Sends `sig` to one process; False when it is gone (or not ours)."""
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def group_alive(pgid: int) -> bool:
    """True while any process is in group `pgid` (zombies count until reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(process: subprocess.Popen[Any], grace: float, *, first: int = signal.SIGTERM,
         kill_wait: float = KILL_WAIT_S) -> int | None:
    """Ends `process`'s group: `first` (SIGTERM), up to `grace` s for the leader to exit, then SIGKILL to the group.

    Returns the leader's exit code, or None when even SIGKILL did not end it within `kill_wait` (a process stuck in
    the kernel). A `grace` of 0 goes straight to SIGKILL. Stragglers the leader left behind get the SIGKILL too.
    """
    if process.poll() is None and grace > 0:
        signal_group(process.pid, first)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    signal_group(process.pid, signal.SIGKILL)
    try:
        return process.wait(timeout=kill_wait)
    except subprocess.TimeoutExpired:
        return None


def kill(process: subprocess.Popen[Any], kill_wait: float = KILL_WAIT_S) -> int | None:
    """SIGKILL to `process`'s group at once, then reap the leader."""
    return stop(process, 0, kill_wait=kill_wait)
