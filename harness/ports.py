"""Port allocation and readiness polling: ports come from the OS, waits have deadlines."""
from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just handed out on `host`; for servers that cannot be told to bind port 0 themselves."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection to host:port is accepted within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    condition: Callable[[], T | None | bool],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Polls `condition` until it returns a truthy value and returns it; raises TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value  # type: ignore[return-value]
        except Exception as exc:  # noqa: BLE001 - a failing probe is "not yet"
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"{what} not met within {timeout:.1f} s{detail}")
        time.sleep(interval)


def eventually(condition: Callable[[], object], *, timeout: float, interval: float = 0.05) -> bool:
    """True as soon as `condition` is truthy, False if it is not within `timeout` seconds."""
    try:
        wait_until(condition, timeout=timeout, interval=interval)
        return True
    except TimeoutError:
        return False
