"""No orphans: whatever ends a run (SIGINT, SIGTERM or SIGKILL of pytest or of one xdist worker, Ctrl-C of
`quantlab-chaos run`, SIGKILL of `env up`, SIGINT to `run` or `env up` started in the background of a script), no
process the harness started survives, no port it listened on stays bound, and no env folder is left.

Each case runs tests/hygiene_scenario.py (observer and live runner from their units, a one-shot node command,
toxiproxy, moto, fake exchange) in a pytest of its own session, waits until everything is up, records every
process of the run and every port they listen on, delivers the blow, then inspects the process table and the
sockets until a deadline.
"""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from harness import reaper
from harness.readiness import listening_ports

PROJECT = Path(__file__).resolve().parents[1]
SCENARIO = PROJECT / "tests" / "hygiene_scenario.py"
CLI = str(Path(sys.executable).with_name("quantlab-chaos"))
UP_TIMEOUT_S = 60.0
GONE_TIMEOUT_S = 25.0  # xdist's own shutdown, then the reapers' SIGTERM grace and SIGKILL
WORKER_BOOT = "exec(eval(sys.stdin.readline()))"  # how execnet starts an xdist worker


@dataclass
class Run:
    """One pytest (or quantlab-chaos run) under test, and how to recognise every process that belongs to it."""

    process: subprocess.Popen[bytes]
    folder: Path
    token: str
    log: Path
    marks: tuple[str, ...] = ()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _start(tmp_path: Path, argv: list[str], extra_env: dict[str, str] | None = None) -> Run:
    folder = tmp_path / "run"
    folder.mkdir()
    token = uuid.uuid4().hex
    log = tmp_path / "output.log"
    env = {**os.environ, "QUANTLAB_HYGIENE_DIR": str(folder), "QUANTLAB_HYGIENE_RUN": token, **(extra_env or {})}
    with log.open("wb") as out:
        process = subprocess.Popen([part.replace("{basetemp}", str(folder / "bt")) for part in argv], cwd=PROJECT,
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Run(process, folder, token, log, marks=(token, str(folder), *(extra_env or {}).values()))


def pytest_run(tmp_path: Path, workers: int) -> Run:
    argv = [sys.executable, "-m", "pytest", str(SCENARIO), "-p", "no:cacheprovider", "-q", "--basetemp", "{basetemp}"]
    return _start(tmp_path, argv + (["-n", str(workers)] if workers else []))


@pytest.fixture()
def runs() -> Iterator[list[Run]]:
    """Every run a test starts; whatever the test's outcome, each is ended and released afterwards."""
    started: list[Run] = []
    yield started
    for run in started:
        (run.folder / "release").touch()
        for proc in _members(run):
            _quietly(proc.kill)
        _quietly(functools.partial(os.killpg, run.process.pid, signal.SIGKILL))
        run.process.wait(timeout=10)


def _quietly(action: Callable[[], object]) -> None:
    try:
        action()
    except (psutil.Error, OSError):
        pass


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _members(run: Run) -> list[psutil.Process]:
    """Live processes of the run: the root and its descendants, and anything whose environment, command line or
    working folder names the run (services get a clean environment, but their env points into its basetemp)."""
    found: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(run.process.pid)
        for proc in [root, *root.children(recursive=True)]:
            found[proc.pid] = proc
    except psutil.Error:
        pass
    for proc in psutil.process_iter():
        if proc.pid in found or proc.pid == os.getpid():
            continue
        try:
            text = " ".join(proc.cmdline()) + proc.cwd() + "\0".join(f"{k}={v}" for k, v in proc.environ().items())
        except psutil.Error:
            continue
        if any(mark in text for mark in run.marks):
            found[proc.pid] = proc
    return [proc for proc in found.values() if _alive(proc)]


def _listening(procs: Iterable[psutil.Process]) -> dict[int, str]:
    """port -> who, for every TCP port the processes listen on, each read in the process's own network namespace
    (each test process of a run has one)."""
    ports: dict[int, str] = {}
    for proc in procs:
        try:
            for port in listening_ports(proc.pid) if proc.is_running() else ():
                ports[port] = f"{proc.pid} {proc.name()}"
        except psutil.Error:
            continue
    return ports


def _command(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _describe(procs: Iterable[psutil.Process]) -> list[str]:
    return [f"{proc.pid} {_command(proc)[:140] or '(gone)'}" for proc in procs]


def wait_up(run: Run, ready: int, *, also: str = "") -> list[psutil.Process]:
    """Waits until `ready` scenario tests said they are up (or, with `also`, a process whose command line holds
    it runs with the run's marks); returns every process of the run."""
    deadline = time.monotonic() + UP_TIMEOUT_S
    while True:
        assert run.process.poll() is None, \
            f"the run ended before it was up (exit {run.process.returncode}):\n{run.output()}"
        members = _members(run)
        up = any(also in _command(proc) for proc in members) if also else len(list(run.folder.glob("ready-*"))) >= ready
        if up:
            return members
        assert time.monotonic() < deadline, f"the run was not up within {UP_TIMEOUT_S:.0f} s:\n{run.output()}"
        time.sleep(0.2)


def assert_all_gone(run: Run, procs: list[psutil.Process], ports: dict[int, str], what: str, *,
                    whole_run: bool = True) -> None:
    """Within the deadline: none of `procs` (nor, with `whole_run`, anything else of the run) runs, and none of
    `ports` is listened on."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while True:
        left = [proc for proc in procs if _alive(proc)]
        if whole_run:
            left += [proc for proc in _members(run) if proc.pid not in {p.pid for p in left}]
        bound = _still_bound(ports, {proc.pid for proc in procs} | {proc.pid for proc in left})
        if not left and not bound:
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: {GONE_TIMEOUT_S:.0f} s later these processes of the run still run: "
                        f"{_describe(left)}; these ports are still bound: {bound}\n{run.output()}")
        time.sleep(0.1)


def _still_bound(ports: dict[int, str], ours: set[int]) -> dict[int, str]:
    """The ports still listened on by one of ours (in its own namespace), or on the host's network by nobody we can
    name (a socket outliving its process). A namespace ends with its last process, and its sockets with it."""
    bound = {}
    for pid in ours:
        for port in listening_ports(pid) & set(ports):
            bound[port] = f"{ports[port]} (now pid {pid})"
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports and (conn.pid is None or conn.pid in ours):
            bound[conn.laddr.port] = f"{ports[conn.laddr.port]} (now pid {conn.pid})"
    return bound


def assert_whole_run_up(members: list[psutil.Process], ports: dict[int, str], workers: int) -> None:
    """The run really is mid-scenario: services, a one-shot command, toxiproxy and reapers, with ports open."""
    commands = _describe(proc for proc in members if _alive(proc))
    per_owner = max(workers, 1)
    # (The live runner may already have stopped on its own guard, so it is not counted.)
    for what, count in (("toxiproxy-server", per_owner), ("observer/index.js", per_owner),
                        ("hygiene one-shot", per_owner), ("reaper.py --serve", per_owner + (1 if workers else 0))):
        found = sum(what in command for command in commands)
        assert found >= count, f"{found} {what}, not {count}:\n" + "\n".join(commands)
    assert len(ports) >= 4 * per_owner, ports  # toxiproxy API and 2 proxies, observer, moto, fake exchange


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
@pytest.mark.parametrize("workers", [0, 2], ids=["serial", "xdist"])
def test_nothing_survives_a_signal_to_pytest(tmp_path: Path, runs: list[Run], workers: int,
                                             sig: signal.Signals) -> None:
    run = pytest_run(tmp_path, workers)
    runs.append(run)
    members = wait_up(run, ready=workers or 1)
    ports = _listening(members)
    assert_whole_run_up(members, ports, workers)
    os.kill(run.process.pid, sig)
    assert_all_gone(run, members, ports, f"after {sig.name} to pytest ({f'-n {workers}' if workers else 'serial'})")
    run.process.wait(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_signalled_xdist_worker_takes_its_services_and_only_those(tmp_path: Path, runs: list[Run],
                                                                     sig: signal.Signals) -> None:
    run = pytest_run(tmp_path, 2)
    runs.append(run)
    members = wait_up(run, ready=2)
    workers = [proc for proc in psutil.Process(run.process.pid).children() if WORKER_BOOT in _command(proc)]
    assert len(workers) == 2, _describe(members)
    victim, survivor = workers
    doomed = [victim, *victim.children(recursive=True)]
    if sig == signal.SIGINT:
        # An interrupted worker tears its services down and reports; xdist keeps the process (and so its reaper)
        # until the session ends, like the other worker.
        doomed = [proc for proc in doomed if proc.pid != victim.pid and "reaper.py" not in _command(proc)]
    spared = [proc for proc in survivor.children(recursive=True) if "node" in proc.name()]
    doomed_ports = _listening(doomed)
    assert any("node" in proc.name() for proc in doomed) and spared and doomed_ports

    victim.send_signal(sig)
    assert_all_gone(run, doomed, doomed_ports, f"after {sig.name} to one xdist worker", whole_run=False)
    assert all(_alive(proc) for proc in spared), "the other worker's services died with the signalled worker"

    ports = _listening(_members(run))
    os.kill(run.process.pid, signal.SIGTERM)
    assert_all_gone(run, _members(run), ports, "after SIGTERM to pytest, once a worker had been signalled")
    run.process.wait(timeout=10)


def test_ctrl_c_of_quantlab_chaos_run_leaves_nothing(tmp_path: Path, runs: list[Run]) -> None:
    argv = [CLI, "run", "--only", "failure:live-ws-disabled", "-n", "1", "--reports", str(tmp_path / "reports"),
            "--pytest-arg=--basetemp={basetemp}"]
    run = _start(tmp_path, argv)
    runs.append(run)
    members = wait_up(run, ready=0, also="observer/index.js")
    ports = _listening(members)
    assert ports and any("toxiproxy-server" in _command(proc) for proc in members), _describe(members)
    os.kill(run.process.pid, signal.SIGINT)
    assert run.process.wait(timeout=GONE_TIMEOUT_S) == 128 + signal.SIGINT, run.output()
    assert_all_gone(run, members, ports, "after Ctrl-C to quantlab-chaos run")
    output = run.output()
    assert "interrupted by SIGINT" in output and "Traceback (most recent call last)" not in output, output


def test_a_killed_env_up_leaves_nothing(tmp_path: Path, runs: list[Run]) -> None:
    run = _start(tmp_path, [CLI, "env", "up", "--service", "observer"])
    runs.append(run)
    members = wait_up(run, ready=0, also="observer/index.js")
    ports = _listening(members)
    assert ports and any("toxiproxy-server" in _command(proc) for proc in members), _describe(members)
    os.kill(run.process.pid, signal.SIGKILL)
    assert_all_gone(run, members, ports, "after SIGKILL to quantlab-chaos env up")
    run.process.wait(timeout=10)


# -- started the way a CI script starts a command: `cmd &` in a non-interactive shell --------------------------

# A shell without job control starts a background command with SIGINT (and SIGQUIT) ignored; `wait $!` makes the
# shell end with the command's own exit code.
IN_THE_BACKGROUND = ["sh", "-c", '"$@" & wait $!', "sh"]


def _ignores_sigint(pid: int) -> bool:
    """Whether the process ignores SIGINT now (its SigIgn mask in /proc); False once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signal.SIGINT - 1)))


