"""Keeps test processes that boot units with fixed listen ports from colliding on those ports.

QuantLab's systemd units hard-code their ports (`Environment=OBSERVER_PORT=3000`) and the harness boots them as
they are, so two pytest-xdist workers would both bind 127.0.0.1:3000. Each test process (each xdist worker, or
the single pytest process with -n 0) therefore moves itself into a network namespace of its own before it starts
anything (`isolate_process_network`): its fakes, toxiproxy and the target's services then live inside it, with a
loopback of their own, and fixed ports never meet. Where no namespace can be made (not root, no CAP_SYS_ADMIN,
seccomp, not Linux) the harness falls back to cross-process port locks (`PortLocks`): tests that need the same
fixed port take a file lock per port and so never overlap.

Namespaces belong to threads, not processes: unshare moves only the calling thread, and what it creates
afterwards (threads, subprocesses). Call `isolate_process_network` on the thread that runs the tests (pytest's
main thread, e.g. from pytest_configure) before any server thread, socket or subprocess exists; what already runs
stays in the old namespace and cannot reach the new loopback.

Inside a namespace only its own loopback exists: nothing on the host's 127.0.0.1 (Docker's published ports, a
TOXIPROXY_URL or --s3-url server started outside the test process) is reachable from it.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from quantlab_chaos.errors import HarnessError, MissingToolError

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFF_RUNNING = 0x40
IFREQ_FLAGS = "16sH14s"  # struct ifreq: interface name, then ifr_flags in the union
NAMESPACE = "namespace"
PORT_LOCKS = "port-locks"
ENV_SWITCH = "QUANTLAB_CHAOS_NETNS"
OFF_VALUES = frozenset({"0", "false", "no", "off"})
PROBE_TIMEOUT_S = 5.0
LOCK_POLL_S = 0.05
LOCK_POLL_MAX_S = 0.25
FALLBACK = "tests that need the same fixed port are serialised with port locks"


@dataclass(frozen=True)
class NetworkIsolation:
    """How this test process keeps fixed ports apart from other test processes; printed in the run header.

    mode: "namespace" (a network namespace of its own; port locks are not needed) or "port-locks".
    reason: one sentence saying why this mode, for the run header.
    namespace: the namespace's name ("net:[4026532xxx]") in namespace mode, else None.
    """

    mode: str
    reason: str
    namespace: str | None = None

    @property
    def isolated(self) -> bool:
        return self.mode == NAMESPACE

    def describe(self) -> str:
        return f"network isolation: {self.mode} - {self.reason}"


_isolation: NetworkIsolation | None = None  # describes this process, not a test: set once, kept for its life
_isolation_guard = threading.Lock()


def current_isolation() -> NetworkIsolation | None:
    """What `isolate_process_network` did in this process, or None when it was not called yet."""
    return _isolation


def isolate_process_network(enabled: bool = True, why_not: str = "") -> NetworkIsolation:
    """Moves the calling thread (and all it starts later) into a new network namespace with loopback up.

    Idempotent per process: the first result is kept and returned by later calls, whatever their arguments, and
    they never unshare again (a second namespace would strand what already runs in the first). Never raises: when
    no namespace can be made it returns port-locks mode, with the error, and the caller serialises fixed ports
    with `PortLocks`. `enabled=False` (`why_not` says why, for the header; see `host_network_reason`), or
    QUANTLAB_CHAOS_NETNS=0 in the environment, turns isolation off.
    """
    global _isolation
    with _isolation_guard:
        if _isolation is None:
            _isolation = _isolate(enabled, why_not)
        return _isolation


def host_network_reason(s3_backend: str | None, toxiproxy_backend: str | None,
                        toxiproxy_bin: str | None = None) -> str:
    """Why this run's parts must stay on the host's network ("" when nothing does).

    A namespace has only its own loopback, so a server at an S3 URL, a toxiproxy that already runs (TOXIPROXY_URL)
    or a container on an engine that is not local would be out of reach from inside one. A local engine's
    containers join the test process's namespace (harness.fakes.containers), so Docker backends keep isolation.
    """
    remote = "" if _containers_join_namespaces() else f"on the Docker engine at {os.environ.get('DOCKER_HOST')}, which "
    if s3_backend == "minio" and remote:
        return f"--s3-backend minio runs S3 in a Docker container {remote}is not local: it is on another network"
    if s3_backend == "url":
        return "--s3-backend url uses an S3 server outside the test process, on the host's network"
    if toxiproxy_backend == "container" and remote:
        return f"--toxiproxy-backend container runs toxiproxy in a Docker container {remote}is not local: it is on another network"
    if toxiproxy_backend is None and os.environ.get("TOXIPROXY_URL"):
        return "TOXIPROXY_URL points at a toxiproxy that already runs, on the host's network"
    if toxiproxy_backend is None and remote and not _toxiproxy_binary_found(toxiproxy_bin):
        return f"no toxiproxy-server binary was found, so toxiproxy would run in a Docker container {remote}is not local"
    return ""


def _containers_join_namespaces() -> bool:
    from harness.fakes.containers import host_network_usable  # imported here: children importing this module stay light

    return host_network_usable()


def run_isolation(s3_backend: str | None, toxiproxy_backend: str | None, toxiproxy_bin: str | None = None) -> str:
    """What keeps parallel environments apart in this run, as each test process will decide it; for the run header.

    Asks without changing the caller (the CLI, the xdist controller): the namespace is tried in a forked child.
    """
    reason = host_network_reason(s3_backend, toxiproxy_backend, toxiproxy_bin)
    if reason:
        return f"port locks: network isolation turned off ({reason}); {FALLBACK}"
    switch = os.environ.get(ENV_SWITCH, "").strip().lower()
    if switch in OFF_VALUES:
        return f"port locks: network isolation turned off ({ENV_SWITCH}={switch}); {FALLBACK}"
    supported, why = probe_namespace_support()
    if supported:
        return "network namespaces: each test process (xdist worker) has its own, with its fakes and toxiproxy inside"
    return f"port locks: no network namespace could be made ({why}); {FALLBACK}"


def _toxiproxy_binary_found(explicit: str | None) -> bool:
    from harness.fakes.toxiproxy import find_server_binary  # imported here: children importing this module stay light

    try:
        find_server_binary(explicit)
    except MissingToolError:
        return False
    return True


def probe_namespace_support(timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(True, how) when a network namespace with loopback up can be made here, else (False, why).

    Tries in a forked child, so the caller's namespace never changes; for the CLI's run header, before any
    worker starts. The child only makes syscalls and exits, which is safe even after forking a threaded process.
    """
    unshare_net, why = _unshare_function()
    if unshare_net is None:
        return False, why
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns about fork in a threaded process; the child only syscalls
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        code, step = 1, "unshare"
        try:
            unshare_net()
            step = "bringing loopback up"
            _loopback_up()
            code = 0
        except BaseException as exc:  # noqa: BLE001 - the child reports every failure through the pipe
            os.write(write_fd, f"{step}: {_os_error_text(exc)}".encode("utf-8", "replace")[:512])
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        status = _wait_child(pid, timeout)
        message = _read_all(read_fd)
    finally:
        os.close(read_fd)
    if status is None:
        return False, f"the namespace probe did not finish within {timeout:.1f} s and was killed"
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return True, "unshare(CLONE_NEWNET) and bringing loopback up work here"
    return False, message or f"the namespace probe failed ({_describe_status(status)})"


