"""A watchdog that ends what a harness process started, however that process ends.

Services, toxiproxy and one-shot commands run in sessions of their own, so a SIGKILL of their owner (a pytest
worker, `quantlab-chaos run`, `env up`) would leave them running. Each owner therefore has a reaper: a tiny
process started on first use, in a session of its own, reading a pipe whose only writer is the owner. Owners
register each child's process group as they start it (`watch`) and drop it once it is gone (`forget`); children
also carry the owner's mark in their environment (`child_env`), which their own children inherit. The reaper
sleeps in a blocking read and costs nothing while the owner lives. When the pipe closes (the owner exited,
crashed, or was killed), it sends SIGTERM to every registered group and every process carrying the owner's mark,
waits a short grace, sends SIGKILL to what is left, and exits.

Containers are ended the same way. Each one carries its owner's mark as a label (`OWNER_LABEL`), and the owner
tells its reaper each engine it uses (`watch_engine`) before it creates a container there; once the owner is gone,
the reaper removes every container on those engines that carries the mark. `labelled_containers` and
`remove_container` are that Docker API, in the standard library, for the reaper and the harness's startup sweep.

PR_SET_PDEATHSIG is deliberately not used: it fires when the *thread* that forked the child exits, and the
supervisor starts services from restart and stop threads, so it would kill healthy services.

This file is also the reaper's program (`python -I -S reaper.py --serve MARK`): standard library only.
"""
from __future__ import annotations

import _thread
import os
import signal
import socket
import sys
import time

TYPE_CHECKING = False  # not typing's: the reaper process imports as little as it can, it lives as long as its owner
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

MARK_ENV = "QUANTLAB_CHAOS_OWNER"
GRACE_S = 3.0  # SIGTERM to SIGKILL: a service stops cleanly in well under this
KILL_WAIT_S = 5.0
POLL_S = 0.05  # only while reaping, never while the owner lives
UNKNOWN_START = "-"
OWNER_LABEL = "quantlab-chaos.owner"  # on every container: the mark of the owner whose reaper removes it
DOCKER_TIMEOUT_S = 15.0  # one Docker API call; removing a container copies nothing, so this is ample


# -- /proc ---------------------------------------------------------------------------------------------------

def _stat(pid: int | str) -> tuple[str, int, str] | None:
    """(state, process group, start time in clock ticks) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or parentheses.
    fields = raw[raw.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[2]), fields[19]
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> str:
    """The kernel's start time of `pid`: with the pid, it names one process even after pid reuse."""
    found = _stat(pid)
    return found[2] if found else UNKNOWN_START


def _pids() -> Iterable[int]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    return [int(name) for name in names if name.isdigit()]


def _has_mark(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return needle in b"\0" + handle.read()
    except OSError:
        return False


# -- the reaper process ----------------------------------------------------------------------------------------

class _Reaping:
    """What one reaper ends: registered groups (checked against pid reuse) and processes carrying its mark."""

    def __init__(self, groups: Mapping[int, str], mark: str) -> None:
        self.me = os.getpid()
        self.needle = f"\0{MARK_ENV}={mark}\0".encode()
        self.groups = {pgid for pgid, started in groups.items() if self._still_ours(pgid, started)}
        self.marked: dict[int, str] = {}
        self.scan_marks()

    @staticmethod
    def _still_ours(pgid: int, started: str) -> bool:
        # A live process with the group's number but another start time means the number was reused, and
        # the kernel reuses a number only once no group carries it: our group is gone.
        found = _stat(pgid)
        return found is None or (started != UNKNOWN_START and found[2] == started)

    def scan_marks(self) -> None:
        for pid in _pids():
            if pid != self.me and pid not in self.marked and _has_mark(pid, self.needle):
                self.marked[pid] = start_time(pid)

    def signal_all(self, sig: int) -> None:
        for pgid in self.groups:
            try:
                os.killpg(pgid, sig)
            except OSError:
                pass
        for pid, started in self.marked.items():
            if start_time(pid) == started:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass

    def alive(self) -> bool:
        for pid in _pids():
            found = _stat(pid)
            if found is None or found[0] in ("Z", "X") or pid == self.me:
                continue
            if found[1] in self.groups or self.marked.get(pid) == found[2]:
                return True
        return False

    def wait_gone(self, seconds: float) -> bool:
        # Its own loop, not quantlab_chaos.waiting: the reaper runs as `python -I -S reaper.py`, with nothing of the
        # project on its path, so that it can never be the one process that fails to import.
        deadline = time.monotonic() + seconds
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)
        return True


