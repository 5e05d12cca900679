"""Each test process gets a network namespace of its own, so units with fixed ports never collide; without one,
port locks make tests that need the same fixed port take turns. Real child processes, real sockets, real flocks."""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from harness.isolation import (
    NetworkIsolation,
    PortLocks,
    host_network_reason,
    namespace_name,
    probe_namespace_support,
    run_isolation,
)
from harness.ports import free_port
from quantlab_chaos.errors import HarnessError

PROJECT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 30.0
FIXED_PORT = 3000  # what QuantLab's observer unit hard-codes
LOCKED_PORT = 40111
PORT_LOCKS_MODE = NetworkIsolation("port-locks", "no namespace here (test)")
NAMESPACE_MODE = NetworkIsolation("namespace", "a namespace of its own (test)", "net:[1]")

# Shared by every child: bind a port and say so, as one JSON line, or say why not.
PRELUDE = textwrap.dedent("""
    import json, os, socket, sys, time
    from harness.isolation import isolate_process_network, namespace_name

    def say(**fields):
        print(json.dumps(fields), flush=True)

    def bind(port):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            return sock, ""
        except OSError as exc:
            sock.close()
            return None, exc.strerror or str(exc)
""")

BIND_AND_HOLD = PRELUDE + textwrap.dedent("""
    isolate = sys.argv[1] == "isolate"
    mode = isolate_process_network().mode if isolate else "none"
    sock, error = bind(int(sys.argv[2]))
    say(bound=sock is not None, error=error, mode=mode, namespace=namespace_name())
    sys.stdin.readline()  # hold the port until the test has seen both children bound
""")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection to host:port is accepted within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def child_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "QUANTLAB_CHAOS_NETNS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH", "")]))
    return {**env, **extra}


def run_child(code: str, *args: str, **env: str) -> dict[str, Any]:
    """Runs a short Python child to its end (bounded) and returns the JSON on its last stdout line."""
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args], cwd=PROJECT,
                          env=child_env(**env), capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert done.returncode == 0, f"child failed ({done.returncode}): {done.stderr}"
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


