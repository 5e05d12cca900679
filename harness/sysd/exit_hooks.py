"""Nothing a supervisor started outlives the harness: at interpreter exit, and on a SIGTERM or SIGHUP that nobody
else handles, every process group of every open supervisor gets SIGKILL before the harness goes.

The hooks are installed by the first supervisor, not at import. They take no locks: a signal handler may run while
the interrupted thread holds any of them. (The reaper covers the one ending these cannot: a SIGKILL of the harness.)
"""
from __future__ import annotations

import atexit
import os
import signal
import threading
from typing import Protocol


class Killable(Protocol):
    """What the hooks need of a supervisor."""

    def kill_now(self) -> None:
        """SIGKILL every process group it started, without taking a lock."""


_LIVE: set[Killable] = set()
_HANDLERS_INSTALLED = False


def register(supervisor: Killable) -> None:
    """Kill `supervisor`'s processes if the harness exits or is terminated while it is open."""
    _install()
    _LIVE.add(supervisor)


def unregister(supervisor: Killable) -> None:
    """`supervisor` closed: it has nothing left for the hooks to kill."""
    _LIVE.discard(supervisor)


def kill_all_supervised() -> None:
    """Signal- and atexit-safe: SIGKILL every process group any open supervisor started (no locks)."""
    for supervisor in tuple(_LIVE):
        supervisor.kill_now()


def _on_fatal_signal(signum: int, _frame: object) -> None:
    kill_all_supervised()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(kill_all_supervised)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        # Only where nobody else handles the signal: default action would kill us and orphan the services.
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _on_fatal_signal)