class PortLocks:
    """Holds an exclusive cross-process lock per fixed port while a test uses those ports (port-locks mode).

    In namespace mode it does nothing: the test process's ports are its own. Otherwise it flocks
    `<lock_dir>/port-<N>.lock` for each distinct port, in ascending order so two holders of overlapping sets
    never deadlock, polling until `timeout`. `isolation=None` (isolation unknown) takes the locks.
    A flock belongs to an open file, so the same process taking the same port twice waits for itself:
    do not nest PortLocks on one port. Lock files are left in place: deleting one while another process waits
    on it would let two holders lock two different files of the same name.
    """

    def __init__(self, ports: Iterable[int], *, isolation: NetworkIsolation | None, timeout: float = 900.0,
                 lock_dir: Path | None = None, what: str = "") -> None:
        self.ports: tuple[int, ...] = tuple(sorted({_checked_port(port) for port in ports}))
        self.isolation = isolation
        self.timeout = timeout
        self.lock_dir = lock_dir if lock_dir is not None else default_lock_dir()
        self.what = what
        self.waited_s = 0.0  # how long __enter__ waited for other holders, for reports
        self._held: list[int] = []

    @property
    def active(self) -> bool:
        """True when this process needs the locks (no namespace of its own)."""
        return not (self.isolation is not None and self.isolation.isolated)

    def lock_file(self, port: int) -> Path:
        return self.lock_dir / f"port-{port}.lock"

    def __enter__(self) -> PortLocks:
        if not self.active or not self.ports:
            return self
        started = time.monotonic()
        deadline = started + self.timeout
        try:
            self.lock_dir.mkdir(parents=True, exist_ok=True)
            for port in self.ports:
                self._held.append(self._acquire(port, deadline, started))
        except BaseException:
            self._release()
            raise
        finally:
            self.waited_s = time.monotonic() - started
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._release()

    def _acquire(self, port: int, deadline: float, started: float) -> int:
        path = self.lock_file(port)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise HarnessError(
                f"Cannot open the port lock file {path} ({exc.strerror}). Make {self.lock_dir} writable for this "
                "user, or run as root so each test process gets a network namespace and needs no port locks."
            ) from exc
        interval = LOCK_POLL_S
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if now >= deadline:
                        raise self._timeout_error(port, path, now - started) from None
                    time.sleep(min(interval, deadline - now))
                    interval = min(interval * 2, LOCK_POLL_MAX_S)
            _write_holder(fd, self.what)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _timeout_error(self, port: int, path: Path, waited: float) -> HarnessError:
        holder = _read_holder(path)
        holder_text = f" (it was last taken by {holder})" if holder else ""
        for_what = f" for {self.what}" if self.what else ""
        return HarnessError(
            f"Port {port} is still locked by another test process after waiting {waited:.1f} s{for_what}: "
            f"this process has no network namespace of its own, so tests that need the same fixed port take turns. "
            f"Run as root (or with CAP_SYS_ADMIN) so each test process gets its own network namespace, or lower -n, "
            f"or look for a stray process holding the lock file {path}{holder_text}, e.g. with 'fuser -v {path}'."
        )

    def _release(self) -> None:
        while self._held:
            fd = self._held.pop()
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def default_lock_dir() -> Path:
    """Shared by every test process on this host, so all of them see each other's port locks."""
    return Path(tempfile.gettempdir()) / "quantlab-chaos-port-locks"


