"""When a booted unit counts as started, judged from outside and only on what the unit itself implies.

A unit that sets its listen port (Environment=, or a port the checkout's .quantlab-chaos.toml declares) is up when
that port answers HTTP at all: a route's 404 or a 401 is a verdict for the scenarios, not a failed start. A port the
harness only wrote into the unit's env file because services of that role usually read it is a guess: the service
is up when it answers there, or when it listens elsewhere, or when it has run for a grace period listening on
nothing (a worker that serves no HTTP). The harness never waits on a port the service does not read.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from collections.abc import Callable

import httpx
import psutil

HTTP_PROBE_TIMEOUT_S = 1.0
NO_PORT_GRACE_S = 5.0
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp


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
        httpx.get(f"http://127.0.0.1:{port}{path or '/'}", timeout=HTTP_PROBE_TIMEOUT_S, trust_env=False)
    except httpx.HTTPError:
        return False
    return True


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
