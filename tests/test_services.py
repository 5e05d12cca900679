"""The supervisor boots real processes from unit files and behaves like systemd doing it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from harness.ports import free_port
from harness.sysd.deploy import load_service
from harness.sysd.status import ServiceError, ServiceFailed, ServiceStatus, StartLimit, describe_exit, should_restart
from harness.sysd.supervisor import Supervisor
from harness.sysd.values import ExitStatusSet
from quantlab_chaos.envfile import write_env_file
from tests.supervised import PY, Units, gone, read_when_present, wait_gone

PROJECT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-token-value"


SLEEPER = """\
    import os, sys, time
    print("started", os.getpid(), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    time.sleep(60)
"""

RUN_COUNTER = """\
    import os, sys, time
    runs = os.environ["RUNS"]
    with open(runs, "a") as handle:
        handle.write(f"{time.time()}\\n")
    count = len(open(runs).read().splitlines())
    print("run", count, flush=True)
    if count <= int(os.environ.get("FAIL_RUNS", "1")) and not os.path.exists(os.environ.get("OK_FLAG", "/nonexistent")):
        sys.exit(int(os.environ.get("EXIT_CODE", "1")))
    time.sleep(60)
"""


# -- start, status, logs, stop ----------------------------------------------------------------

def test_start_status_logs_and_stop(sup: Supervisor, units: Units) -> None:
    script = units.script("sleeper", SLEEPER)
    sup.add("sleeper", units.spec("sleeper", f"ExecStart={PY} {script}\nTimeoutStopSec=5\n"))
    assert sup.status("sleeper").active_state == "inactive"
    started = sup.start("sleeper")
    assert (started.active_state, started.sub_state, started.result) == ("active", "running", "success")
    assert started.main_pid and psutil.pid_exists(started.main_pid) and sup.is_active("sleeper")
    sup.wait_until("sleeper", lambda _s: any("to stderr" in line for line in sup.logs("sleeper")), 5, what="output")
    lines = sup.logs("sleeper")
    assert any(f"sleeper[{started.main_pid}] stdout: started {started.main_pid}" in line for line in lines)
    assert any(f"sleeper[{started.main_pid}] stderr: to stderr" in line for line in lines)
    assert len(sup.logs("sleeper", lines=1)) == 1
    assert sup.logs("sleeper", since=time.time() + 60) == []
    stopped = sup.stop("sleeper")
    assert (stopped.active_state, stopped.sub_state, stopped.result) == ("inactive", "dead", "success")
    assert stopped.main_pid is None and stopped.signal == "SIGTERM"
    assert wait_gone(started.main_pid)
    journal = sup.log_path("sleeper").read_text()
    assert "stdout: started" in journal and "Stopped sleeper." in journal


def test_unknown_service_and_duplicate_names_say_what_to_do(sup: Supervisor, units: Units) -> None:
    with pytest.raises(ServiceError, match="Add it with Supervisor.add"):
        sup.status("nope")
    spec = units.spec("x", "ExecStart=/bin/true\n")
    sup.add("x", spec)
    with pytest.raises(ServiceError, match="already added"):
        sup.add("x", spec)


def test_environment_is_built_like_systemd_and_secrets_never_logged(sup: Supervisor, units: Units,
                                                                   tmp_path: Path) -> None:
    (tmp_path / "svc.env").write_text(f"FROM_FILE=file\nSHARED=file\nOBSERVER_TOKEN={SECRET}\n")
    script = units.script("env", """\
        import json, os
        keys = ["BASE", "SHARED", "FROM_UNIT", "FROM_FILE", "ON_TOP", "OBSERVER_TOKEN", "PATH", "HOME", "LANG"]
        print(json.dumps({k: os.environ.get(k) for k in keys}), flush=True)
        print("cwd", os.getcwd(), flush=True)
        print("token is", os.environ["OBSERVER_TOKEN"], flush=True)
    """)
    spec = units.spec("env", f"""\
        Type=oneshot
        ExecStart={PY} {script}
        WorkingDirectory={tmp_path}
        Environment=BASE=unit "SHARED=unit value" FROM_UNIT=unit
        EnvironmentFile={tmp_path}/svc.env
        EnvironmentFile=-{tmp_path}/optional-missing.env
        """)
    sup.add("env", spec, extra_env={"BASE": "base", "LEAK": "no"}, override_env={"ON_TOP": "harness"})
    sup.start("env", timeout=10)
    lines = sup.logs("env")
    seen = json.loads(next(line.split("stdout: ", 1)[1] for line in lines if "stdout: {" in line))
    assert seen["BASE"] == "unit" and seen["SHARED"] == "file" and seen["FROM_UNIT"] == "unit"
    assert seen["FROM_FILE"] == "file" and seen["ON_TOP"] == "harness" and seen["OBSERVER_TOKEN"] == "***"
    assert seen["PATH"] and seen["HOME"] and seen["LANG"]
    assert any(f"stdout: cwd {tmp_path}" in line for line in lines)
    assert any("stdout: token is ***" in line for line in lines)
    everything = "\n".join(lines) + sup.log_path("env").read_text() + str(sup.status("env"))
    assert SECRET not in everything
    assert sup.environment("env")["OBSERVER_TOKEN"] == "***"
    assert "LEAK" in sup.environment("env")  # extra_env is passed; only os.environ is not inherited


def test_missing_environment_file_fails_the_start_clearly(sup: Supervisor, units: Units, tmp_path: Path) -> None:
    sup.add("noenv", units.spec("noenv", f"ExecStart=/bin/sleep 30\nEnvironmentFile={tmp_path}/absent.env\n"))
    with pytest.raises(ServiceFailed, match="absent.env does not exist"):
        sup.start("noenv")
    status = sup.status("noenv")
    assert (status.active_state, status.result) == ("failed", "resources")


def test_missing_executable_is_203_exec(sup: Supervisor, units: Units) -> None:
    sup.add("noexec", units.spec("noexec", "ExecStart=/nonexistent/quantlab-binary --flag\n"))
    status = sup.start("noexec", check=False)
    assert (status.active_state, status.result, status.exit_code) == ("failed", "exit-code", 203)
    assert "203/EXEC" in status.message


def test_user_that_does_not_exist_is_ignored_and_reported(sup: Supervisor, units: Units) -> None:
    sup.add("user", units.spec("user", "ExecStart=/bin/sleep 30\nUser=quantlab-no-such-user\nProtectSystem=full\n"))
    sup.start("user")
    notes = "\n".join(sup.status("user").notes)
    assert "User=quantlab-no-such-user ignored" in notes
    assert "ProtectSystem=full" in notes and "not applied" in notes


def test_exec_start_pre_failure_fails_and_dash_prefix_ignores_it(sup: Supervisor, units: Units) -> None:
    sup.add("pre", units.spec("pre", "ExecStartPre=/bin/false\nExecStart=/bin/sleep 30\n"))
    with pytest.raises(ServiceFailed):
        sup.start("pre")
    assert (sup.status("pre").result, sup.status("pre").exit_code) == ("exit-code", 1)
    sup.add("pre-ok", units.spec("pre-ok", "ExecStartPre=-/bin/false\nExecStart=/bin/sleep 30\n"))
    assert sup.start("pre-ok").active


def test_exec_stop_runs_with_mainpid(sup: Supervisor, units: Units, tmp_path: Path) -> None:
    marker = tmp_path / "mainpid"
    sup.add("stopper", units.spec("stopper", f"ExecStart=/bin/sleep 30\n"
                                             f"ExecStop=/bin/sh -c 'echo $MAINPID > {marker}; kill $MAINPID'\n"))
    pid = sup.start("stopper").main_pid
    assert sup.stop("stopper").result == "success"
    assert marker.read_text().strip() == str(pid)


def test_standard_output_append_file_gets_the_output_too(sup: Supervisor, units: Units, tmp_path: Path) -> None:
    server_log = tmp_path / "server.log"
    server_log.write_text("earlier line\n")
    script = units.script("talk", """\
        import os, sys
        print("hello file", flush=True)
        print("token", os.environ["OBSERVER_TOKEN"], file=sys.stderr, flush=True)
    """)
    sup.add("talk", units.spec("talk", f"Type=oneshot\nExecStart={PY} {script}\nStandardOutput=append:{server_log}\n"),
            override_env={"OBSERVER_TOKEN": SECRET})
    sup.start("talk", timeout=10)
    lines = server_log.read_text().splitlines()
    # stdout and stderr are two pipes here, so their relative order is not kept; each line is, redacted.
    assert lines[0] == "earlier line" and sorted(lines[1:]) == ["hello file", "token ***"]
    assert any("stdout: hello file" in line for line in sup.logs("talk"))


# -- oneshot ----------------------------------------------------------------------------------

def test_oneshot_runs_every_exec_start_to_completion(sup: Supervisor, units: Units, tmp_path: Path) -> None:
    done = tmp_path / "done"
    sup.add("compact", units.spec("compact", f"""\
        Type=oneshot
        ExecStart=-/bin/false
        ExecStart=/bin/sh -c 'sleep 0.2; echo first > {done}'
        ExecStart=/bin/sh -c 'echo second >> {done}'
        """))
    status = sup.start("compact", timeout=10)
    assert done.read_text().split() == ["first", "second"]
    assert (status.active_state, status.sub_state, status.result, status.exit_code) == (
        "inactive", "dead", "success", 0)
    assert any("Finished compact." in line for line in sup.logs("compact"))


def test_oneshot_failure_and_remain_after_exit(sup: Supervisor, units: Units) -> None:
    sup.add("bad", units.spec("bad", "Type=oneshot\nExecStart=/bin/sh -c 'echo nope; exit 3'\n"))
    with pytest.raises(ServiceFailed, match="exit-code"):
        sup.start("bad", timeout=10)
    status = sup.status("bad")
    assert (status.active_state, status.result, status.exit_code) == ("failed", "exit-code", 3)
    sup.add("stays", units.spec("stays", "Type=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n"))
    assert (sup.start("stays").active_state, sup.status("stays").sub_state) == ("active", "exited")
    assert sup.stop("stays").active_state == "inactive"


# -- restarts and the start limit -------------------------------------------------------------

def test_restart_on_failure_restarts_a_crash_after_restart_sec(sup: Supervisor, units: Units, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    script = units.script("crash-once", RUN_COUNTER)
    sup.add("crashy", units.spec("crashy", f"ExecStart={PY} {script}\nRestart=on-failure\nRestartSec=300ms\n"),
            extra_env={"RUNS": str(runs)})
    sup.start("crashy", check=False)
    status = sup.wait_until("crashy", lambda s: s.active and s.n_restarts == 1 and s.main_pid is not None, 10,
                            what="active after one restart")
    first, second = (float(stamp) for stamp in read_when_present(runs, lines=2))
    assert second - first >= 0.3
    assert status.exit_code == 1  # the crash that caused the restart
    assert any("Scheduled restart job, restart counter is at 1." in line for line in sup.logs("crashy"))


@pytest.mark.parametrize(("policy", "restarts"), [("on-failure", False), ("always", True), ("on-success", True)])
def test_clean_exit_restarts_only_under_always_and_on_success(sup: Supervisor, units: Units, tmp_path: Path,
                                                              policy: str, restarts: bool) -> None:
    runs = tmp_path / "runs"
    script = units.script("exit0", RUN_COUNTER)
    sup.add("clean", units.spec("clean", f"ExecStart={PY} {script}\nRestart={policy}\nRestartSec=100ms\n"),
            extra_env={"RUNS": str(runs), "EXIT_CODE": "0"})
    sup.start("clean", check=False)
    if restarts:
        status = sup.wait_until("clean", lambda s: s.active and s.n_restarts == 1, 10, what="restarted")
    else:
        status = sup.wait_for("clean", "inactive", 10)
        assert (status.sub_state, status.result, status.n_restarts) == ("dead", "success", 0)
    assert status.exit_code == 0


def test_restart_prevent_exit_status_keeps_a_listed_exit_down(sup: Supervisor, units: Units, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    script = units.script("config-error", RUN_COUNTER)
    sup.add("prevented", units.spec("prevented", f"ExecStart={PY} {script}\nRestart=on-failure\nRestartSec=50ms\n"
                                                 f"RestartPreventExitStatus=3\n"),
            extra_env={"RUNS": str(runs), "EXIT_CODE": "3"})
    sup.start("prevented", check=False)
    status = sup.wait_for("prevented", "failed", 10)
    assert (status.result, status.exit_code, status.n_restarts) == ("exit-code", 3, 0)
    time.sleep(0.3)  # six RestartSec periods: a restart, had one been scheduled, would have run by now
    status = sup.status("prevented")
    assert (status.active_state, status.n_restarts) == ("failed", 0)
    assert len(runs.read_text().splitlines()) == 1
    lines = sup.logs("prevented")
    assert any("Restart prevented by exit status (code=exited, status=3; RestartPreventExitStatus=3)" in line
               for line in lines)
    assert not any("Scheduled restart job" in line for line in lines)


def test_restart_prevent_exit_status_lets_other_exits_restart(sup: Supervisor, units: Units, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    script = units.script("crash-once", RUN_COUNTER)
    sup.add("restarted", units.spec("restarted", f"ExecStart={PY} {script}\nRestart=on-failure\nRestartSec=50ms\n"
                                                 f"RestartPreventExitStatus=3\n"),
            extra_env={"RUNS": str(runs), "EXIT_CODE": "1"})
    sup.start("restarted", check=False)
    status = sup.wait_until("restarted", lambda s: s.active and s.n_restarts == 1 and s.main_pid is not None, 10,
                            what="active after one restart")
    assert status.exit_code == 1 and len(read_when_present(runs, lines=2)) == 2


def test_restart_prevent_exit_status_applies_to_a_oneshot_s_exec_start_too(sup: Supervisor, units: Units) -> None:
    sup.add("once", units.spec("once", "Type=oneshot\nExecStart=/bin/sh -c 'exit 2'\nRestart=on-failure\n"
                                       "RestartSec=50ms\nRestartPreventExitStatus=2\n"))
    with pytest.raises(ServiceFailed, match="exit-code"):
        sup.start("once", timeout=10)
    time.sleep(0.3)
    status = sup.status("once")
    assert (status.active_state, status.exit_code, status.n_restarts) == ("failed", 2, 0)


def test_start_limit_hit_after_burst_and_restart_clears_it(sup: Supervisor, units: Units, tmp_path: Path) -> None:
    runs, ok_flag = tmp_path / "runs", tmp_path / "ok"
    script = units.script("always-crash", RUN_COUNTER)
    spec = units.spec("limited", f"ExecStart={PY} {script}\nRestart=always\nRestartSec=50ms\n",
                      unit_section="StartLimitIntervalSec=20s\nStartLimitBurst=3\n")
    sup.add("limited", spec, extra_env={"RUNS": str(runs), "FAIL_RUNS": "100", "OK_FLAG": str(ok_flag)})
    sup.start("limited", check=False)
    status = sup.wait_for("limited", "failed", 10)
    assert (status.result, status.n_restarts) == ("start-limit-hit", 2)
    assert len(runs.read_text().splitlines()) == 3
    time.sleep(0.3)  # six RestartSec periods: no further start may happen on its own
    assert len(runs.read_text().splitlines()) == 3 and sup.status("limited").active_state == "failed"
    refused = sup.start("limited", check=False)  # a manual start counts against the limit too
    assert (refused.active_state, refused.result) == ("failed", "start-limit-hit")
    assert len(runs.read_text().splitlines()) == 3
    ok_flag.write_text("")
    assert sup.restart("limited").active
    assert len(read_when_present(runs, lines=4)) == 4


def test_stop_never_triggers_restart(sup: Supervisor, units: Units, tmp_path: Path) -> None:
    sup.add("always", units.spec("always", "ExecStart=/bin/sleep 30\nRestart=always\nRestartSec=50ms\n"))
    pid = sup.start("always").main_pid
    assert sup.stop("always").active_state == "inactive"
    time.sleep(0.2)  # four RestartSec periods: a wrongly scheduled restart would have happened
    status = sup.status("always")
    assert (status.active_state, status.n_restarts, status.main_pid) == ("inactive", 0, None)
    assert pid is not None and gone(pid)


# -- stopping -------------------------------------------------------------------------------

def test_timeout_stop_sec_escalates_to_sigkill(sup: Supervisor, units: Units) -> None:
    script = units.script("stubborn", """\
        import signal, time
        signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
    """)
    sup.add("stubborn", units.spec("stubborn", f"ExecStart={PY} {script}\nTimeoutStopSec=400ms\n"),
            readiness=lambda: any("stdout: ready" in line for line in sup.logs("stubborn")))
    pid = sup.start("stubborn", timeout=10).main_pid
    began = time.monotonic()
    status = sup.stop("stubborn")
    elapsed = time.monotonic() - began
    assert elapsed >= 0.4
    assert (status.active_state, status.result, status.signal) == ("failed", "timeout", "SIGKILL")
    assert pid is not None and gone(pid)
    lines = sup.logs("stubborn")
    assert any("ignoring SIGTERM" in line for line in lines) and any("timed out. Killing" in line for line in lines)


CHILD_SPAWNER = """\
    import os, subprocess, sys, time
    child = subprocess.Popen(["sleep", "60"], start_new_session=os.environ.get("ESCAPE") == "1")
    with open(os.environ["CHILD_PID"], "w") as handle:
        handle.write(str(child.pid))
    if os.environ.get("CRASH") == "1":
        sys.exit(2)
    time.sleep(60)
"""


@pytest.mark.parametrize("escape", ["0", "1"])
def test_stop_kills_the_whole_process_group_and_escaped_children(sup: Supervisor, units: Units, tmp_path: Path,
                                                                 escape: str) -> None:
    child_pid_file = tmp_path / "child.pid"
    script = units.script("parent", CHILD_SPAWNER)
    sup.add("parent", units.spec("parent", f"ExecStart={PY} {script}\nTimeoutStopSec=5\n"),
            extra_env={"CHILD_PID": str(child_pid_file), "ESCAPE": escape})
    sup.start("parent")
    child = int(read_when_present(child_pid_file)[0])
    assert not gone(child)
    began = time.monotonic()
    status = sup.stop("parent")
    assert wait_gone(child, 2.0)
    # SIGTERM reached the whole group at once: no wait for TimeoutStopSec, no SIGKILL escalation.
    assert status.result == "success" and time.monotonic() - began < 2.0


def test_a_crash_takes_the_rest_of_its_group_with_it(sup: Supervisor, units: Units, tmp_path: Path) -> None:
    child_pid_file = tmp_path / "child.pid"
    script = units.script("crasher", CHILD_SPAWNER)
    sup.add("crasher", units.spec("crasher", f"ExecStart={PY} {script}\nTimeoutStopSec=2\n"),
            extra_env={"CHILD_PID": str(child_pid_file), "CRASH": "1"})
    sup.start("crasher", check=False)
    status = sup.wait_for("crasher", "failed", 10)
    assert (status.result, status.exit_code) == ("exit-code", 2)
    assert wait_gone(int(read_when_present(child_pid_file)[0]), 2.0)


def test_close_on_an_exception_kills_everything(units: Units, tmp_path: Path) -> None:
    child_pid_file = tmp_path / "child.pid"
    script = units.script("parent", CHILD_SPAWNER)
    pids = []
    with pytest.raises(RuntimeError, match="boom"), Supervisor(tmp_path / "rt") as supervisor:
        supervisor.add("a", units.spec("a", f"ExecStart={PY} {script}\n"), extra_env={"CHILD_PID": str(child_pid_file)})
        supervisor.add("b", units.spec("b", "ExecStart=/bin/sleep 60\nRestart=always\nRestartSec=10ms\n"))
        pids.append(supervisor.start("a").main_pid)
        pids.append(supervisor.start("b").main_pid)
        pids.append(int(read_when_present(child_pid_file)[0]))
        raise RuntimeError("boom")
    assert all(pid is not None and wait_gone(pid, 2.0) for pid in pids)
    with pytest.raises(ServiceError, match="closed"):
        supervisor.start("a")


DRIVER = """\
import os, sys, time
from pathlib import Path
from harness.sysd.spec import ServiceSpec
from harness.sysd.supervisor import Supervisor
from harness.sysd.unitfile import parse_unit_text
supervisor = Supervisor(Path(sys.argv[1]))
supervisor.add("sleep", ServiceSpec.from_unit(parse_unit_text("[Service]\\nExecStart=/bin/sleep 60\\n", "s.service")))
print(supervisor.start("sleep").main_pid, flush=True)
if sys.argv[2] == "wait":
    time.sleep(60)
"""


@pytest.mark.parametrize("ending", ["sigterm", "exit-without-close"])
def test_services_die_with_the_harness(tmp_path: Path, ending: str) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    mode = "wait" if ending == "sigterm" else "exit"
    proc = subprocess.Popen([sys.executable, str(driver), str(tmp_path / "rt"), mode], cwd=PROJECT,
                            env={**os.environ, "PYTHONPATH": str(PROJECT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        service_pid = int(proc.stdout.readline())
        if ending == "sigterm":
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) != 0 if ending == "sigterm" else proc.wait(timeout=10) == 0
        assert wait_gone(service_pid, 3.0)
    finally:
        proc.kill()
        proc.wait(timeout=5)


# -- readiness ---------------------------------------------------------------------------------

HTTP_SERVER = """\
    import http.server, os, time
    time.sleep(float(os.environ.get("DELAY", "0.3")))
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"error":"UNAUTHORIZED"}')
        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    print("listening", flush=True)
    server.serve_forever()
