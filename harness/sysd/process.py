"""One process of a service (its main process, or an ExecStartPre=/ExecStop=... control process): the environment
and working directory systemd would give it, its spawn in a process group of its own, and the capture of its
output into the service's journal.

A process that needs limits (MemoryMax=, MemoryHigh=, CPUQuota=, TasksMax= through a cgroup, LimitNOFILE= as an
rlimit) is spawned behind a gate: a shell that waits on a pipe until it has joined the service's group (every
controller's, under cgroup v1) and has its rlimit, and then execs the real command, so no instruction of the service
runs unconfined. A start step that fails before or while spawning raises StartFailure with systemd's result and
exit status (200/CHDIR, 203/EXEC, 209/STDOUT).
"""
from __future__ import annotations

import dataclasses
import os
import pwd
import resource
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from harness import reaper
from harness.sysd.cgroups import CONTROLLER_OF, ServiceGroup
from harness.sysd.spec import ExecCommand, OutputSpec
from quantlab_chaos.envfile import EnvFile
from quantlab_chaos.errors import UnitError

if TYPE_CHECKING:
    from harness.sysd.service import Service

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READER_JOIN_S = 0.5  # lets the last lines a process printed reach the journal before its exit is handled


class StartFailure(Exception):
    """A start step failed before or while spawning; carries systemd's result and exit status."""

    def __init__(self, result: str, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.result, self.message, self.exit_code = result, message, exit_code


class Tee:
    """StandardOutput=file:/append:/truncate: target, shared by stdout and stderr of one process."""

    def __init__(self, output: OutputSpec) -> None:
        assert output.path is not None
        flags = os.O_WRONLY | os.O_CREAT
        flags |= {"append": os.O_APPEND, "truncate": os.O_TRUNC}.get(output.kind, 0)
        self.fd = os.open(output.path, flags, 0o644)
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        """Appends one line (already redacted by the journal)."""
        with self.lock:
            if self.fd >= 0:
                os.write(self.fd, (text + "\n").encode("utf-8", "replace"))

    def close(self) -> None:
        """Closes the file; later writes are dropped. Safe to call twice."""
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


@dataclass
class Run:
    """One process of a service (main, ExecStartPre, ...) and its capture threads."""

    proc: subprocess.Popen[bytes]
    role: str  # main or control
    env: dict[str, str]
    readers: list[threading.Thread] = field(default_factory=list)
    tees: list[Tee] = field(default_factory=list)
    exited: threading.Event = field(default_factory=threading.Event)
    handled: threading.Event = field(default_factory=threading.Event)  # its exit handler has finished
    returncode: int | None = None
    stopping: bool = False
    registered: bool = False

    @property
    def pid(self) -> int:
        """The process's pid, which is also its process group (it leads a session of its own)."""
        return self.proc.pid


# ---------------------------------------------------------------------------------------------
# Environment, user and working directory
# ---------------------------------------------------------------------------------------------

def user_for(svc: Service) -> pwd.struct_passwd | None:
    """The User= account to run as, or None (and a note saying why) when the harness cannot switch to it."""
    user = svc.spec.user
    if not user:
        return None
    if not svc.host.honour_user:
        svc.note(f"User={user} ignored: the supervisor was told not to switch users")
        return None
    if os.geteuid() != 0:
        svc.note(f"User={user} ignored: the harness is not running as root; the service runs as "
                 f"{pwd.getpwuid(os.geteuid()).pw_name}")
        return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        svc.note(f"User={user} ignored: no such user on this host; the service runs as root")
        return None


def build_env(svc: Service) -> tuple[dict[str, str], pwd.struct_passwd | None]:
    """The environment systemd builds: a base env, then Environment=, then EnvironmentFile= in order; the harness's
    `extra_env` joins the base (the unit may override it) and its `override_env` goes on top of everything."""
    spec = svc.spec
    user = user_for(svc)
    env = {
        "PATH": os.environ.get("PATH", BASE_PATH),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "HOME": user.pw_dir if user else os.environ.get("HOME", "/root"),
    }
    if user:
        env.update(USER=user.pw_name, LOGNAME=user.pw_name, SHELL=user.pw_shell)
    env.update(svc.extra_env)
    env.update(spec.env_dict)
    for ref in spec.environment_files:
        if not ref.path.exists():
            if ref.optional:
                continue
            raise StartFailure("resources", f"EnvironmentFile={ref.path} does not exist; write it before "
                                            f"starting {svc.name} or mark it optional with '-'")
        try:
            env_file = EnvFile.read(ref.path)
        except UnitError as exc:
            raise StartFailure("resources", str(exc)) from None
        for warning in env_file.warnings:
            svc.note(warning)
        env.update(env_file.values)
    env.update(svc.override_env)
    return env, user


def working_directory(svc: Service, env: Mapping[str, str]) -> str:
    """WorkingDirectory= (`~` is the user's home, a missing `-`-prefixed one is `/`); 200/CHDIR when it is missing."""
    spec = svc.spec
    if spec.working_directory_home:
        return env.get("HOME", "/")
    if spec.working_directory is None:
        return "/"
    if spec.working_directory.is_dir():
        return str(spec.working_directory)
    if spec.working_directory_optional:
        svc.note(f"WorkingDirectory=-{spec.working_directory} is missing; the service runs in /")
        return "/"
    raise StartFailure("exit-code", f"200/CHDIR: WorkingDirectory={spec.working_directory} does not exist; "
                                    f"create it or fix the unit", exit_code=200)


def safe_cwd(svc: Service, env: Mapping[str, str]) -> str:
    """The working directory for a stop command: the unit's when it exists, else `/` (a stop must not fail on it)."""
    try:
        return working_directory(svc, env)
    except StartFailure:
        return "/"


def executable(cmd: ExecCommand, env: Mapping[str, str]) -> str:
    """The file to exec: an absolute path as written, a bare name looked up on the service's PATH; else 203/EXEC."""
    if cmd.path.startswith("/"):
        if os.access(cmd.path, os.X_OK) and not os.path.isdir(cmd.path):
            return cmd.path
        raise StartFailure("exit-code", f"203/EXEC: {cmd.path} is not an executable file; install it or "
                                        f"fix the unit's command", exit_code=203)
    found = shutil.which(cmd.path, path=env.get("PATH", BASE_PATH))
    if found is None:
        raise StartFailure("exit-code", f"203/EXEC: {cmd.path} was not found on PATH={env.get('PATH')}; "
                                        f"install it or use an absolute path", exit_code=203)
    return found


# ---------------------------------------------------------------------------------------------
# Spawning
# ---------------------------------------------------------------------------------------------

def spawn(svc: Service, cmd: ExecCommand, env: dict[str, str], cwd: str, user: pwd.struct_passwd | None,
          role: str, on_exit: Callable[[Run], None] | None = None, generation: int | None = None) -> Run:
    """Starts one process of the service. With `generation`, it becomes the service's main or control
    process before anything watches it, so even an instant exit is seen as this service's exit."""
    argv = cmd.expand(env)
    program = executable(cmd, env)
    cgroup = _limits_for_spawn(svc)
    gated = cgroup is not None or svc.spec.limit_nofile is not None
    tees = _open_tees(svc)
    gate_write = None
    try:
        if gated:
            # The child waits in a shell on a pipe until its limits are applied, then execs the
            # real command; so no instruction of the service runs unconfined.
            gate_read, gate_write = os.pipe()
            try:
                proc = _popen(_gated_argv(cmd, argv, program), None, gate_read, env, cwd, user)
            finally:
                os.close(gate_read)
        else:
            proc = _popen(argv, program, subprocess.DEVNULL, env, cwd, user)
    except OSError as exc:
        for tee in tees.values():
            tee.close()
        if gate_write is not None:
            os.close(gate_write)
        who = f" as {user.pw_name}" if user is not None else ""
        raise StartFailure("exit-code", f"203/EXEC: starting {program}{who} in {cwd} failed "
                                        f"({exc.strerror or exc}); check the path and its permissions",
                           exit_code=203) from None
    with svc.host.lock:
        svc.host.pgids.add(proc.pid)
    reaper.watch(proc.pid)  # ended by the reaper if this process dies without closing us
    run = Run(proc=proc, role=role, env=env, tees=list({id(t): t for t in tees.values()}.values()))
    if gate_write is not None:
        try:
            _apply_limits(svc, proc.pid, cgroup)
            if cgroup is not None and role == "main":
                svc.oom_kills_seen = cgroup.oom_kills() or 0  # an OOM kill after this is this run's
        finally:
            os.close(gate_write)  # releases the gate: the shell execs the real command
    run.registered = generation is None or svc.register(generation, run)
    _start_capture(svc, run, tees, on_exit)
    return run


def _popen(args: list[str], program: str | None, stdin: int, env: Mapping[str, str], cwd: str,
           user: pwd.struct_passwd | None) -> subprocess.Popen[bytes]:
    """The process in a session of its own (its pid is its process group), output piped to the journal, carrying
    the owner's mark so the reaper finds it even if the harness dies mid-start."""
    return subprocess.Popen(
        args, executable=program, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=reaper.child_env(env), cwd=cwd, start_new_session=True, close_fds=True,
        user=user.pw_uid if user is not None else None, group=user.pw_gid if user is not None else None,
        extra_groups=os.getgrouplist(user.pw_name, user.pw_gid) if user is not None else None,
    )


def _gated_argv(cmd: ExecCommand, argv: list[str], program: str) -> list[str]:
    if "@" in cmd.prefixes and shutil.which("bash"):
        script = 'read -r _; argv0=$1; shift; exec -a "$argv0" "$@" </dev/null'
        return ["bash", "-c", script, "quantlab-gate", argv[0], program, *argv[1:]]
    return ["/bin/sh", "-c", 'read -r _; exec "$@" </dev/null', "quantlab-gate", program, *argv[1:]]


def _limits_for_spawn(svc: Service) -> ServiceGroup | None:
    """The service's cgroup, its limits written, when they can be enforced; records why not otherwise."""
    limits = svc.limits
    if svc.cgroup_wanted:
        cgroups = svc.host.cgroups
        try:
            group, skipped = cgroups.create(svc.name, svc.spec.cgroup_limits)
        except OSError as exc:
            svc.cgroup, svc.cgroup_wanted = None, False
            svc.limits = dataclasses.replace(limits, enforced=False, cgroup=None, groups=(), files=(),
                                             hierarchy=cgroups.kind,
                                             reason=f"not enforced: creating the {cgroups.kind} group failed ({exc})")
        else:
            svc.cgroup = group
            for directive in skipped:
                svc.note(f"{directive}= not applied: {group.hierarchy} has no {CONTROLLER_OF[directive]} controller "
                         f"the harness may use here")
            svc.limits = dataclasses.replace(
                limits, enforced=True, hierarchy=group.hierarchy, cgroup=str(group.main),
                groups=tuple(str(path) for path in group.paths),
                files=tuple((directive, str(path), value) for directive, path, value in group.written),
                reason=f"enforced through {group.hierarchy} in {group.main}")
    return svc.cgroup


def _apply_limits(svc: Service, pid: int, cgroup: ServiceGroup | None) -> None:
    """Moves the gated process into its group and sets its rlimit, before the gate opens."""
    if cgroup is not None:
        try:
            cgroup.attach(pid)
        except OSError as exc:
            svc.limits = dataclasses.replace(svc.limits, enforced=False,
                                             reason=f"not enforced: moving pid {pid} into {cgroup.main} failed "
                                                    f"({exc})")
    nofile = svc.spec.limit_nofile
    if nofile is not None:
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, nofile)
            svc.limits = dataclasses.replace(svc.limits, nofile_applied=True)
        except (OSError, ValueError) as exc:
            svc.limits = dataclasses.replace(svc.limits, nofile_applied=False)
            svc.note(f"LimitNOFILE={nofile[0]}:{nofile[1]} not applied ({exc})")