def test_a_background_command_of_a_non_interactive_shell_starts_with_sigint_ignored() -> None:
    """The premise of the two tests below: without the harness putting SIGINT back, a kill -INT would do nothing."""
    done = subprocess.run([*IN_THE_BACKGROUND, "grep", "^SigIgn:", "/proc/self/status"], capture_output=True,
                          text=True, timeout=10)
    assert int(done.stdout.split()[1], 16) & (1 << (signal.SIGINT - 1)), done.stdout


def _background_run(tmp_path: Path, argv: list[str]) -> tuple[Run, Path]:
    """`argv` started as `sh -c 'argv & wait $!'`, with a temp folder of its own (where `env up` puts its folder)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    return _start(tmp_path, [*IN_THE_BACKGROUND, *argv], {"TMPDIR": str(temp)}), temp


def _interrupt_the_command(run: Run, members: list[psutil.Process]) -> None:
    """SIGINT to the command alone (the shell's child), as `kill -INT $pid` in the script would send it, once no
    process of the run (pytest, its workers, the services) still ignores SIGINT but the reapers, which must outlive
    a Ctrl-C to clean up after it."""
    deaf = [proc for proc in members if "reaper.py" not in _command(proc) and _ignores_sigint(proc.pid)]
    assert not deaf, f"these still ignore the SIGINT the shell started them with: {_describe(deaf)}"
    command = [proc for proc in psutil.Process(run.process.pid).children() if CLI in _command(proc)]
    assert len(command) == 1, _describe(members)
    command[0].send_signal(signal.SIGINT)


def test_sigint_stops_a_background_pytest_and_leaves_nothing(tmp_path: Path, runs: list[Run]) -> None:
    """pytest started directly, not by quantlab-chaos: the plugin puts SIGINT back."""
    argv = [sys.executable, "-m", "pytest", str(SCENARIO), "-p", "no:cacheprovider", "-q", "--basetemp", "{basetemp}"]
    run, _ = _background_run(tmp_path, argv)
    runs.append(run)
    members = wait_up(run, ready=1)
    ports = _listening(members)
    assert_whole_run_up(members, ports, 0)
    deaf = [proc for proc in members if "reaper.py" not in _command(proc) and _ignores_sigint(proc.pid)]
    assert not deaf, f"these still ignore the SIGINT the shell started them with: {_describe(deaf)}"
    [pytest_process] = psutil.Process(run.process.pid).children()
    pytest_process.send_signal(signal.SIGINT)
    assert_all_gone(run, members, ports, "after SIGINT to a background pytest")
    run.process.wait(timeout=10)


def test_sigint_stops_a_background_quantlab_chaos_run_and_leaves_nothing(tmp_path: Path, runs: list[Run]) -> None:
    run, temp = _background_run(tmp_path, [CLI, "run", "--only", "failure:live-ws-disabled", "-n", "1", "--reports",
                                           str(tmp_path / "reports"), "--pytest-arg=--basetemp={basetemp}"])
    runs.append(run)
    members = wait_up(run, ready=0, also="observer/index.js")
    ports = _listening(members)
    assert ports and any("toxiproxy-server" in _command(proc) for proc in members), _describe(members)
    _interrupt_the_command(run, members)
    assert run.process.wait(timeout=GONE_TIMEOUT_S) == 128 + signal.SIGINT, run.output()
    assert_all_gone(run, members, ports, "after SIGINT to a background quantlab-chaos run")
    output = run.output()
    assert "interrupted by SIGINT" in output and "Traceback (most recent call last)" not in output, output
    assert not list(temp.glob("quantlab-chaos-env-*")), sorted(str(p) for p in temp.rglob("*"))


def test_sigint_stops_a_background_env_up_and_leaves_nothing(tmp_path: Path, runs: list[Run]) -> None:
    run, temp = _background_run(tmp_path, [CLI, "env", "up", "--service", "observer"])
    runs.append(run)
    members = wait_up(run, ready=0, also="observer/index.js")
    ports = _listening(members)
    assert ports and any("toxiproxy-server" in _command(proc) for proc in members), _describe(members)
    folders = list(temp.glob("quantlab-chaos-env-*"))
    assert len(folders) == 1 and list(folders[0].glob("etc-quantlab/*.env")), sorted(temp.rglob("*"))
    _interrupt_the_command(run, members)
    assert run.process.wait(timeout=GONE_TIMEOUT_S) == 0, run.output()
    assert_all_gone(run, members, ports, "after SIGINT to a background quantlab-chaos env up")
    assert "Tearing down." in run.output() and "Traceback (most recent call last)" not in run.output(), run.output()
    # (The shared port-lock folder stays: its files are empty and other environments lock through them.)
    assert not list(temp.glob("quantlab-chaos-env-*")), \
        f"left in the temp folder (its env files hold the token and S3 keys): {sorted(map(str, temp.rglob('*')))}"


# -- the reaper on its own -------------------------------------------------------------------------------------

OWNER_SCRIPT = """\
import os, signal, subprocess, sys
from harness import reaper
registered = subprocess.Popen(["sleep", "60"], start_new_session=True)
reaper.watch(registered.pid)
marked = subprocess.Popen(["sleep", "61"], start_new_session=True, env=reaper.child_env())
stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 62 & wait"], start_new_session=True)
reaper.watch(stubborn.pid)
print(registered.pid, marked.pid, stubborn.pid, reaper.REAPER.pid, flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_reaper_ends_registered_groups_and_marked_processes_when_its_owner_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(OWNER_SCRIPT)
    owner = subprocess.Popen([sys.executable, str(script)], cwd=PROJECT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(PROJECT)}, text=True)
    try:
        assert owner.stdout is not None and owner.stdin is not None
        pids = [int(word) for word in owner.stdout.readline().split()]
        procs = [psutil.Process(pid) for pid in pids]
        procs += psutil.Process(pids[2]).children()  # the stubborn shell's own sleep
        assert all(_alive(proc) for proc in procs)
        owner.stdin.write("die\n")
        owner.stdin.flush()
        assert owner.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + reaper.GRACE_S + reaper.KILL_WAIT_S
        while any(_alive(proc) for proc in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [proc.pid for proc in procs if _alive(proc)]
    finally:
        owner.kill()
        owner.wait(timeout=5)


def test_the_reaper_leaves_forgotten_groups_and_reused_pids_alone(tmp_path: Path) -> None:
    kept = subprocess.Popen(["sleep", "30"], start_new_session=True)
    reused = subprocess.Popen(["sleep", "30"], start_new_session=True)
    ended = subprocess.Popen(["sleep", "30"], start_new_session=True)
    server = subprocess.Popen([sys.executable, "-I", "-S", reaper.__file__, "--serve", uuid.uuid4().hex],
                              stdin=subprocess.PIPE, start_new_session=True)
    try:
        assert server.stdin is not None
        lines = [f"+{kept.pid} {reaper.start_time(kept.pid)}", f"-{kept.pid}",  # registered, then forgotten
                 f"+{reused.pid} 1",  # the same pid, but another process than the one registered
                 f"+{ended.pid} {reaper.start_time(ended.pid)}"]
        server.stdin.write(("\n".join(lines) + "\n").encode())
        server.stdin.close()
        assert server.wait(timeout=reaper.GRACE_S + 2) == 0
        assert ended.wait(timeout=2) == -signal.SIGTERM
        assert kept.poll() is None and reused.poll() is None
    finally:
        for proc in (kept, reused, ended, server):
            proc.kill()
            proc.wait(timeout=5)


CANARY_ALONE = """\
import sys
from pathlib import Path
from canary import process
result = process.run_process(["sh", "-c", "echo ok"], cwd=Path("/"), env={"PATH": "/usr/bin:/bin"}, timeout=10)
assert result.code == 0 and result.stdout == "ok\\n", result
assert process.owner is None and not [name for name in sys.modules if name.startswith("harness")]
print("alone")
"""


def test_canary_commands_run_without_the_harness_and_its_reaper() -> None:
    done = subprocess.run([sys.executable, "-c", CANARY_ALONE], cwd=PROJECT, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0 and done.stdout == "alone\n", done.stdout + done.stderr


def test_the_reaper_costs_nothing_while_its_owner_lives() -> None:
    reaper.REAPER.mark  # noqa: B018 - starts it if this process has none yet
    watcher = psutil.Process(reaper.REAPER.pid)
    before = sum(watcher.cpu_times()[:2])
    time.sleep(0.5)
    assert watcher.status() == psutil.STATUS_SLEEPING
    assert sum(watcher.cpu_times()[:2]) - before < 0.01
    assert watcher.memory_info().rss < 16 * 1024 * 1024  # a bare interpreter reading a pipe
