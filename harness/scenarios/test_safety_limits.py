"""Safety Defaults (systemd + limits), proven on a service of the harness's own: what the runbook's settings are for.

The runbook has every service unit carry Restart=, RestartSec=, StartLimitIntervalSec=, StartLimitBurst=, MemoryMax=
and CPUQuota=. test_safety_defaults.py checks that the checkout's units carry them; the scenarios here show, on a
small Python service that harness.sysd.Supervisor runs from a unit written with the runbook's values, that they do
what an operator wants them for:

- a leak past MemoryMax= is killed by the kernel (SIGKILL, and the group's OOM kill count goes up), and Restart=
  brings the service back after RestartSec= (the OOM-to-restart time is measured);
- a service that keeps leaking is given up: past StartLimitBurst= starts within StartLimitIntervalSec= it stays
  failed with result start-limit-hit;
- under CPUQuota= a service spinning on two CPUs gets at most its quota, read from its group's own accounting
  (cgroup v2 cpu.stat usage_usec, cgroup v1 cpuacct.usage).

Scaled on purpose: the leak runs under MemoryMax=LEAK_MEMORY_MAX (64M), not the runbook's value (2G), so it is
killed in a fraction of a second without taking 2 GiB from the host; the kernel's mechanism is the same at any size,
and that the units carry the runbook's own value is the directive check's job. RestartSec=, StartLimit*= and
CPUQuota= are the runbook's values as written. Where the harness cannot write cgroups (not root, a read-only
hierarchy), every scenario here is blocked with the reason: none passes without the kernel enforcing the limits.
"""
from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from harness.experiment import Action, Experiment, Observation, Probe, Tolerance, holds
from harness.journal import Journal
from harness.sysd.cgroups import ServiceGroup
from harness.sysd.spec import ServiceSpec
from harness.sysd.supervisor import Supervisor
from harness.sysd.unitfile import parse_unit
from harness.sysd.values import parse_cpu_quota, parse_memory_limit, parse_timespan
from quantlab_chaos import items
from quantlab_chaos.runbook import Runbook, Setting

ITEM = items.SAFETY_DEFAULTS
LEAK_MEMORY_MAX = "64M"  # the runbook's MemoryMax= scaled down for the leak (see the module's docstring)
GROW_TO_FACTOR = 8  # the leak gives up (exit 3) at this multiple of its limit: a host that swaps instead of killing
SPINNERS = 2  # busy processes: unconfined they would use two CPUs, so the quota is what holds them
# A deadline of ours, not the runbook's, for a Python script started under its unit's CPUQuota= on a machine that
# runs many scenarios at once.
READY_DEADLINE_S = 15.0
CPU_WINDOW_S = 3.0
REACH_DEADLINE_S = 30.0  # ours: how long a busy host may take to let the spinner reach its quota
CPU_GRANULARITY = 0.10  # the kernel runs a group a little past its quota per period (bandwidth is charged per tick)
RESTART_SLACK_S = 2.0  # RestartSec= is a minimum: spawning the restarted interpreter takes a moment more
PY = f"{sys.executable} -u -S"  # -S: the scripts need only the standard library

SERVICE = """\
    import os, sys, time
    with open(os.environ["STARTS"], "a") as handle:
        handle.write(f"{time.time()} {os.getpid()}\\n")
    print("idle", os.getpid(), flush=True)
    trigger = os.environ["TRIGGER"]
    while not os.path.exists(trigger):
        time.sleep(0.02)
    if open(trigger).read().strip() == "once":
        os.remove(trigger)
    print("leaking", flush=True)
    chunks, chunk, cap = [], 8 << 20, int(os.environ["GROW_TO"])
    while len(chunks) * chunk < cap:
        chunks.append(b"\\x01" * chunk)  # written, so every page is charged to the group
    print("grew to", cap, "bytes without being killed", flush=True)
    sys.exit(3)
"""

