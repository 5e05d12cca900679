"""Polling with a deadline: the one loop every wait in the harness and the canary goes through."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
POLL_S = 0.05


def wait_until(condition: Callable[[], T | None], *, timeout: float, interval: float = POLL_S,
               what: str = "condition") -> T:
    """Polls `condition` until it returns a truthy value and returns it; TimeoutError after `timeout` s.

    An exception from `condition` counts as "not yet" (a probe that cannot connect yet), and the last one is named in
    the TimeoutError so the reader sees why it never held.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - a failing probe is "not yet"
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"{what} not met within {timeout:.1f} s{detail}")
        time.sleep(interval)


def eventually(condition: Callable[[], object], *, timeout: float, interval: float = POLL_S) -> bool:
    """True as soon as `condition` is truthy, False if it is not within `timeout` seconds."""
    try:
        wait_until(condition, timeout=timeout, interval=interval)
        return True
    except TimeoutError:
        return False


def until_deadline(condition: Callable[[], bool], deadline: float, interval: float = POLL_S) -> bool:
    """Polls until `condition()` is true or the monotonic `deadline` passes; True when it became true.

    Unlike wait_until, an exception from `condition` propagates: for conditions that cannot fail (a process gone).
    """
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True