"""


def test_readiness_by_http_keeps_the_service_activating_until_it_answers(sup: Supervisor, units: Units) -> None:
    port = free_port()
    script = units.script("observer_like", HTTP_SERVER)
    sup.add("http", units.spec("http", f"ExecStart={PY} {script}\n"), extra_env={"PORT": str(port)},
            readiness=f"http://127.0.0.1:{port}/observer/health")
    results: list[ServiceStatus] = []
    starter = threading.Thread(target=lambda: results.append(sup.start("http", timeout=10)))
    starter.start()
    during = sup.wait_for("http", "activating", 5)
    starter.join(15)
    assert during.sub_state == "start"
    assert results and results[0].active
    assert httpx.get(f"http://127.0.0.1:{port}/observer/health", timeout=2, trust_env=False).status_code == 401
    lines = sup.logs("http")
    assert [i for i, line in enumerate(lines) if "listening" in line][0] < [
        i for i, line in enumerate(lines) if "Started http." in line][0]


def test_readiness_by_tcp_port(sup: Supervisor, units: Units) -> None:
    port = free_port()
    script = units.script("tcp", """\
        import os, socket, time
        time.sleep(0.2)
        server = socket.create_server(("127.0.0.1", int(os.environ["PORT"])))
        while True:
            server.accept()[0].close()
    """)
    sup.add("tcp", units.spec("tcp", f"ExecStart={PY} {script}\n"), extra_env={"PORT": str(port)}, readiness=port)
    began = time.monotonic()
    assert sup.start("tcp", timeout=10).active
    assert time.monotonic() - began >= 0.2


def test_readiness_that_never_passes_fails_with_timeout_and_stops_the_process(sup: Supervisor, units: Units) -> None:
    sup.add("never", units.spec("never", "ExecStart=/bin/sleep 30\n"), readiness=lambda: False)
    with pytest.raises(ServiceFailed, match="timeout"):
        sup.start("never", timeout=0.5)
    status = sup.status("never")
    assert (status.active_state, status.result, status.main_pid) == ("failed", "timeout", None)
    assert not any(proc.info["cmdline"] == ["/bin/sleep", "30"] and proc.info["ppid"] == os.getpid()
                   for proc in psutil.process_iter(["cmdline", "ppid"]))


def test_a_process_that_dies_before_it_is_ready_fails_the_start(sup: Supervisor, units: Units) -> None:
    sup.add("dies", units.spec("dies", "ExecStart=/bin/sh -c 'echo bye; exit 4'\n"), readiness=lambda: False)
    with pytest.raises(ServiceFailed, match="exit-code"):
        sup.start("dies", timeout=5)
    assert sup.status("dies").exit_code == 4


def test_bad_readiness_spec_is_refused(sup: Supervisor, units: Units) -> None:
    with pytest.raises(ServiceError, match="not an http"):
        sup.add("bad", units.spec("bad", "ExecStart=/bin/true\n"), readiness="ftp://x")


# -- the systemd tables (resource limits: tests/test_cgroups.py) ---------------------------------

@pytest.mark.parametrize(("policy", "result", "expected"), [
    ("no", "exit-code", False), ("always", "success", True), ("on-success", "success", True),
    ("on-success", "exit-code", False), ("on-failure", "exit-code", True), ("on-failure", "signal", True),
    ("on-failure", "success", False), ("on-abnormal", "exit-code", False), ("on-abnormal", "signal", True),
    ("on-abnormal", "timeout", True), ("on-abnormal", "oom-kill", True), ("on-failure", "oom-kill", True),
    ("on-abort", "signal", True), ("on-abort", "timeout", False),
])
def test_restart_table(policy: str, result: str, expected: bool) -> None:
    assert should_restart(policy, result) is expected


def test_restart_prevent_exit_status_wins_over_every_policy() -> None:
    prevent = ExitStatusSet(frozenset({0, 3}), frozenset({signal.SIGABRT}))
    for policy in ("always", "on-failure", "on-abnormal", "on-abort"):
        assert not should_restart(policy, "exit-code", main_exit=3, prevent=prevent)
        assert not should_restart(policy, "signal", main_exit=-signal.SIGABRT, prevent=prevent)
    assert not should_restart("always", "success", main_exit=0, prevent=prevent)
    assert should_restart("on-failure", "exit-code", main_exit=1, prevent=prevent)
    assert should_restart("on-failure", "signal", main_exit=-signal.SIGKILL, prevent=prevent)
    # No main process exit (a failed ExecStartPre=, a missing binary): the list does not apply.
    assert should_restart("on-failure", "exit-code", main_exit=None, prevent=prevent)


def test_exit_classification_treats_term_hup_int_pipe_as_clean() -> None:
    assert describe_exit(0) == (0, None, "success")
    assert describe_exit(3) == (3, None, "exit-code")
    assert describe_exit(-signal.SIGTERM) == (None, "SIGTERM", "success")
    assert describe_exit(-signal.SIGKILL) == (None, "SIGKILL", "signal")
    assert describe_exit(-signal.SIGSEGV) == (None, "SIGSEGV", "signal")


def test_start_limit_window() -> None:
    limit = StartLimit(interval=10.0, burst=3)
    assert [limit.allow(now) for now in (0.0, 1.0, 2.0, 3.0)] == [True, True, True, False]
    assert limit.allow(10.5) is True  # the window began at 0.0 and has passed
    unlimited = StartLimit(interval=0, burst=1)
    assert all(unlimited.allow(float(now)) for now in range(5))


# -- a QuantLab-shaped unit, end to end ---------------------------------------------------------

NODE_SERVER = """\
import http from "node:http";
const token = process.env.OBSERVER_TOKEN;
const server = http.createServer((req, res) => {
  const ok = req.headers.authorization === `Bearer ${token}`;
  res.writeHead(ok ? 200 : 401, {"content-type": "application/json"});
  res.end(JSON.stringify(ok ? {status: "ok", cwd: process.cwd()} : {error: "UNAUTHORIZED"}));
});
server.listen(Number(process.env.OBSERVER_PORT), "127.0.0.1", () => console.log(`listening token=${token}`));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_a_production_unit_boots_on_a_checkout_with_harness_env_files(sup: Supervisor, tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "services" / "replayd").mkdir(parents=True)
    (checkout / "services" / "replayd" / "server.mjs").write_text(NODE_SERVER)
    unit_path = checkout / "quantlab-replayd.service"
    unit_path.write_text(textwrap.dedent("""\
        [Unit]
        Description=QuantLab replayd
        StartLimitIntervalSec=60s
        StartLimitBurst=5
        [Service]
        Type=simple
        User=deploy
        WorkingDirectory=/home/deploy/quantlab-backend/services/replayd
        EnvironmentFile=/etc/quantlab/replayd.env
        ExecStart=/usr/bin/env node /home/deploy/quantlab-backend/services/replayd/server.mjs
        Restart=always
        RestartSec=5
        """))
    port = free_port()
    env_file = write_env_file(tmp_path / "env" / "replayd.env", {"OBSERVER_TOKEN": SECRET, "OBSERVER_PORT": str(port)})
    spec = load_service(unit_path, checkout=checkout, env_file_map={"replayd.env": env_file})
    url = f"http://127.0.0.1:{port}/observer/health"
    sup.add("replayd", spec, readiness=url)
    status = sup.start("replayd", timeout=15)
    answer = httpx.get(url, headers={"Authorization": f"Bearer {SECRET}"}, timeout=2, trust_env=False).json()
    assert answer == {"status": "ok", "cwd": str(checkout.resolve() / "services" / "replayd")}
    assert any("stdout: listening token=***" in line for line in sup.logs("replayd"))
    assert any("rewritten EnvironmentFile: /etc/quantlab/replayd.env" in note for note in status.notes)
    assert sup.stop("replayd").result == "success"
    assert SECRET not in sup.log_path("replayd").read_text()


@pytest.mark.parametrize("order", ["short-first", "long-first"])
def test_a_journal_masks_a_secret_that_contains_another_whole(sup: Supervisor, units: Units, order: str) -> None:
    # Masking the short one first would leave `***-long` of the long one in the journal.
    secrets = {"API_TOKEN": "tokXYZW", "S3_SECRET_KEY": "tokXYZW-long"}
    if order == "long-first":
        secrets = dict(reversed(secrets.items()))
    sup.add("nested", units.spec("nested", "Type=oneshot\n"
                                           "ExecStart=/bin/sh -c 'echo \"value=$S3_SECRET_KEY and $API_TOKEN\"'\n"),
            override_env=secrets)
    sup.start("nested", timeout=10)
    lines = sup.logs("nested")
    assert any(line.endswith("stdout: value=*** and ***") for line in lines), lines
    journal = "\n".join(lines) + sup.log_path("nested").read_text()
    assert "tokXYZW" not in journal and "***-long" not in journal