SPINNER = """\
    import os
    for _ in range(int(os.environ["SPINNERS"]) - 1):
        if os.fork() == 0:
            break
    # one write per line: print() under -u writes each word apart, and the two processes' words would interleave
    os.write(1, f"spinning {os.getpid()}\\n".encode())
    while True:
        pass
"""


def _line(setting: Setting) -> str:
    return f" (runbook line {setting.source.line})"


def _setting(runbook: Runbook, name: str) -> Setting:
    try:
        return runbook.unit_directive(name)
    except KeyError:
        pytest.skip(f"the runbook's Safety Defaults set no {name}=")


@dataclass
class TestService:
    """The harness's own service: its unit (the runbook's values), the files it writes, and its supervisor."""

    __test__ = False  # not a pytest test class

    sup: Supervisor
    name: str
    starts: Path
    trigger: Path
    spec: ServiceSpec

    def start_records(self) -> list[tuple[float, int]]:
        """(time, pid) of every start, as the service itself wrote them."""
        if not self.starts.exists():
            return []
        return [(float(ts), int(pid)) for ts, pid in (line.split() for line in self.starts.read_text().splitlines())]

    def group(self) -> ServiceGroup | None:
        return self.sup.cgroup(self.name)

    def exits(self, text: str) -> list[float]:
        """When the supervisor's journal logged a main-process exit containing `text` (epoch seconds)."""
        return [datetime.fromisoformat(line.split(" ", 1)[0]).timestamp() for line in self.sup.logs(self.name)
                if "Main process exited" in line and text in line]


@pytest.fixture()
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    with Supervisor(tmp_path / "runtime", honour_user=False) as sup:
        yield sup


def _service(sup: Supervisor, runbook: Runbook, folder: Path, name: str, script: str, limits: str) -> TestService:
    """Writes the script and a unit carrying the runbook's restart settings and `limits`; adds it to `sup`."""
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(script))
    unit_keys = ("StartLimitIntervalSec", "StartLimitBurst")
    restart = [_setting(runbook, key) for key in ("Restart", "RestartSec")]
    starts, trigger = folder / f"{name}.starts", folder / f"{name}.trigger"
    grow_to = GROW_TO_FACTOR * (parse_memory_limit(LEAK_MEMORY_MAX) or 0)
    unit = folder / f"{name}.service"
    unit.write_text(
        f"[Unit]\nDescription=the harness's {name} service\n"
        + "".join(f"{key}={_setting(runbook, key).value}\n" for key in unit_keys)
        + f"\n[Service]\nExecStart={PY} {path}\n" + "".join(f"{s.name}={s.value}\n" for s in restart)
        + f"Environment=STARTS={starts} TRIGGER={trigger} SPINNERS={SPINNERS} GROW_TO={grow_to}\n"
        + f"{limits}TimeoutStopSec=5s\n")
    spec = ServiceSpec.from_unit(parse_unit(unit))
    sup.add(name, spec)
    return TestService(sup, name, starts, trigger, spec)


def _enforceable(sup: Supervisor) -> Probe:
    """The steady state every scenario here needs: the kernel enforces the limits, or the scenario is blocked."""
    def observe() -> Observation:
        summary = sup.cgroups_summary
        return Observation(summary.startswith("enforced"), f"cgroup limits {summary}")

    return Probe("the harness's cgroups", observe,
                 holds("the supervisor can make cgroups here (root, and a writable cgroup v2 or v1 hierarchy)"))


def _runs_confined(svc: TestService, ready_text: str, *, recheck: bool = True) -> Probe:
    """The service is active, its limits enforced in a group of its own, and its script is running."""
    def observe() -> Observation:
        status = svc.sup.status(svc.name)
        limits = status.limits
        ready = status.main_pid is not None and any(f"{ready_text} {status.main_pid}" in line
                                                    for line in svc.sup.logs(svc.name))
        return Observation(status.active and limits.enforced and ready,
                           f"{svc.name} is {status.active_state} ({status.sub_state}), main PID {status.main_pid}, "
                           f"{'its script ' + ready_text if ready else 'its script not yet ' + ready_text}; limits "
                           f"{limits.reason}", {"limits": limits.files, "groups": limits.groups,
                                                "journal": svc.sup.logs(svc.name)[-6:]})

    return Probe(f"{svc.name}'s status and journal", observe,
                 holds(f"{svc.name} runs, confined by its unit's limits"), deadline_s=READY_DEADLINE_S, recheck=recheck)


