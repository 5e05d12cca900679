"""MemoryMax= and CPUQuota= through cgroup v2, as systemd applies them, when this host lets the harness do it.

The harness needs root and a cgroup v2 hierarchy with the memory and cpu controllers at /sys/fs/cgroup; where it
has them it makes a parent cgroup of its own with one child per service, and removes them on close(). Where it has
not, `probe_cgroup_v2` says why, and the supervisor reports the limits as not enforced with that reason.
"""
from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from quantlab_chaos.procgroup import KILL_WAIT_S, signal_pid
from quantlab_chaos.waiting import until_deadline

CGROUP_ROOT = Path("/sys/fs/cgroup")
MOUNTINFO = Path("/proc/self/mountinfo")
CPU_PERIOD_US = 100_000


def cgroup_settings(memory_max: int | None, cpu_quota: float | None) -> dict[str, str]:
    """The cgroup v2 files and values for MemoryMax=/CPUQuota= (memory.max bytes, cpu.max quota period)."""
    settings: dict[str, str] = {}
    if memory_max is not None:
        settings["memory.max"] = str(memory_max)
    if cpu_quota is not None:
        # systemd rounds the per-period quota up to at least 1 ms.
        settings["cpu.max"] = f"{max(1000, round(cpu_quota / 100 * CPU_PERIOD_US))} {CPU_PERIOD_US}"
    return settings


def _mounts(mountinfo: Path) -> list[tuple[str, str]]:
    """(mount point, fs type) from /proc/self/mountinfo."""
    found: list[tuple[str, str]] = []
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and right:
            found.append((fields[4].replace("\\040", " "), right.split()[0]))
    return found


def probe_cgroup_v2(root: Path = CGROUP_ROOT, mountinfo: Path = MOUNTINFO) -> tuple[bool, str]:
    """(True, "") when MemoryMax=/CPUQuota= can be enforced here, else (False, why not)."""
    if os.geteuid() != 0:
        return False, "not enforced: the harness is not running as root (cgroup limits need root)"
    mounts = _mounts(mountinfo)
    kinds = {point: kind for point, kind in mounts}
    if kinds.get(str(root)) != "cgroup2":
        elsewhere = [point for point, kind in mounts if kind == "cgroup2"]
        detail = ""
        if elsewhere:
            offered = [_read(Path(point) / "cgroup.controllers") or "none" for point in elsewhere]
            detail = "; cgroup2 is mounted at " + ", ".join(
                f"{point} (controllers: {ctl})" for point, ctl in zip(elsewhere, offered, strict=True))
        found = kinds.get(str(root), "nothing")
        return False, (f"not enforced: cgroup v2 is not mounted at {root} (found {found}: a cgroup v1 or hybrid "
                       f"host{detail}); boot with systemd.unified_cgroup_hierarchy=1 to enforce MemoryMax=/CPUQuota=")
    controllers = set((_read(root / "cgroup.controllers") or "").split())
    missing = sorted({"memory", "cpu"} - controllers)
    if missing:
        return False, (f"not enforced: the cgroup v2 controllers {', '.join(missing)} are not available at {root} "
                       f"(available: {', '.join(sorted(controllers)) or 'none'})")
    return True, ""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


class Cgroups:
    """A harness-owned parent cgroup with one child per service; removed on close()."""

    def __init__(self, root: Path = CGROUP_ROOT, mountinfo: Path = MOUNTINFO) -> None:
        self.root = root
        self.available, self.reason = probe_cgroup_v2(root, mountinfo)
        self.parent: Path | None = None
        self.children: dict[str, Path] = {}

    def _enable(self, cgroup: Path) -> None:
        """Delegates the memory and cpu controllers to `cgroup`'s children (cgroup.subtree_control)."""
        wanted = {"memory", "cpu"} - set((_read(cgroup / "cgroup.subtree_control") or "").split())
        if wanted:
            (cgroup / "cgroup.subtree_control").write_text(" ".join("+" + name for name in sorted(wanted)))

    def create(self, service: str, settings: Mapping[str, str]) -> Path:
        """Creates (or reuses) the service's cgroup with `settings`; raises OSError with the kernel's reason."""
        if self.parent is None:
            self._enable(self.root)
            parent = self.root / f"quantlab-harness-{os.getpid()}-{id(self):x}"
            parent.mkdir(exist_ok=True)
            self.parent = parent
            self._enable(parent)
        child = self.children.get(service)
        if child is None:
            child = self.parent / re.sub(r"[^A-Za-z0-9_.@-]", "_", service)
            child.mkdir(exist_ok=True)
            self.children[service] = child
        for name, value in settings.items():
            (child / name).write_text(value)
        return child

    @staticmethod
    def attach(cgroup: Path, pid: int) -> None:
        """Moves `pid` into `cgroup`; raises OSError with the kernel's reason."""
        (cgroup / "cgroup.procs").write_text(str(pid))

    @staticmethod
    def kill(cgroup: Path) -> None:
        """Kills everything left in the cgroup, including processes that escaped their process group."""
        kill_file = cgroup / "cgroup.kill"
        try:
            if kill_file.exists():
                kill_file.write_text("1")
            else:
                for pid in (_read(cgroup / "cgroup.procs") or "").split():
                    signal_pid(int(pid), signal.SIGKILL)
        except OSError:
            pass

    def close(self) -> None:
        """Kills what is left in every service's cgroup and removes them and the parent."""
        for child in list(self.children.values()):
            self.kill(child)
            _rmdir_when_empty(child)
        self.children.clear()
        if self.parent is not None:
            _rmdir_when_empty(self.parent)
            self.parent = None


def _rmdir_when_empty(cgroup: Path) -> None:
    """Removes `cgroup` once the kernel lets it (its last process may take a moment to die); gives up after
    KILL_WAIT_S rather than keep the harness from exiting."""

    def removed() -> bool:
        try:
            cgroup.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    until_deadline(removed, time.monotonic() + KILL_WAIT_S)
