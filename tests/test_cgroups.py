"""The supervisor's cgroup limits: the files systemd would write (v1 and v2), which hierarchy this host offers, groups
made under the harness's own group and removed afterwards, and, on this host, the kernel enforcing them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.sysd.cgroups import V1, V2, Cgroups, Hierarchy, Limits, probe, reads_back, writes
from harness.sysd.spec import ServiceSpec
from harness.sysd.supervisor import Supervisor
from harness.sysd.unitfile import parse_unit
from harness.sysd.values import parse_tasks_max
from harness.target import PROJECT_ROOT
from tests.supervised import PY, Units, wait_gone

HERE = probe()
ENFORCED_HERE = pytest.mark.skipif(not isinstance(HERE, Hierarchy), reason=f"cgroup limits cannot be enforced "
                                                                         f"here: {HERE}")
MB = 1024**2


# -- the values ----------------------------------------------------------------------------------------------


def test_cgroup_values_match_systemd() -> None:
    limits = Limits(memory_max=2 * 1024**3, memory_high=MB * 1536, cpu_quota=80.0, tasks_max=512)
    assert [(w.directive, w.file, w.value) for w in writes(limits, V2)] == [
        ("MemoryMax", "memory.max", "2147483648"), ("MemoryHigh", "memory.high", str(MB * 1536)),
        ("CPUQuota", "cpu.max", "80000 100000"), ("TasksMax", "pids.max", "512")]
    assert [(w.controller, w.file, w.value) for w in writes(limits, V1)] == [
        ("memory", "memory.limit_in_bytes", "2147483648"), ("memory", "memory.soft_limit_in_bytes", str(MB * 1536)),
        ("cpu", "cpu.cfs_period_us", "100000"), ("cpu", "cpu.cfs_quota_us", "80000"), ("pids", "pids.max", "512")]
    assert [w.value for w in writes(Limits(cpu_quota=200.0), V2)] == ["200000 100000"]
    assert [w.value for w in writes(Limits(cpu_quota=0.5), V1)] == ["100000", "1000"]  # at least 1 ms, as systemd
    assert writes(Limits(), V1) == [] and not Limits().requested


def test_a_byte_limit_reads_back_in_whole_pages() -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    assert reads_back("1000000", str(1000000 // page * page)) and reads_back("max", "max")
    assert not reads_back("1000000", "2000000") and not reads_back("80000 100000", "max 100000")


def test_tasks_max_takes_a_number_a_percentage_or_infinity() -> None:
    assert parse_tasks_max("4096") == 4096 and parse_tasks_max("infinity") is None
    low, high = parse_tasks_max("1%"), parse_tasks_max("100%")
    assert low is not None and high is not None and 1 <= low < high
    for bad in ("0", "-3", "lots", "0%", "150%"):
        with pytest.raises(ValueError):
            parse_tasks_max(bad)


def test_memory_high_and_tasks_max_are_honoured_directives(units: Units) -> None:
    spec = units.spec("both", "ExecStart=/bin/true\nMemoryHigh=48M\nTasksMax=64\nMemoryMax=64M\n")
    assert (spec.memory_high, spec.tasks_max, spec.memory_max) == (48 * MB, 64, 64 * MB)
    assert spec.cgroup_limits == Limits(64 * MB, 48 * MB, None, 64)
    assert not [d.key for d in spec.unhonoured_directives()]


# -- which hierarchy: fake /proc files over a fake /sys/fs/cgroup --------------------------------------------


def _fake_host(tmp_path: Path, *, v2_controllers: str, v1: bool, own_v2: str = "/", v2_procs: str = "") -> \
        tuple[Path, Path, Path]:
    """A cgroup tree in tmp_path with its mountinfo and /proc/self/cgroup, shaped like this host (v1 hierarchies,
    the harness in a nested memory group, a cgroup2 with `v2_controllers`) or like a v2 host."""
    root = tmp_path / "cg"
    mounts = [f"31 23 0:28 / {root} rw - tmpfs tmpfs rw"]
    lines = [f"0::{own_v2}"]
    unified = root if not v1 else root / "unified"
    own = unified / own_v2.strip("/")
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text(v2_controllers)
    (own / "cgroup.procs").write_text(v2_procs)
    mounts.append(f"41 31 0:38 / {unified} rw - cgroup2 cgroup2 rw")
    if v1:
        for index, name in enumerate(("cpu", "cpuacct", "memory", "pids"), start=1):
            group = "/process_api/abc" if name == "memory" else "/"
            (root / name / group.strip("/")).mkdir(parents=True, exist_ok=True)
            mounts.append(f"{31 + index} 31 0:{28 + index} / {root / name} rw - cgroup cgroup rw,{name}")
            lines.append(f"{index}:{name}:{group}")
    (tmp_path / "mountinfo").write_text("\n".join(mounts) + "\n")
    (tmp_path / "cgroup").write_text("\n".join(lines) + "\n")
    return root, tmp_path / "mountinfo", tmp_path / "cgroup"


def test_a_v1_host_uses_v1_under_the_harnesses_own_groups(tmp_path: Path) -> None:
    root, mountinfo, proc = _fake_host(tmp_path, v2_controllers="hugetlb", v1=True)
    found = probe(root, mountinfo, proc)
    assert isinstance(found, Hierarchy) and found.kind == V1, found
    assert found.own == {"memory": root / "memory/process_api/abc", "cpu": root / "cpu", "cpuacct": root / "cpuacct",
                         "pids": root / "pids"}
    assert found.describe().startswith("cgroup v1 (memory, cpu, cpuacct, pids) under")


def test_a_v2_host_uses_v2_and_a_group_with_processes_is_not_made_a_parent(tmp_path: Path) -> None:
    root, mountinfo, proc = _fake_host(tmp_path / "a", v2_controllers="cpu memory pids io", v1=False,
                                       own_v2="/harness.scope")
    found = probe(root, mountinfo, proc)
    assert isinstance(found, Hierarchy) and found.kind == V2 and found.base["memory"] == root / "harness.scope"
    root, mountinfo, proc = _fake_host(tmp_path / "b", v2_controllers="cpu memory", v1=False,
                                       own_v2="/user.slice/session-1.scope", v2_procs="123\n")
    found = probe(root, mountinfo, proc)
    assert isinstance(found, Hierarchy) and found.base == {"memory": root / "user.slice", "cpu": root / "user.slice"}


def test_a_group_mounted_from_inside_the_hierarchy_is_found(tmp_path: Path) -> None:
    """A container that bind-mounts its own subtree: /proc/self/cgroup names the full path, the mount its root."""
    point = tmp_path / "memory"
    (point / "job").mkdir(parents=True)
    (tmp_path / "cpu").mkdir()
    (tmp_path / "mountinfo").write_text(f"35 31 0:32 /docker/x {point} rw - cgroup cgroup rw,memory\n"
                                        f"32 31 0:29 / {tmp_path / 'cpu'} rw - cgroup cgroup rw,cpu\n")
    (tmp_path / "cgroup").write_text("4:memory:/docker/x/job\n1:cpu:/\n")
    found = probe(tmp_path, tmp_path / "mountinfo", tmp_path / "cgroup")
    assert isinstance(found, Hierarchy) and found.own["memory"] == point / "job"


def test_neither_hierarchy_is_reported_with_both_reasons(tmp_path: Path) -> None:
    root, mountinfo, proc = _fake_host(tmp_path, v2_controllers="hugetlb", v1=False)
    found = probe(root, mountinfo, proc)
    assert isinstance(found, str) and found.startswith("not enforced:")
    assert "cgroup v2: mounted at" in found and "without the memory, cpu controller" in found
    assert "cgroup v1: no memory, cpu hierarchy is mounted" in found


def test_not_root_and_read_only_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, mountinfo, proc = _fake_host(tmp_path, v2_controllers="hugetlb", v1=True)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    found = probe(root, mountinfo, proc)
    assert isinstance(found, str) and "is not writable (a read-only cgroup mount" in found
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert probe(root, mountinfo, proc) == "not enforced: the harness is not running as root (cgroup limits need root)"
    sup = Supervisor(tmp_path / "rt", cgroups=Cgroups(root, mountinfo, proc))
    with sup:
        sup.add("x", ServiceSpec.from_unit(parse_unit(_unit(tmp_path, "MemoryMax=64M\n"))))
        assert sup.status("x").limits.reason == sup.cgroups_summary and not sup.status("x").limits.enforced


def _unit(folder: Path, limits: str) -> Path:
    path = folder / "x.service"
    path.write_text(f"[Service]\nExecStart=/bin/sleep 30\n{limits}")
    return path


# -- the files written: a fake tree --------------------------------------------------------------------------


def test_v1_files_are_written_in_a_group_per_service_under_a_parent_per_supervisor(tmp_path: Path) -> None:
    root, mountinfo, proc = _fake_host(tmp_path, v2_controllers="hugetlb", v1=True)
    one, two = Cgroups(root, mountinfo, proc), Cgroups(root, mountinfo, proc)
    group, skipped = one.create("a@b.service", Limits(64 * MB, 48 * MB, 80.0, 100))
    assert skipped == [] and group.hierarchy == V1
    memory = group.dirs["memory"]
    assert memory.parent.parent == root / "memory/process_api/abc" and memory.name == "a@b.service"
    assert (memory / "memory.limit_in_bytes").read_text() == str(64 * MB)
    assert (memory / "memory.soft_limit_in_bytes").read_text() == str(48 * MB)
    assert (group.dirs["cpu"] / "cpu.cfs_quota_us").read_text() == "80000"
    assert (group.dirs["pids"] / "pids.max").read_text() == "100"
    assert group.dirs["cpuacct"].is_dir() and group.main == memory
    assert {d for d, _, _ in group.written} == {"MemoryMax", "MemoryHigh", "CPUQuota", "TasksMax"}
    other, _ = two.create("a@b.service", Limits(memory_max=MB))
    assert other.dirs["memory"].parent != memory.parent  # each supervisor has a parent group of its own


def test_v2_files_are_written_with_the_controllers_delegated(tmp_path: Path) -> None:
    root, mountinfo, proc = _fake_host(tmp_path, v2_controllers="cpu memory", v1=False, own_v2="/h")
    made = Cgroups(root, mountinfo, proc)
    group, skipped = made.create("svc", Limits(memory_max=64 * MB, cpu_quota=80.0, tasks_max=10))
    assert skipped == ["TasksMax"]  # this tree has no pids controller: noted by the supervisor, the rest applied
    assert set(group.dirs) == {"memory", "cpu"} and len(group.paths) == 1
    path = group.paths[0]
    assert (path / "memory.max").read_text() == str(64 * MB) and (path / "cpu.max").read_text() == "80000 100000"
    assert (root / "h" / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert (path.parent / "cgroup.subtree_control").read_text() == "+cpu +memory"


# -- on this host: the kernel enforces them -------------------------------------------------------------------


def test_limits_are_enforced_or_the_reason_is_reported(sup: Supervisor, units: Units) -> None:
    script = units.script("limits", """\
        import resource, time
        print("nofile", *resource.getrlimit(resource.RLIMIT_NOFILE), flush=True)
        print("cgroup", open("/proc/self/cgroup").read().replace("\\n", " "), flush=True)
        time.sleep(60)
    """)
    sup.add("limits", units.spec("limits", f"ExecStart={PY} {script}\nMemoryMax=64M\nCPUQuota=50%\nTasksMax=32\n"
                                           f"MemoryHigh=48M\nLimitNOFILE=1234:2345\n"),
            readiness=lambda: any("stdout: cgroup" in line for line in sup.logs("limits")))
    status = sup.start("limits", timeout=10)
    limits = status.limits
    assert (limits.memory_max, limits.cpu_quota, limits.nofile) == (64 * MB, 50.0, (1234, 2345))
    assert (limits.memory_high, limits.tasks_max) == (48 * MB, 32)
    assert limits.nofile_applied and any("stdout: nofile 1234 2345" in line for line in sup.logs("limits"))
    if not isinstance(HERE, Hierarchy):
        assert not limits.enforced and limits.reason == HERE and limits.cgroup is None
        assert HERE.startswith("not enforced:") and ("cgroup" in HERE if os.geteuid() == 0 else "root" in HERE)
        return
    assert limits.enforced and limits.hierarchy == HERE.kind and limits.cgroup, limits.reason
    assert sup.cgroups_summary.startswith(f"enforced through {HERE.kind}")
    for directive, path, value in limits.files:
        assert reads_back(value, Path(path).read_text().strip()), (directive, path)
    assert {d for d, _, _ in limits.files} == {"MemoryMax", "MemoryHigh", "CPUQuota", "TasksMax"}
    for group in limits.groups:  # in every controller's group, under the harness's own group, before exec
        assert str(status.main_pid) in (Path(group) / "cgroup.procs").read_text().split()
        assert any(str(Path(group)).startswith(str(own)) for own in HERE.base.values())
    line = next(line for line in sup.logs("limits") if "stdout: cgroup" in line)
    assert f"{Path(limits.cgroup).parent.name}/limits" in line  # the script's first look: already in its group
    sup.close()
    assert not any(Path(group).exists() for group in limits.groups)
    assert not any(Path(group).parent.exists() for group in limits.groups)


def test_no_limits_requested_is_reported_as_such(sup: Supervisor, units: Units) -> None:
    sup.add("plain", units.spec("plain", "ExecStart=/bin/sleep 30\n"))
    limits = sup.start("plain").limits
    assert not limits.enforced and "not requested" in limits.reason and sup.cgroup("plain") is None


@ENFORCED_HERE
def test_a_leak_is_oom_killed_with_systemds_result(sup: Supervisor, units: Units) -> None:
    script = units.script("leak", """\
        chunks = [b"\\x01" * (8 << 20) for _ in range(64)]
        print("not killed", flush=True)
    """)
    sup.add("leak", units.spec("leak", f"ExecStart={PY} {script}\nMemoryMax=32M\n"))
    sup.start("leak")
    status = sup.wait_for("leak", "failed", timeout=10)
    group = sup.cgroup("leak")
    assert (status.result, status.signal) == ("oom-kill", "SIGKILL"), status
    assert group is not None and (group.oom_kills() or 0) >= 1
    assert any("killed by the OOM killer" in line for line in sup.logs("leak"))
    assert not any("not killed" in line for line in sup.logs("leak"))


@ENFORCED_HERE
def test_what_escaped_the_process_group_is_killed_and_the_groups_removed(tmp_path: Path, units: Units) -> None:
    script = units.script("escape", """\
        import os, time
        if os.fork() == 0:
            os.setsid()
            print("escaped", os.getpid(), flush=True)
            time.sleep(60)
        time.sleep(60)
    """)
    with Supervisor(tmp_path / "rt") as supervisor:
        supervisor.add("escape", units.spec("escape", f"ExecStart={PY} {script}\nTasksMax=8\nCPUQuota=20%\n"))
        supervisor.start("escape")
        supervisor.wait_until("escape", lambda _s: any("escaped" in line for line in supervisor.logs("escape")), 5)
        escaped = int(next(line for line in supervisor.logs("escape") if "escaped" in line).split()[-1])
        group = supervisor.cgroup("escape")
        assert group is not None and escaped in group.pids()
        paths = group.paths
    assert wait_gone(escaped)  # it left the process group, but not the cgroup
    assert not any(path.exists() for path in paths)


@ENFORCED_HERE
def test_cpu_quota_is_accounted_in_the_groups_own_counters(sup: Supervisor, units: Units) -> None:
    script = units.script("spin", "while True:\n    pass\n")
    sup.add("spin", units.spec("spin", f"ExecStart={PY} {script}\nCPUQuota=20%\n"))
    sup.start("spin")
    group = sup.cgroup("spin")
    assert group is not None
    first, started = group.cpu_usage_s(), time.monotonic()
    time.sleep(1.5)
    last = group.cpu_usage_s()
    assert first is not None and last is not None
    rate = (last - first) / (time.monotonic() - started)
    assert 0.05 <= rate <= 0.25, rate
    assert (group.throttled() or 0) > 0


def test_limit_scenarios_are_blocked_where_cgroups_cannot_be_written(tmp_path: Path) -> None:
    """Run as if not root (geteuid faked in the test process): every scenario of the module is blocked, none passes."""
    reports = tmp_path / "reports"
    args = [str(PROJECT_ROOT / "harness/scenarios/test_safety_limits.py"), "-q", "-p", "no:cacheprovider",
            "--runbook-report", str(reports)]
    code = f"import os, sys, pytest; os.geteuid = lambda: 65534; sys.exit(pytest.main({args!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    summary = json.loads((reports / "summary.json").read_text())
    row = next(row for row in summary["items"] if row["id"] == "safety-defaults")
    outcomes = [test["outcome"] for test in row["tests"]]
    assert outcomes == ["blocked"] * 3, (outcomes, done.stdout[-2000:])
    assert "not running as root" in row["message"], row["message"]


@ENFORCED_HERE
def test_a_quota_the_spinner_cannot_reach_blocks_the_cpu_scenario_and_never_fails_it(tmp_path: Path) -> None:
    """The CPU-quota scenario judges the quota only once the spinner has been seen to reach it. Its two busy
    processes can use two CPUs at most, so under CPUQuota=500% they never do, as on a host too busy to let them:
    the scenario must end blocked, saying so, and not fail the target for a quota that held nothing."""
    runbook = tmp_path / "runbook.md"
    text = (PROJECT_ROOT / "reference" / "quantlab" / "docs" / "runbook.md").read_text()
    assert "`CPUQuota=80%`" in text, "the twin's runbook no longer sets CPUQuota=80%; update the test's edit"
    runbook.write_text(text.replace("`CPUQuota=80%`", "`CPUQuota=500%`"))
    reports = tmp_path / "reports"
    done = subprocess.run([str(Path(sys.executable).with_name("quantlab-chaos")), "run", "--only", "safety-defaults",
                           "--runbook", str(runbook), "-n", "0", "--reports", str(reports),
                           "--pytest-arg=-k", "--pytest-arg=cpu_quota_holds"],
                          capture_output=True, text=True, timeout=300)
    assert (reports / "summary.json").is_file(), done.stdout[-3000:] + done.stderr[-2000:]
    row = next(row for row in json.loads((reports / "summary.json").read_text())["items"] if row["id"] == "safety-defaults")
    tests = {test["nodeid"].rsplit("::", 1)[-1]: test for test in row["tests"]}
    verdict = tests["test_cpu_quota_holds_a_spinning_service_to_its_share"]
    assert verdict["outcome"] == "blocked", verdict
    assert "a host this busy cannot test the quota" in verdict["message"] and "CPUQuota=500%" in verdict["message"], verdict
    assert done.returncode == 1, done.stdout[-2000:]