def _oom_kills(svc: TestService) -> int:
    group = svc.group()
    return (group.oom_kills() or 0) if group is not None else 0


# -- MemoryMax= and Restart= -------------------------------------------------------------------------------------


@pytest.mark.runbook(ITEM)
def test_a_leak_past_memory_max_is_killed_and_restarted_after_restart_sec(
        supervisor: Supervisor, runbook_model: Runbook, journal: Journal, tmp_path: Path) -> None:
    """The kernel kills the leak at MemoryMax= (scaled to 64M), and Restart= brings the service back after
    RestartSec=, the runbook's value as written (the OOM-to-restart seconds are measured)."""
    memory_max, restart_sec = _setting(runbook_model, "MemoryMax"), _setting(runbook_model, "RestartSec")
    restart = _setting(runbook_model, "Restart")
    svc = _service(supervisor, runbook_model, tmp_path, "leak", SERVICE, f"MemoryMax={LEAK_MEMORY_MAX}\n")
    wait_s = parse_timespan(restart_sec.value)
    journal.measure("leak_memory_max", f"{LEAK_MEMORY_MAX} (the runbook's MemoryMax={memory_max.value}, scaled down)")
    before: dict[str, int] = {}

    def leak() -> None:
        before["oom_kills"] = _oom_kills(svc)
        svc.trigger.write_text("once")

    def killed() -> Observation:
        status, kills = supervisor.status(svc.name), _oom_kills(svc)
        ended = svc.exits("status=9/KILL")
        return Observation(kills > before["oom_kills"] and bool(ended),
                           f"the group's OOM kill count went from {before['oom_kills']} to {kills}; the main process "
                           + (f"ended by SIGKILL, result {status.result}, now {status.sub_state}" if ended else
                              f"has not ended by SIGKILL ({status.active_state}, {status.sub_state})"),
                           {"oom_kills": kills, "result": status.result, "log": supervisor.logs(svc.name, lines=6)})

    def restarted() -> Observation:
        records, ended = svc.start_records(), svc.exits("status=9/KILL")
        if len(records) < 2 or not ended:
            return Observation(False, f"{len(records)} start(s) so far; {supervisor.status(svc.name).sub_state}")
        delay = records[1][0] - ended[0]
        journal.measure("oom_to_restart_s", round(delay, 3))
        ok = wait_s <= delay <= wait_s + RESTART_SLACK_S
        return Observation(ok, f"restarted as PID {records[1][1]} {delay:.2f} s after the OOM kill "
                               f"(RestartSec={restart_sec.value})", {"oom_to_restart_s": round(delay, 3)}, final=True)

    journal.note_wait(f"RestartSec={restart_sec.value}{_line(restart_sec)} before the restart", wait_s)
    journal.run(Experiment(
        f"{ITEM} (a leak past MemoryMax= is killed, then restarted)",
        setup=[_enforceable(supervisor), Action(f"start {svc.name}", lambda: supervisor.start(svc.name))],
        steady_state=[_runs_confined(svc, "idle")],
        fault=[Action(f"{svc.name} leaks past MemoryMax={LEAK_MEMORY_MAX} (memory it writes and keeps)", leak)],
        symptom=[Probe("the kernel's OOM kill count and the main process's end", killed,
                       holds(f"MemoryMax={memory_max.value} makes the kernel kill a service that grows past it "
                             f"(scaled: {LEAK_MEMORY_MAX})", memory_max.source), deadline_s=10.0),
                 Probe("the service's own start records", restarted,
                       holds(f"Restart={restart.value} restarts it {restart_sec.value} after the kill "
                             f"(RestartSec={restart_sec.value}, up to {RESTART_SLACK_S:g} s more to spawn)",
                             restart_sec.source), deadline_s=wait_s + 10.0)],
        rollbacks=[Action(f"stop {svc.name}", lambda: supervisor.stop(svc.name))],
    ))