def reap(groups: Mapping[int, str], mark: str, grace: float = GRACE_S, engines: Iterable[str] = ()) -> None:
    """SIGTERM to every registered group and marked process, SIGKILL after `grace` to what is left; then removes
    the containers carrying the mark on each engine."""
    reaping = _Reaping(groups, mark)
    reaping.signal_all(signal.SIGTERM)
    if not reaping.wait_gone(grace):
        reaping.scan_marks()  # a dying service may have started something in the meantime
        reaping.signal_all(signal.SIGKILL)
        reaping.wait_gone(KILL_WAIT_S)
    for docker_host in engines:
        remove_owned_containers(docker_host, mark)


def serve(mark: str, grace: float = GRACE_S) -> None:
    """The reaper's loop: `+PID START` registers a group, `-PID` drops it, `@DOCKER_HOST` names an engine with
    containers of this owner; end of input means the owner is gone."""
    os.chdir("/")
    for sig in (signal.SIGINT, signal.SIGHUP):  # a terminal's Ctrl-C or hangup is for the owner, not for us
        signal.signal(sig, signal.SIG_IGN)
    groups: dict[int, str] = {}
    engines: list[str] = []
    for raw in sys.stdin.buffer:
        line = raw.decode("ascii", "replace").strip()
        try:
            if line.startswith("+"):
                pid, _, started = line[1:].partition(" ")
                groups[int(pid)] = started or UNKNOWN_START
            elif line.startswith("-"):
                groups.pop(int(line[1:]), None)
            elif line.startswith("@") and line[1:] not in engines:
                engines.append(line[1:])
        except ValueError:
            continue
    reap(groups, mark, grace, engines)


# -- containers: the Docker engine's API, standard library only ------------------------------------------------