# -- namespace ----------------------------------------------------------------------------------------------

def _isolate(enabled: bool, why_not: str) -> NetworkIsolation:
    if not enabled:
        return NetworkIsolation(PORT_LOCKS, f"network isolation turned off ({why_not or 'enabled=False'}); {FALLBACK}")
    switch = os.environ.get(ENV_SWITCH, "").strip().lower()
    if switch in OFF_VALUES:
        return NetworkIsolation(PORT_LOCKS, f"network isolation turned off ({ENV_SWITCH}={switch}); {FALLBACK}")
    unshare_net, why = _unshare_function()
    if unshare_net is None:
        return _no_namespace(why)
    original = _open_namespace()
    try:
        try:
            unshare_net()
        except OSError as exc:
            return _no_namespace(f"unshare: {_os_error_text(exc)}")
        try:
            _loopback_up()
        except OSError as exc:
            return _back_to(original, f"bringing loopback up failed: {_os_error_text(exc)}")
    finally:
        if original is not None:
            os.close(original)
    namespace = namespace_name() or "net:[unknown]"
    return NetworkIsolation(NAMESPACE, f"each test process has its own network namespace ({namespace})", namespace)


def _no_namespace(why: str) -> NetworkIsolation:
    return NetworkIsolation(PORT_LOCKS, f"no network namespace could be made ({why}); {FALLBACK}")