# -- StartLimitBurst= / StartLimitIntervalSec= ---------------------------------------------------------------------


@pytest.mark.runbook(ITEM)
def test_a_service_that_keeps_leaking_is_given_up_at_the_start_limit(
        supervisor: Supervisor, runbook_model: Runbook, journal: Journal, tmp_path: Path) -> None:
    """Every start leaks and is killed; after StartLimitBurst= starts within StartLimitIntervalSec= the supervisor
    stops restarting it, as systemd does, and it stays failed with result start-limit-hit."""
    burst, interval = _setting(runbook_model, "StartLimitBurst"), _setting(runbook_model, "StartLimitIntervalSec")
    restart_sec = _setting(runbook_model, "RestartSec")
    svc = _service(supervisor, runbook_model, tmp_path, "leaker", SERVICE, f"MemoryMax={LEAK_MEMORY_MAX}\n")
    window_s, wait_s = parse_timespan(interval.value), parse_timespan(restart_sec.value)
    applied: dict[str, float] = {}

    def leak_on_every_start() -> None:
        applied["at"] = time.time()
        svc.trigger.write_text("always")

    def gave_up() -> Observation:
        status, records = supervisor.status(svc.name), svc.start_records()
        hit = status.active_state == "failed" and status.result == "start-limit-hit"
        if hit:
            journal.measure("start_limit_hit_after_s", round(time.time() - applied["at"], 1))
            journal.measure("starts_before_start_limit_hit", len(records))
        seen = (f"{status.active_state} ({status.result}) after {len(records)} start(s), {status.n_restarts} "
                f"restart(s), {_oom_kills(svc)} OOM kill(s)")
        return Observation(hit and len(records) == int(burst.value), seen, {"log": supervisor.logs(svc.name, lines=4)},
                           final=hit)

    def stays_failed() -> Observation:
        count = len(svc.start_records())
        time.sleep(wait_s + 1.0)  # longer than a restart would take to come
        status, later = supervisor.status(svc.name), len(svc.start_records())
        return Observation(status.active_state == "failed" and later == count,
                           f"{wait_s + 1:g} s later: {status.active_state} ({status.result}), {later - count} start(s) "
                           f"since", final=True)

    restarts = max(int(burst.value) - 1, 0)
    journal.note_wait(f"RestartSec={restart_sec.value}{_line(restart_sec)} before each of the {restarts} restarts that "
                      f"StartLimitBurst={burst.value}{_line(burst)} allows", restarts * wait_s)
    journal.note_wait("a deadline of ours: RestartSec= and 1 s more, watching that the service given up is not "
                      "started again", wait_s + 1.0)
    journal.run(Experiment(
        f"{ITEM} (a crash loop stops at the start limit)",
        setup=[_enforceable(supervisor), Action(f"start {svc.name}", lambda: supervisor.start(svc.name))],
        steady_state=[_runs_confined(svc, "idle", recheck=False)],  # given up, it is not running after the fault
        fault=[Action(f"{svc.name} leaks past MemoryMax={LEAK_MEMORY_MAX} on every start", leak_on_every_start)],
        symptom=[Probe(f"{svc.name}'s status and start records", gave_up,
                       holds(f"after StartLimitBurst={burst.value} starts within StartLimitIntervalSec="
                             f"{interval.value} the service is not started again: failed, result start-limit-hit",
                             burst.source), deadline_s=window_s),
                 Probe(f"{svc.name}'s start records", stays_failed,
                       holds("a service given up stays failed (no restart after RestartSec=)", interval.source))],
        rollbacks=[Action(f"stop {svc.name}", lambda: supervisor.stop(svc.name))],
    ))


