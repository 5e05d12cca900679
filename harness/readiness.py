"""When a booted unit counts as started, judged from outside and only on what the unit itself implies.

A unit that sets its listen port (Environment=, or a port the checkout's .quantlab-chaos.toml declares) is up when
that port answers HTTP at all: a route's 404 or a 401 is a verdict for the scenarios, not a failed start. A port the
harness only wrote into the unit's env file because services of that role usually read it is a guess: the service
is up when it answers there, or when it listens elsewhere, or when it has run for a grace period listening on
nothing (a worker that serves no HTTP). The harness never waits on a port the service does not read.

`make_probe` turns what `Supervisor.add(readiness=...)` accepts (a callable such as `ServiceReadiness`, an http(s)
URL, a TCP port, a (host, port) pair) into the probe the supervisor polls while a start is in progress.
"""
from __future__ import annotations

import functools
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

from harness.sysd.status import ServiceError
from quantlab_chaos import tls

HTTP_PROBE_TIMEOUT_S = 1.0
TCP_PROBE_TIMEOUT_S = 0.5
NO_PORT_GRACE_S = 5.0
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp

Readiness = Callable[[], bool] | str | int | tuple[str, int] | None


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process and its descendants listen on, each read in its own network namespace
    (/proc/<pid>/net/tcp is the table of that process's namespace), so it works from outside a namespace too."""
    try:
        root = psutil.Process(pid)
        pids = [root.pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return set()
    ports: set[int] = set()
    for one in pids:
        ports |= _listening_of(one)
    return ports


def _listening_of(pid: int) -> set[int]:
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                  if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
    except OSError:
        return set()
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == TCP_LISTEN and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def answers_http(port: int, path: str | None) -> bool:
    """True when 127.0.0.1:port answers an HTTP request with any status."""
    try:
        httpx.get(f"http://127.0.0.1:{port}{path or '/'}", timeout=HTTP_PROBE_TIMEOUT_S, trust_env=False,
                  verify=tls.context())
    except httpx.HTTPError:
        return False
    return True


def http_ready(url: str) -> bool:
    """True when `url` answers 2xx or 401: an observer without a token is up, it just refuses us."""
    response = httpx.get(url, timeout=HTTP_PROBE_TIMEOUT_S, trust_env=False, verify=tls.context())
    return 200 <= response.status_code < 300 or response.status_code == httpx.codes.UNAUTHORIZED


def port_ready(host: str, port: int) -> bool:
    """True when host:port accepts a TCP connection (raises OSError while it does not)."""
    with socket.create_connection((host, port), timeout=TCP_PROBE_TIMEOUT_S):
        return True


def make_probe(readiness: Readiness) -> Callable[[], bool] | None:
    """A no-argument probe for a readiness spec: callable, http(s) URL, port number or (host, port); None for None.

    The probe never raises: a probe that raises (connection refused, a timeout) means "not ready yet".
    """
    if readiness is None:
        return None
    probe: Callable[[], bool]
    if isinstance(readiness, str):
        if not readiness.startswith(("http://", "https://")):
            raise ServiceError(f"readiness {readiness!r} is not an http(s) URL. Pass a URL, a TCP port, a "
                               f"(host, port) pair or a callable returning bool.")
        probe = functools.partial(http_ready, readiness)
    elif isinstance(readiness, bool):
        raise ServiceError("readiness must be a URL, a port, a (host, port) pair or a callable, not a bool.")
    elif isinstance(readiness, int):
        probe = functools.partial(port_ready, "127.0.0.1", readiness)
    elif isinstance(readiness, tuple):
        probe = functools.partial(port_ready, readiness[0], int(readiness[1]))
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


class ServiceReadiness:
    """The supervisor's readiness probe for one unit (called repeatedly while a start is in progress)."""

    def __init__(self, main_pid: Callable[[], int | None], port: int | None, health_path: str | None, *,
                 sure: bool, grace_s: float = NO_PORT_GRACE_S) -> None:
        self.main_pid = main_pid
        self.port = port
        self.health_path = health_path
        self.sure = sure
        self.grace_s = grace_s
        self._pid: int | None = None
        self._since = time.monotonic()
        self.seen_ports: set[int] = set()

    def __call__(self) -> bool:
        pid = self.main_pid()
        if pid != self._pid:  # a new start (or restart): its grace period begins now
            self._pid, self._since = pid, time.monotonic()
        if pid is None:
            return False
        if self.port is not None and answers_http(self.port, self.health_path):
            return True
        if self.sure and self.port is not None:
            return False
        self.seen_ports = listening_ports(pid)
        if self.seen_ports:
            return True
        return time.monotonic() - self._since >= self.grace_s


# What a process prints when the checkout it runs from is not completely installed or built here: not a verdict about
# the system (production runs an installed, built checkout), but a reason the harness cannot bring the unit up.
NOT_INSTALLED = (
    # A package (a bare name), a file inside node_modules, or a native binding: not the unit's own script, whose
    # absence is a defect of the unit.
    re.compile(r"Cannot find module '(?:[^'/.][^']*|[^']*/node_modules/[^']*|[^']*\.node)'"),
    re.compile(r"Cannot find package '[^']+'"),
    re.compile(r"ModuleNotFoundError: No module named '[^']+'"),
    re.compile(r"Could not find a production build"),
    re.compile(r"was compiled against a different Node\.js version"),
)


def not_installed(lines: list[str]) -> str | None:
    """The first log line saying the checkout lacks an installed dependency or a build, else None."""
    for line in lines:
        for pattern in NOT_INSTALLED:
            if pattern.search(line):
                return " ".join(line.split())[:300]
    return None
