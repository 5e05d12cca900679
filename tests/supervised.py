"""What the supervisor tests share: scripts and unit files written into a test's folder, and waits on processes.

The `units` and `sup` fixtures that hand these out are in tests/conftest.py.
"""
from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import psutil

from harness.sysd.spec import ServiceSpec
from harness.sysd.unitfile import parse_unit
from quantlab_chaos.waiting import until_deadline, wait_until

PY = f"{sys.executable} -u -S"  # -S: the scripts need only the standard library, and start faster


def gone(pid: int) -> bool:
    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return True
    return bool(status == psutil.STATUS_ZOMBIE)  # psutil may be untyped: the comparison is then Any


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    return until_deadline(lambda: gone(pid), time.monotonic() + timeout, interval=0.02)


def read_when_present(path: Path, timeout: float = 5.0, lines: int = 1) -> list[str]:
    def content() -> list[str] | None:
        found = path.read_text().splitlines() if path.exists() else []
        return found if len(found) >= lines else None

    try:
        return wait_until(content, timeout=timeout, interval=0.02, what=f"{path} with {lines} line(s)")
    except TimeoutError:
        raise AssertionError(f"{path} did not get {lines} line(s) within {timeout} s") from None


class Units:
    """Writes scripts and unit files into a test's tmp_path."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def script(self, name: str, code: str) -> Path:
        path = self.root / f"{name}.py"
        path.write_text(textwrap.dedent(code))
        return path

    def spec(self, name: str, service: str, unit_section: str = "") -> ServiceSpec:
        path = self.root / f"{name}.service"
        text = f"[Unit]\nDescription={name}\n{textwrap.dedent(unit_section)}\n[Service]\n{textwrap.dedent(service)}"
        path.write_text(text)
        return ServiceSpec.from_unit(parse_unit(path))