@contextmanager
def held_child(code: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """A child that reports one JSON line, then waits until its stdin closes; always stopped at the end."""
    child = subprocess.Popen([sys.executable, "-c", code, *args], cwd=PROJECT, env=child_env(), text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield child, read_line(child, CHILD_TIMEOUT_S)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        try:
            child.wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=CHILD_TIMEOUT_S)


def read_line(child: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    if not ready:
        pytest.fail(f"child {child.pid} said nothing within {timeout:.0f} s")
    line = child.stdout.readline()
    if not line:
        child.wait(timeout=CHILD_TIMEOUT_S)
        stderr = child.stderr.read() if child.stderr else ""
        pytest.fail(f"child exited ({child.returncode}) before reporting: {stderr}")
    report: dict[str, Any] = json.loads(line)
    return report


@pytest.fixture(scope="module")
def namespaces() -> None:
    supported, why = probe_namespace_support()
    if not supported:
        pytest.skip(f"no network namespace can be made here: {why}")


# -- namespaces ---------------------------------------------------------------------------------------------

def test_two_isolated_processes_bind_the_same_fixed_port_at_once(namespaces: None) -> None:
    with held_child(BIND_AND_HOLD, "isolate", str(FIXED_PORT)) as (_, first), \
            held_child(BIND_AND_HOLD, "isolate", str(FIXED_PORT)) as (_, second):
        # Both report only after binding, and hold the port until both contexts close: the binds overlap.
        assert first["bound"] and second["bound"], (first, second)
        assert first["mode"] == second["mode"] == "namespace"
        assert len({first["namespace"], second["namespace"], namespace_name()}) == 3


def test_without_isolation_the_same_port_collides() -> None:
    """The control for the test above: the same two children without a namespace do collide."""
    port = free_port()
    with held_child(BIND_AND_HOLD, "none", str(port)) as (_, first), \
            held_child(BIND_AND_HOLD, "none", str(port)) as (_, second):
        assert first["bound"], first
        assert not second["bound"] and "in use" in second["error"], second


def test_loopback_works_inside_and_the_outer_loopback_is_out_of_reach(namespaces: None) -> None:
    outer_port = free_port()
    with held_child(BIND_AND_HOLD, "none", str(outer_port)) as (_, outer):
        assert outer["bound"], outer
        assert port_open("127.0.0.1", outer_port), "the control: the outer listener answers outside the namespace"
        inside = run_child("""
            isolation = isolate_process_network()
            server, error = bind(0)
            assert server is not None, error
            client = socket.create_connection(server.getsockname(), timeout=5)
            peer, _ = server.accept()
            client.sendall(b"ping")
            echoed = peer.recv(4)
            try:
                socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()
                outer = "reached"
            except OSError as exc:
                outer = exc.strerror or str(exc)
            say(mode=isolation.mode, echoed=echoed.decode(), outer=outer)
        """, str(outer_port))
    assert inside["mode"] == "namespace"
    assert inside["echoed"] == "ping"
    assert inside["outer"] != "reached", inside


def test_isolating_twice_keeps_the_first_namespace(namespaces: None) -> None:
    result = run_child("""
        before = namespace_name()
        first = isolate_process_network()
        after_first = namespace_name()
        second = isolate_process_network()
        say(before=before, after_first=after_first, after_second=namespace_name(),
            same_result=first is second, recorded=first.namespace)
    """)
    assert result["before"] != result["after_first"], "the first call moves the process into a new namespace"
    assert result["after_second"] == result["after_first"] == result["recorded"], result
    assert result["same_result"]


def test_the_probe_leaves_the_caller_where_it_was(namespaces: None) -> None:
    before = namespace_name()
    assert probe_namespace_support()[0]
    assert namespace_name() == before


def test_netns_switch_turns_isolation_off() -> None:
    code = """
        before = namespace_name()
        isolation = isolate_process_network()
        say(mode=isolation.mode, reason=isolation.reason, namespace=isolation.namespace,
            moved=namespace_name() != before)
    """
    result = run_child(code, QUANTLAB_CHAOS_NETNS="0")
    assert result["mode"] == "port-locks" and result["namespace"] is None and not result["moved"]
    assert "turned off" in result["reason"] and "QUANTLAB_CHAOS_NETNS=0" in result["reason"], result
    by_caller = run_child(code.replace("isolate_process_network()",
                                       "isolate_process_network(enabled=False, why_not='MinIO runs in Docker')"))
    assert by_caller["mode"] == "port-locks" and not by_caller["moved"], by_caller
    assert "turned off (MinIO runs in Docker)" in by_caller["reason"], by_caller


def test_parts_on_the_host_network_keep_the_host_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TOXIPROXY_URL", raising=False)
    monkeypatch.delenv("TOXIPROXY_BIN", raising=False)
    binary = tmp_path / "toxiproxy-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert host_network_reason("moto", "binary") == ""
    assert host_network_reason("moto", None, str(binary)) == ""
    # A local engine's containers join the test process's namespace; a remote engine's are on another network.
    assert host_network_reason("minio", "binary") == host_network_reason("moto", "container") == ""
    monkeypatch.setenv("DOCKER_HOST", "tcp://build-host:2376")
    assert "Docker engine at tcp://build-host:2376" in host_network_reason("minio", "binary")
    assert "Docker engine at tcp://build-host:2376" in host_network_reason("moto", "container")
    monkeypatch.delenv("DOCKER_HOST")
    assert "--s3-backend url" in host_network_reason("url", "binary")
    monkeypatch.setenv("TOXIPROXY_URL", "http://127.0.0.1:8474")
    assert "TOXIPROXY_URL" in host_network_reason("moto", None, str(binary))
    assert host_network_reason("moto", "binary") == "", "an explicit backend ignores TOXIPROXY_URL"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user in a child")
def test_an_unprivileged_process_falls_back_to_port_locks() -> None:
    result = run_child("""
        from harness.isolation import probe_namespace_support
        before = namespace_name()
        # Everything is imported already: the interpreter's files may not be readable for "nobody".
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        isolation = isolate_process_network()
        say(mode=isolation.mode, reason=isolation.reason, namespace=isolation.namespace,
            moved=namespace_name() != before, probe=probe_namespace_support())
    """)
    assert result["mode"] == "port-locks" and result["namespace"] is None and not result["moved"], result
    assert "unshare: Operation not permitted" in result["reason"], result
    assert result["probe"] == [False, "unshare: Operation not permitted"]



def test_the_run_header_says_what_keeps_environments_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QUANTLAB_CHAOS_NETNS", raising=False)
    supported, why = probe_namespace_support()
    header = run_isolation("moto", "binary")
    assert header.startswith("network namespaces:") if supported else why in header, header
    monkeypatch.setenv("DOCKER_HOST", "tcp://build-host:2376")
    assert run_isolation("minio", "binary").startswith("port locks: network isolation turned off (--s3-backend minio")
    monkeypatch.delenv("DOCKER_HOST")
    assert run_isolation("minio", "container") == header, "a local engine's containers join the namespaces"
    monkeypatch.setenv("QUANTLAB_CHAOS_NETNS", "0")
    assert "turned off (QUANTLAB_CHAOS_NETNS=0)" in run_isolation("moto", "binary")

# -- port locks ---------------------------------------------------------------------------------------------

TAKE_TURN = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from harness.isolation import NetworkIsolation, PortLocks

    lock_dir, journal = Path(sys.argv[1]), Path(sys.argv[2])
    with PortLocks([int(sys.argv[3])], isolation=NetworkIsolation("port-locks", "test"), lock_dir=lock_dir,
                   timeout=20, what=f"child {os.getpid()}") as locks:
        with journal.open("a") as out:
            out.write(json.dumps({"pid": os.getpid(), "enter": time.monotonic(), "waited": locks.waited_s}) + "\\n")
        time.sleep(0.8)  # long enough that the other child, started alongside, must wait for this one
        with journal.open("a") as out:
            out.write(json.dumps({"pid": os.getpid(), "leave": time.monotonic()}) + "\\n")
""")

HOLD_LOCK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from harness.isolation import NetworkIsolation, PortLocks

    with PortLocks([int(sys.argv[2])], isolation=NetworkIsolation("port-locks", "test"), lock_dir=Path(sys.argv[1]),
                   timeout=20, what="the holder"):
        print(json.dumps({"held": True}), flush=True)
        sys.stdin.readline()
""")


def test_port_locks_serialise_processes_that_need_the_same_port(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    args = [sys.executable, "-c", TAKE_TURN, str(tmp_path / "locks"), str(journal), str(LOCKED_PORT)]
    children = [subprocess.Popen(args, cwd=PROJECT, env=child_env(), stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    for child in children:
        try:
            _, stderr = child.communicate(timeout=CHILD_TIMEOUT_S)
        finally:
            child.kill()
        assert child.returncode == 0, stderr
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    intervals = sorted((next(e["enter"] for e in entries if e["pid"] == pid and "enter" in e),
                        next(e["leave"] for e in entries if e["pid"] == pid and "leave" in e))
                       for pid in {e["pid"] for e in entries})
    assert len(intervals) == 2
    (_, first_leave), (second_enter, _) = intervals
    assert first_leave <= second_enter, f"the two holders overlapped: {intervals}"
    assert max(e.get("waited", 0) for e in entries) > 0.3, "the second child should have waited for the first"


def test_port_locks_time_out_with_the_port_and_the_lock_file(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    with held_child(HOLD_LOCK, str(lock_dir), str(LOCKED_PORT)) as (holder, report):
        assert report["held"]
        started = time.monotonic()
        with pytest.raises(HarnessError) as raised:
            with PortLocks([LOCKED_PORT], isolation=PORT_LOCKS_MODE, timeout=0.5, lock_dir=lock_dir, what="a test"):
                pytest.fail("took a lock another process holds")
        assert 0.5 <= time.monotonic() - started < 5
    message = str(raised.value)
    assert f"Port {LOCKED_PORT}" in message and str(lock_dir / f"port-{LOCKED_PORT}.lock") in message, message
    assert f"pid {holder.pid} for the holder" in message, message
    assert "root" in message and "-n" in message, "says what to do"


def test_port_locks_do_nothing_in_a_namespace(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    with held_child(HOLD_LOCK, str(lock_dir), str(LOCKED_PORT)) as (_, report):
        assert report["held"]
        started = time.monotonic()
        with PortLocks([LOCKED_PORT], isolation=NAMESPACE_MODE, timeout=5, lock_dir=lock_dir) as locks:
            assert locks.waited_s == 0
        assert time.monotonic() - started < 0.2


def test_port_locks_are_released_on_an_exception_and_taken_in_order(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with PortLocks([40113, LOCKED_PORT, 40113], isolation=PORT_LOCKS_MODE, lock_dir=tmp_path, timeout=2) as locks:
            assert locks.ports == (LOCKED_PORT, 40113)
            raise RuntimeError("the test body failed")
    # Another process can take both at once, so nothing was left locked.
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        from pathlib import Path
        from harness.isolation import PortLocks
        with PortLocks([40111, 40113], isolation=None, lock_dir=Path(sys.argv[1]), timeout=0.2) as locks:
            print(round(locks.waited_s, 3))
    """), str(tmp_path)], cwd=PROJECT, env=child_env(), capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 0.2