def _open_tees(svc: Service) -> dict[str, Tee]:
    """The StandardOutput=/StandardError= files by stream; stderr follows stdout when it is inherit or unset."""
    out, err = svc.spec.standard_output, svc.spec.standard_error
    tees: dict[str, Tee] = {}
    try:
        if out is not None and out.path is not None:
            tees["stdout"] = Tee(out)
        if err is not None and err.path is not None:
            tees["stderr"] = tees["stdout"] if out == err and "stdout" in tees else Tee(err)
        elif (err is None or err.kind == "inherit") and "stdout" in tees:
            tees["stderr"] = tees["stdout"]
    except OSError as exc:
        for tee in tees.values():
            tee.close()
        raise StartFailure("exit-code", f"209/STDOUT: opening the unit's output file failed ({exc}); create "
                                        f"its directory or fix StandardOutput=", exit_code=209) from None
    return tees


# ---------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------

def _start_capture(svc: Service, run: Run, tees: Mapping[str, Tee], on_exit: Callable[[Run], None] | None) -> None:
    streams: tuple[tuple[str, IO[bytes] | None], ...] = (("stdout", run.proc.stdout), ("stderr", run.proc.stderr))
    for stream, pipe in streams:
        assert pipe is not None  # both are subprocess.PIPE
        reader = threading.Thread(target=_pump, args=(svc, run.pid, stream, pipe, tees.get(stream)),
                                  name=f"{svc.name}-{stream}", daemon=True)
        reader.start()
        run.readers.append(reader)
    threading.Thread(target=_reap, args=(svc, run, on_exit), name=f"{svc.name}-reap", daemon=True).start()


def _pump(svc: Service, pid: int, stream: str, pipe: IO[bytes], tee: Tee | None) -> None:
    with pipe:
        for raw in iter(pipe.readline, b""):
            logged = svc.log(raw.decode("utf-8", "replace").rstrip("\r\n"), stream, pid)
            if tee is not None:
                try:
                    tee.write(logged)
                except OSError:
                    pass


def _reap(svc: Service, run: Run, on_exit: Callable[[Run], None] | None) -> None:
    """Waits for the process, lets its last output reach the journal, then hands its exit to `on_exit`."""
    run.returncode = run.proc.wait()
    joined_by = time.monotonic() + READER_JOIN_S
    for reader in run.readers:
        reader.join(max(0.0, joined_by - time.monotonic()))
    for tee in run.tees:
        tee.close()
    run.exited.set()
    with svc.host.changed:
        svc.host.changed.notify_all()
    try:
        if on_exit is not None:
            on_exit(run)
    finally:
        run.handled.set()
