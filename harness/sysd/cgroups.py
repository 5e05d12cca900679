"""MemoryMax=, MemoryHigh=, CPUQuota= and TasksMax= through cgroups, as systemd applies them, when this host lets the
harness do it: through cgroup v2 where it is mounted with the memory and cpu controllers, else through the cgroup v1
hierarchies (memory, cpu, cpuacct, pids).

The harness needs root and a writable hierarchy. It makes its groups under its own group of each controller (read
from /proc/self/cgroup), not at the controller's root, so the services stay inside whatever confines the harness: one
parent group per Supervisor, one child per service, removed on close() after what is left in them is killed.
`probe` says which hierarchy is used, or why none can be; the supervisor reports that in `status().limits`.

| directive   | cgroup v2      | cgroup v1                               |
| ----------- | -------------- | --------------------------------------- |
| MemoryMax=  | memory.max     | memory.limit_in_bytes                   |
| MemoryHigh= | memory.high    | memory.soft_limit_in_bytes              |
| CPUQuota=   | cpu.max        | cpu.cfs_period_us and cpu.cfs_quota_us  |
| TasksMax=   | pids.max       | pids.max                                |

(systemd itself has no MemoryHigh= on v1; the soft limit is the nearest v1 knob: reclaim pressure above it.)
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from quantlab_chaos.procgroup import KILL_WAIT_S, signal_pid
from quantlab_chaos.waiting import until_deadline

CGROUP_ROOT = Path("/sys/fs/cgroup")
MOUNTINFO = Path("/proc/self/mountinfo")
PROC_CGROUP = Path("/proc/self/cgroup")
CPU_PERIOD_US = 100_000
V1, V2 = "cgroup v1", "cgroup v2"
REQUIRED = ("memory", "cpu")  # without these a hierarchy is not used at all
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")  # cpuacct: the accounting a CPU figure is read from
V2_CONTROLLERS = ("memory", "cpu", "pids")
CONTROLLER_OF = {"MemoryMax": "memory", "MemoryHigh": "memory", "CPUQuota": "cpu", "TasksMax": "pids"}


@dataclass(frozen=True)
class Limits:
    """The cgroup limits of one service as systemd reads them from its unit (None: not set, or infinity)."""

    memory_max: int | None = None
    memory_high: int | None = None
    cpu_quota: float | None = None  # percent of one CPU
    tasks_max: int | None = None

    @property
    def requested(self) -> bool:
        """Whether the unit asks for any cgroup limit."""
        return any(value is not None for value in (self.memory_max, self.memory_high, self.cpu_quota, self.tasks_max))


@dataclass(frozen=True)
class Write:
    """One cgroup file the supervisor writes for a directive."""

    directive: str
    controller: str
    file: str
    value: str


def quota_us(cpu_quota: float) -> int:
    """The per-period quota of CPUQuota= in microseconds; systemd rounds it up to at least 1 ms."""
    return max(1000, round(cpu_quota / 100 * CPU_PERIOD_US))


def writes(limits: Limits, hierarchy: str) -> list[Write]:
    """The files and values for `limits` in `hierarchy` (V1 or V2), in the order they are written."""
    v2 = hierarchy == V2
    found: list[Write] = []
    if limits.memory_max is not None:
        found.append(Write("MemoryMax", "memory", "memory.max" if v2 else "memory.limit_in_bytes",
                           str(limits.memory_max)))
    if limits.memory_high is not None:
        found.append(Write("MemoryHigh", "memory", "memory.high" if v2 else "memory.soft_limit_in_bytes",
                           str(limits.memory_high)))
    if limits.cpu_quota is not None:
        quota = quota_us(limits.cpu_quota)
        if v2:
            found.append(Write("CPUQuota", "cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}"))
        else:  # the period first: a quota is judged against the period in force
            found += [Write("CPUQuota", "cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)),
                      Write("CPUQuota", "cpu", "cpu.cfs_quota_us", str(quota))]
    if limits.tasks_max is not None:
        found.append(Write("TasksMax", "pids", "pids.max", str(limits.tasks_max)))
    return found


def cgroup_settings(memory_max: int | None, cpu_quota: float | None) -> dict[str, str]:
    """The cgroup v2 files and values for MemoryMax=/CPUQuota= (memory.max bytes, cpu.max quota period)."""
    return {w.file: w.value for w in writes(Limits(memory_max=memory_max, cpu_quota=cpu_quota), V2)}


def reads_back(written: str, read: str) -> bool:
    """Whether a cgroup file read back holds what was written: the kernel keeps byte limits in whole pages."""
    if written == read:
        return True
    if written.isdigit() and read.isdigit():
        page = os.sysconf("SC_PAGE_SIZE")
        return int(read) == int(written) // page * page
    return False


# ---------------------------------------------------------------------------------------------
# Finding the hierarchy
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mount:
    """One cgroup mount: the path inside the hierarchy that is mounted, where, its type and (v1) its controllers."""

    root: str
    point: Path
    kind: str
    controllers: frozenset[str]


@dataclass(frozen=True)
class Hierarchy:
    """The hierarchy the supervisor uses: per controller, the harness's own group and where its parent group goes
    (the own group; under v2 the own group's parent when the own group holds processes and so cannot delegate)."""

    kind: str
    own: Mapping[str, Path]
    base: Mapping[str, Path]

    def describe(self) -> str:
        """e.g. `cgroup v1 (memory, cpu, cpuacct, pids) under /sys/fs/cgroup/memory/x, ...`."""
        places = ", ".join(str(path) for path in dict.fromkeys(self.base.values()))
        return f"{self.kind} ({', '.join(self.base)}) under {places}"


def mounts(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """The cgroup and cgroup2 mounts in /proc/self/mountinfo."""
    found: list[Mount] = []
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 1 or rest[0] not in ("cgroup", "cgroup2"):
            continue
        options = set(rest[2].split(",")) if len(rest) > 2 else set()
        found.append(Mount(fields[3].replace("\\040", " "), Path(fields[4].replace("\\040", " ")), rest[0],
                           frozenset(options & set(V1_CONTROLLERS)) if rest[0] == "cgroup" else frozenset()))
    return found


def own_groups(proc_cgroup: Path = PROC_CGROUP) -> dict[str, str]:
    """The harness process's group per v1 controller, and its v2 group under the key ""."""
    groups: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return groups
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                groups[controller] = parts[2]
    return groups


def _inside(mount: Mount, path: str) -> Path | None:
    """Where the group `path` (as /proc/self/cgroup names it) is under `mount`, or None when it is not visible."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None
    relative = path[len(root):].strip("/")
    return mount.point / relative if relative else mount.point


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _writable(path: Path) -> str:
    """"" when the harness may make groups in `path`, else why not."""
    if not path.is_dir():
        return f"{path} does not exist (a cgroup namespace the harness does not see into)"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable (a read-only cgroup mount, or one this user may not change)"
    return ""


def _probe_v2(root: Path, found: list[Mount], own: Mapping[str, str]) -> Hierarchy | str:
    unified = sorted((m for m in found if m.kind == "cgroup2"), key=lambda m: m.point != root)
    if not unified:
        return "not mounted"
    mount = unified[0]
    here = _inside(mount, own.get("", "/"))
    if here is None:
        return f"the harness's group {own.get('')} is not under {mount.point}"
    available = set((_read(here / "cgroup.controllers") or "").split())
    missing = [name for name in REQUIRED if name not in available]
    if missing:
        return (f"mounted at {mount.point} without the {', '.join(missing)} controller(s) for the harness's group "
                f"{here} (available: {', '.join(sorted(available)) or 'none'})")
    # A group with processes cannot give controllers to children (no internal processes); its parent already does.
    holds_processes = bool((_read(here / "cgroup.procs") or "").split())
    base = here.parent if here != mount.point and holds_processes else here
    why = _writable(base)
    if why:
        return why
    controllers = [name for name in V2_CONTROLLERS if name in available]
    return Hierarchy(V2, {name: here for name in controllers}, {name: base for name in controllers})


def _probe_v1(found: list[Mount], own: Mapping[str, str]) -> Hierarchy | str:
    by_controller = {name: m for m in found if m.kind == "cgroup" for name in sorted(m.controllers)}
    missing = [name for name in REQUIRED if name not in by_controller]
    if missing:
        return f"no {', '.join(missing)} hierarchy is mounted"
    own_dirs: dict[str, Path] = {}
    for name in V1_CONTROLLERS:
        mount = by_controller.get(name)
        here = _inside(mount, own.get(name, "/")) if mount is not None else None
        if here is None or _writable(here):
            if name in REQUIRED:
                return _writable(here) if here is not None else f"the harness's {name} group is not visible"
            continue  # cpuacct and pids are used where they are there
        own_dirs[name] = here
    return Hierarchy(V1, own_dirs, dict(own_dirs))


def probe(root: Path = CGROUP_ROOT, mountinfo: Path = MOUNTINFO, proc_cgroup: Path = PROC_CGROUP) -> Hierarchy | str:
    """The hierarchy to use (cgroup v2 first, then v1), or why none can be, starting with `not enforced:`."""
    if os.geteuid() != 0:
        return "not enforced: the harness is not running as root (cgroup limits need root)"
    found, own = mounts(mountinfo), own_groups(proc_cgroup)
    v2 = _probe_v2(root, found, own)
    if isinstance(v2, Hierarchy):
        return v2
    v1 = _probe_v1(found, own)
    if isinstance(v1, Hierarchy):
        return v1
    return (f"not enforced: no cgroup hierarchy can be used here (cgroup v2: {v2}; cgroup v1: {v1}); run the harness "
            f"where cgroup v2 offers the memory and cpu controllers, or the v1 memory and cpu hierarchies are mounted "
            f"read-write")


def probe_cgroup_v2(root: Path = CGROUP_ROOT, mountinfo: Path = MOUNTINFO) -> tuple[bool, str]:
    """(True, "") when the limits can be enforced here (through either hierarchy), else (False, why not)."""
    found = probe(root, mountinfo)
    return (True, "") if isinstance(found, Hierarchy) else (False, found)


# ---------------------------------------------------------------------------------------------
# One service's group
# ---------------------------------------------------------------------------------------------

@dataclass
class ServiceGroup:
    """One service's group: a directory per controller (under v2 one directory for all), and what was written."""

    hierarchy: str
    dirs: dict[str, Path]
    written: list[tuple[str, Path, str]] = field(default_factory=list)  # (directive, file, value)

    @property
    def paths(self) -> list[Path]:
        """Each directory once."""
        return list(dict.fromkeys(self.dirs.values()))

    @property
    def main(self) -> Path:
        """The directory to name in a status: the memory controller's."""
        return self.dirs.get("memory") or self.paths[0]

    def attach(self, pid: int) -> None:
        """Moves `pid` into the group (every controller); raises OSError with the kernel's reason."""
        for path in self.paths:
            (path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> set[int]:
        """The processes in the group, in any of its directories."""
        return {int(pid) for path in self.paths for pid in (_read(path / "cgroup.procs") or "").split()}

    def kill(self) -> None:
        """Kills everything left in the group, also what escaped its process group or forked meanwhile."""
        for path in self.paths:
            kill_file = path / "cgroup.kill"
            if self.hierarchy == V2 and kill_file.exists():
                try:
                    kill_file.write_text("1")
                except OSError:
                    pass

        def emptied() -> bool:
            left = self.pids()
            for pid in left:
                signal_pid(pid, signal.SIGKILL)
            return not left

        until_deadline(emptied, time.monotonic() + KILL_WAIT_S)

    def cpu_usage_s(self) -> float | None:
        """CPU time the group used so far (v2 cpu.stat usage_usec, v1 cpuacct.usage), or None when not accounted."""
        if self.hierarchy == V2:
            usage = self.stat("cpu", "cpu.stat", "usage_usec")
            return usage / 1e6 if usage is not None else None
        path = self.dirs.get("cpuacct")
        text = _read(path / "cpuacct.usage") if path is not None else None
        return int(text) / 1e9 if text and text.isdigit() else None

    def oom_kills(self) -> int | None:
        """How often the kernel's OOM killer killed a process in the group (v2 memory.events, v1 memory.oom_control)."""
        return self.stat("memory", "memory.events" if self.hierarchy == V2 else "memory.oom_control", "oom_kill")

    def throttled(self) -> int | None:
        """How many CPU periods the group was throttled in (cpu.stat nr_throttled, both hierarchies)."""
        return self.stat("cpu", "cpu.stat", "nr_throttled")

    def stat(self, controller: str, name: str, key: str) -> int | None:
        """One `key value` line of a flat-keyed cgroup file."""
        path = self.dirs.get(controller)
        text = _read(path / name) if path is not None else None
        for line in (text or "").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
                return int(parts[1])
        return None


class Cgroups:
    """A harness-owned parent group per controller with one child per service; removed on close()."""

    def __init__(self, root: Path = CGROUP_ROOT, mountinfo: Path = MOUNTINFO, proc_cgroup: Path = PROC_CGROUP,
                 hierarchy: Hierarchy | None = None) -> None:
        found = hierarchy if hierarchy is not None else probe(root, mountinfo, proc_cgroup)
        self.hierarchy = found if isinstance(found, Hierarchy) else None
        self.reason = "" if isinstance(found, Hierarchy) else found
        self.parents: dict[str, Path] = {}
        self.groups: dict[str, ServiceGroup] = {}
        self.lock = threading.Lock()

    @property
    def available(self) -> bool:
        """Whether limits can be enforced here."""
        return self.hierarchy is not None

    @property
    def kind(self) -> str | None:
        """V1 or V2, or None."""
        return self.hierarchy.kind if self.hierarchy is not None else None

    def describe(self) -> str:
        """One line for a run's header: which hierarchy enforces the limits, or why nothing does."""
        if self.hierarchy is None:
            return self.reason
        return f"enforced through {self.hierarchy.describe()}"

    def _parent(self, controller: str) -> Path:
        assert self.hierarchy is not None
        parent = self.parents.get(controller)
        if parent is None:
            base = self.hierarchy.base[controller]
            if self.kind == V2:
                _enable(base, self.hierarchy.base)
            parent = base / f"quantlab-harness-{os.getpid()}-{id(self):x}"
            parent.mkdir(exist_ok=True)
            if self.kind == V2:
                _enable(parent, self.hierarchy.base)
            self.parents[controller] = parent
        return parent

    def create(self, service: str, limits: Limits) -> tuple[ServiceGroup, list[str]]:
        """The service's group (made once) with `limits` written; also the directives this host has no controller
        for (not applied). Raises OSError with the kernel's reason."""
        if self.hierarchy is None:
            raise OSError(self.reason)
        with self.lock:
            group = self.groups.get(service)
            if group is None:
                name = re.sub(r"[^A-Za-z0-9_.@-]", "_", service)
                dirs = {}
                for controller in self.hierarchy.base:
                    dirs[controller] = self._parent(controller) / name
                    dirs[controller].mkdir(exist_ok=True)
                group = self.groups[service] = ServiceGroup(self.hierarchy.kind, dirs)
        group.written.clear()
        skipped: list[str] = []
        for item in writes(limits, self.hierarchy.kind):
            path = group.dirs.get(item.controller)
            if path is None:
                skipped.append(item.directive)
                continue
            (path / item.file).write_text(item.value)
            group.written.append((item.directive, path / item.file, item.value))
        return group, sorted(set(skipped))

    def close(self) -> None:
        """Kills what is left in every service's group and removes the groups and the parents."""
        with self.lock:
            groups, self.groups = list(self.groups.values()), {}
            parents, self.parents = list(dict.fromkeys(self.parents.values())), {}
        for group in groups:
            group.kill()
            for path in group.paths:
                _rmdir_when_empty(path)
        for parent in parents:
            _rmdir_when_empty(parent)


def _enable(cgroup: Path, wanted: Mapping[str, Path]) -> None:
    """Delegates the controllers in `wanted` to `cgroup`'s children (cgroup v2 cgroup.subtree_control)."""
    missing = set(wanted) - set((_read(cgroup / "cgroup.subtree_control") or "").split())
    if missing:
        (cgroup / "cgroup.subtree_control").write_text(" ".join("+" + name for name in sorted(missing)))


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