def _back_to(original: int | None, why: str) -> NetworkIsolation:
    """A namespace without loopback is useless: return to the original one, and say if even that failed."""
    if original is None:
        stranded = "the original namespace could not be reopened, so this thread stays without loopback"
        return _no_namespace(f"{why}; {stranded}")
    try:
        _setns(original)
    except OSError as exc:
        return _no_namespace(f"{why}; returning to the original namespace failed too: {_os_error_text(exc)}")
    return _no_namespace(why)


def namespace_name() -> str | None:
    """The calling thread's network namespace ("net:[4026531840]"), or None when /proc does not tell."""
    for path in ("/proc/thread-self/ns/net", f"/proc/self/task/{threading.get_native_id()}/ns/net"):
        with contextlib.suppress(OSError):
            return os.readlink(path)
    return None


def _open_namespace() -> int | None:
    for path in ("/proc/thread-self/ns/net", f"/proc/self/task/{threading.get_native_id()}/ns/net"):
        with contextlib.suppress(OSError):
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    return None


def _unshare_function() -> tuple[Callable[[], None] | None, str]:
    """(a callable that unshares the network namespace or raises OSError, "") or (None, why there is none)."""
    if not sys.platform.startswith("linux"):
        return None, f"network namespaces need Linux, this is {sys.platform}"
    if hasattr(os, "unshare"):  # Python 3.12+
        return (lambda: os.unshare(CLONE_NEWNET)), ""
    libc = _libc()
    if libc is None or not hasattr(libc, "unshare"):
        return None, "this C library has no unshare()"

    def unshare_net() -> None:
        if libc.unshare(CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return unshare_net, ""


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    libc = _libc()
    if libc is None or not hasattr(libc, "setns"):
        raise OSError(errno.ENOSYS, "this C library has no setns()")
    if libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _loopback_up() -> None:
    """A new namespace's loopback is down: set IFF_UP|IFF_RUNNING on "lo" (what `ip link set lo up` does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(IFREQ_FLAGS, b"lo", 0, b"")
        _, flags, _ = struct.unpack(IFREQ_FLAGS, fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack(IFREQ_FLAGS, b"lo", flags | IFF_UP | IFF_RUNNING, b""))


def _os_error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# -- probe child --------------------------------------------------------------------------------------------

def _wait_child(pid: int, timeout: float) -> int | None:
    """The child's wait status, or None after killing and reaping it when it outlives `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)


def _read_all(fd: int) -> str:
    """What the exited child wrote: the pipe's writers are all closed, so reads end at EOF."""
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace").strip()


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


# -- lock files ---------------------------------------------------------------------------------------------

def _checked_port(port: int) -> int:
    if not 0 < int(port) < 65536:
        raise HarnessError(f"Port {port} is not a TCP port; PortLocks takes ports from 1 to 65535.")
    return int(port)


def _write_holder(fd: int, what: str) -> None:
    """Says in the lock file who holds it, so a timed-out waiter can name the holder."""
    text = f"pid {os.getpid()}" + (f" for {what}" if what else "")
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode("utf-8", "replace")[:300], 0)


def _read_holder(path: Path) -> str:
    try:
        return " ".join(path.read_text(encoding="utf-8", errors="replace").split())[:300]
    except OSError:
        return ""