def docker_request(docker_host: str, method: str, path: str, timeout: float = DOCKER_TIMEOUT_S) -> tuple[int, bytes]:
    """(status, body) of one call to the engine at `docker_host` (unix:///path or tcp://host:port, without TLS).

    HTTP/1.0, so the engine closes the connection after a body that is never chunked. Raises OSError.
    """
    if docker_host.startswith("unix://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(docker_host[len("unix://"):])
        except OSError:
            sock.close()
            raise
    elif docker_host.startswith("tcp://"):
        host, _, port = docker_host[len("tcp://"):].rstrip("/").rpartition(":")
        sock = socket.create_connection((host.strip("[]"), int(port or 2375)), timeout=timeout)
    else:
        raise OSError(f"DOCKER_HOST {docker_host!r}: only unix:// and tcp:// engines are supported")
    with sock:
        sock.sendall(f"{method} {path} HTTP/1.0\r\nHost: docker\r\nContent-Length: 0\r\n\r\n".encode("ascii"))
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body
    except (IndexError, ValueError):
        raise OSError(f"the Docker engine at {docker_host} gave no HTTP answer to {method} {path}") from None


def labelled_containers(docker_host: str, label: str) -> list[dict[str, object]]:
    """Every container (running or not) with `label` ("key" or "key=value"), as the engine lists them."""
    import json
    from urllib.parse import quote

    status, body = docker_request(docker_host, "GET", "/containers/json?all=1&filters=" + quote(json.dumps({"label": [label]})))
    if status != 200:
        raise OSError(f"listing containers at {docker_host}: HTTP {status} {body[:200]!r}")
    found: list[dict[str, object]] = json.loads(body)
    return found


def remove_container(docker_host: str, container_id: str) -> bool:
    """Force-removes a container and its anonymous volumes; True when it is gone (also when it was already)."""
    try:
        status, _ = docker_request(docker_host, "DELETE", f"/containers/{container_id}?force=1&v=1")
    except OSError:
        return False
    return status in (204, 404)


def remove_owned_containers(docker_host: str, mark: str) -> int:
    """Removes every container carrying the owner's mark; how many. Never raises: an engine that is gone has none."""
    try:
        found = labelled_containers(docker_host, f"{OWNER_LABEL}={mark}")
    except (OSError, ValueError):
        return 0
    return sum(remove_container(docker_host, str(container["Id"])) for container in found)


# -- the owner's side ------------------------------------------------------------------------------------------

class Reaper:
    """The owner's handle on its reaper: started lazily, restarted if it ever dies, reset in a forked child."""

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._owner = 0
        self._mark = ""
        self._pid = 0
        self._fd = -1
        self._watched: dict[int, str] = {}
        self._engines: list[str] = []
        self._fork_hook = False

    @property
    def mark(self) -> str:
        with self._lock:
            self._ensure()
            return self._mark

    @property
    def pid(self) -> int:
        """The reaper process's pid (0 before first use)."""
        return self._pid

    def child_env(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """`env` (default: this process's environment) with this owner's mark, for a child about to start."""
        return {**(os.environ if env is None else env), MARK_ENV: self.mark}

    def mark_environment(self) -> None:
        """Marks this process's environment, so every child that inherits it is reaped with the rest."""
        os.environ[MARK_ENV] = self.mark

    def watch(self, pid: int) -> None:
        """Registers the process group led by `pid` (a child started in a new session or group)."""
        started = start_time(pid)
        with self._lock:
            self._ensure()
            self._watched[pid] = started
            self._send(f"+{pid} {started}\n")

    def watch_engine(self, docker_host: str) -> None:
        """Says that this owner creates containers (labelled `OWNER_LABEL`=mark) on the engine at `docker_host`."""
        with self._lock:
            self._ensure()
            if docker_host not in self._engines:
                self._engines.append(docker_host)
                self._send(f"@{docker_host}\n")

    def forget(self, pid: int) -> None:
        """Drops a group that is gone (so a later process with a reused pid is never touched)."""
        with self._lock:
            if self._owner != os.getpid() or self._watched.pop(pid, None) is None:
                return
            self._send(f"-{pid}\n")

    def watched(self) -> list[int]:
        with self._lock:
            return sorted(self._watched)

    def _ensure(self) -> None:
        if self._owner == os.getpid() and self._fd >= 0:
            return
        if self._owner != os.getpid():
            self._reset()
        self._start()

    def _reset(self) -> None:
        """In a forked child: the parent's reaper and groups are the parent's business."""
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._owner, self._mark, self._pid, self._fd = os.getpid(), "", 0, -1
        self._watched, self._engines = {}, []

    def _start(self) -> None:
        if not self._fork_hook:  # registered on first use, not at import: importing the harness starts nothing
            os.register_at_fork(after_in_child=self._after_fork)
            self._fork_hook = True
        if not self._mark:
            self._mark = f"{os.getpid()}-{os.urandom(8).hex()}"
        if self._pid:
            try:
                os.waitpid(self._pid, os.WNOHANG)  # the old reaper died: collect it
            except ChildProcessError:
                pass
        read_end, write_end = os.pipe()
        # The reaper carries no mark of anybody: another owner's reaper must never end it.
        env = {key: value for key, value in os.environ.items() if key != MARK_ENV}
        argv = [sys.executable, "-I", "-S", os.path.abspath(__file__), "--serve", self._mark]
        try:
            self._pid = os.posix_spawn(sys.executable, argv, env, setsid=True, file_actions=[
                (os.POSIX_SPAWN_DUP2, read_end, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ])
        finally:
            os.close(read_end)
        self._fd, self._owner = write_end, os.getpid()
        for pid, started in self._watched.items():  # after a restart: the new reaper learns every group
            self._send(f"+{pid} {started}\n", retry=False)
        for docker_host in self._engines:  # and every engine
            self._send(f"@{docker_host}\n", retry=False)

    def _send(self, line: str, retry: bool = True) -> None:
        try:
            os.write(self._fd, line.encode("ascii"))
        except OSError:
            if not retry:
                return
            os.close(self._fd)
            self._fd = -1
            self._start()  # re-sends every watched group, this one included

    def close(self) -> None:
        """Closes the pipe now: the reaper ends every group still registered. For tests and explicit shutdowns."""
        with self._lock:
            if self._owner == os.getpid() and self._fd >= 0:
                os.close(self._fd)
            self._fd, self._watched, self._engines = -1, {}, []

    def _after_fork(self) -> None:
        self._lock = _thread.allocate_lock()
        self._reset()


REAPER = Reaper()


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: os.environ) plus this process's owner mark."""
    return REAPER.child_env(env)


def watch(pid: int) -> None:
    """Registers the process group led by `pid` with this process's reaper."""
    REAPER.watch(pid)


def forget(pid: int) -> None:
    """Drops the process group led by `pid` (it has ended)."""
    REAPER.forget(pid)


def watch_engine(docker_host: str) -> None:
    """Has this process's reaper remove its labelled containers on that engine once this process is gone."""
    REAPER.watch_engine(docker_host)


def mark_environment() -> None:
    """Marks os.environ, so children started with an inherited environment are reaped too."""
    REAPER.mark_environment()


XDIST_WORKER_BOOT = b"exec(eval(sys.stdin.readline()))"  # how execnet starts an xdist worker


def interrupt_xdist_workers() -> list[int]:
    """SIGINT to this process's xdist workers (its children running execnet's boot line); their pids."""
    me = os.getpid()
    workers = []
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                ppid = int(handle.read().rsplit(b")", 1)[1].split()[1])
            if ppid != me:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if XDIST_WORKER_BOOT not in handle.read():
                    continue
            os.kill(pid, signal.SIGINT)
            workers.append(pid)
        except (OSError, IndexError, ValueError):
            continue
    return workers


def install() -> None:
    """Lets canary.process register its commands here: canary/ works without the harness, so it only has a hook."""
    import canary.process

    canary.process.owner = REAPER


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--serve":
        print("usage: reaper.py --serve MARK (started by the harness, not by hand)", file=sys.stderr)
        return 2
    serve(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