# -- CPUQuota= ---------------------------------------------------------------------------------------------------------


def _cpu_use(svc: TestService, window_s: float) -> tuple[float, int, str, dict[str, Any]] | None:
    """The CPU-seconds a second the service's group used over `window_s`, its throttled periods, in words and as
    evidence; None where the group keeps no CPU accounting."""
    group = svc.group()
    first = group.cpu_usage_s() if group is not None else None
    if group is None or first is None:
        return None
    throttled, started = group.throttled() or 0, time.monotonic()
    time.sleep(window_s)
    last, took = group.cpu_usage_s() or first, time.monotonic() - started
    rate, periods = (last - first) / took, (group.throttled() or 0) - throttled
    seen = (f"{last - first:.2f} CPU-seconds in {took:.1f} s: {rate:.3f} CPU-seconds a second ({SPINNERS} busy "
            f"processes; throttled in {periods} periods)")
    return rate, periods, seen, {"cpu_seconds_per_second": round(rate, 3), "throttled_periods": periods,
                                 "hierarchy": group.hierarchy}


@pytest.mark.runbook(ITEM)
def test_cpu_quota_holds_a_spinning_service_to_its_share(supervisor: Supervisor, runbook_model: Runbook,
                                                        journal: Journal, tmp_path: Path) -> None:
    """Two busy processes under the runbook's CPUQuota= use at most the quota (CPU-seconds a second), read over
    CPU_WINDOW_S from the group's own accounting, once the host has been seen to let them reach it."""
    quota = _setting(runbook_model, "CPUQuota")
    share = parse_cpu_quota(quota.value) / 100
    svc = _service(supervisor, runbook_model, tmp_path, "spinner", SPINNER, f"CPUQuota={quota.value}\n")
    ceiling = share * (1 + CPU_GRANULARITY)
    no_accounting = Observation(None, "the service's group keeps no CPU accounting here", final=True)

    def reaches() -> Observation:
        use = _cpu_use(svc, 1.0)
        if use is None:
            return no_accounting
        rate, periods, seen, evidence = use
        return Observation(periods > 0 or rate >= share / 2, seen, evidence)

    def used() -> Observation:
        use = _cpu_use(svc, CPU_WINDOW_S)
        if use is None:
            return no_accounting
        rate, _periods, seen, evidence = use
        journal.measure("cpu_seconds_per_second", round(rate, 3))
        return Observation(rate, seen, evidence, final=True)

    journal.run(Experiment(
        f"{ITEM} (CPUQuota= holds a spinning service)",
        setup=[_enforceable(supervisor), Action(f"start {svc.name}", lambda: supervisor.start(svc.name))],
        # A busy host (many scenarios, or soak's CPU pressure) may give the spinner less than its quota; below it
        # the quota holds nothing, so the check waits until the spinner is seen to reach it (throttled, or at
        # least half its share), else the scenario is blocked by the host, not failed by the target.
        steady_state=[_runs_confined(svc, "spinning"), Probe(
            f"{svc.name}'s group CPU accounting over 1 s windows", reaches,
            holds(f"the host lets {svc.name} reach its CPUQuota={quota.value} (its group throttled, or at least "
                  f"{share / 2:g} CPU-seconds a second), so the quota is what holds it; a host this busy cannot "
                  "test the quota: run fewer scenarios at once"),
            deadline_s=REACH_DEADLINE_S, interval_s=0.05, recheck=False)],
        checks=[Probe(f"{svc.name}'s group CPU accounting over {CPU_WINDOW_S:g} s", used, Tolerance(
            f"CPUQuota={quota.value} holds a service that spins to at most {share:g} CPU-seconds a second (up to "
            f"{ceiling:.2f} for the kernel's per-tick charging)",
            lambda rate: isinstance(rate, float) and rate <= ceiling, quota.source))],
        rollbacks=[Action(f"stop {svc.name}", lambda: supervisor.stop(svc.name))],
    ))
