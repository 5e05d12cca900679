"""The fakes' Docker containers: where each sits on the network, who owns it, and that none outlives its owner.

Where (`placement`): a container must listen where the harness's clients connect and reach upstreams on the
harness's 127.0.0.1, as the binaries do. On Linux with a local engine it shares the calling thread's network:
- "host": the calling thread is seen to be on the host's network (that of pid 1): `network_mode=host`.
- "join": any other case: the calling thread is in a network namespace of its own (a test process that made one,
  harness.isolation, or anything it started, such as `quantlab-chaos run` from a test), or pid 1's namespace cannot
  be read to tell. Docker can put a container on the host's network or another container's, never in a namespace
  a process made with unshare(2), so the container starts with no network, mounts the calling thread's namespace
  (/proc/PID/task/TID/ns/net) and the static `netns-exec` (tools/netns-exec/), and joins it before it becomes the
  image's own program. That is right wherever the caller is, the host's network included, and takes CAP_SYS_ADMIN
  in the container.
- "bridge": elsewhere (Docker Desktop, a remote engine): published ports; the backend handles the addresses.

Who: every container is labelled with its owner's reaper mark (`reaper.OWNER_LABEL`), pid, start time and host. The
owner tells its reaper about the engine before it creates a container there, so a SIGKILLed owner's reaper removes
them; and before the first container of a process starts, `sweep_dead_owners` removes those of owners that are gone
(their reaper was killed too, or the machine was). testcontainers' own reaper (Ryuk) is an image to pull, so it
is turned off.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

from harness import reaper
from quantlab_chaos.errors import UnreachableError

HOST, JOIN, BRIDGE = "host", "join", "bridge"
OWNER_PID_LABEL = "quantlab-chaos.owner-pid"
OWNER_START_LABEL = "quantlab-chaos.owner-start"
OWNER_HOST_LABEL = "quantlab-chaos.owner-host"  # where the pid means something: boot id and pid namespace
LAUNCHER = "/.quantlab-chaos/netns-exec"
NETNS = "/.quantlab-chaos/netns"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
_swept: set[str] = set()  # engines swept by this process
_sweep_guard = threading.Lock()


def docker_host() -> str:
    """The engine testcontainers talks to, as a URL (DOCKER_HOST, the docker context, or the default socket)."""
    from testcontainers.core.docker_client import get_docker_host

    found: str | None = get_docker_host()
    return found or DEFAULT_DOCKER_HOST


def host_network_usable() -> bool:
    """Whether a container on the host network shares the host's 127.0.0.1 with us: Linux and a local engine.

    (Docker Desktop runs containers in a VM, whose host network is not this machine's; a remote DOCKER_HOST is
    another machine. Rootless Docker and a harness inside a container pass this check and fail the backends' probes.)
    """
    if not sys.platform.startswith("linux"):
        return False
    configured = os.environ.get("DOCKER_HOST", "")
    return configured == "" or configured.startswith("unix://")


def placement() -> str:
    """HOST, JOIN or BRIDGE for a container started from the calling thread (see the module's docstring)."""
    from harness.isolation import current_isolation, namespace_name

    isolation = current_isolation()
    if not host_network_usable():
        if isolation is not None and isolation.isolated:
            raise UnreachableError(
                f"This test process runs in a network namespace of its own ({isolation.namespace}), which a container "
                f"can join only on a local Linux engine, and DOCKER_HOST is {os.environ.get('DOCKER_HOST', '')!r}. "
                "Point DOCKER_HOST at a local engine, or set QUANTLAB_CHAOS_NETNS=0 (no namespaces) and run again.")
        return BRIDGE
    try:
        on_host = namespace_name() == os.readlink("/proc/1/ns/net")
    except OSError:  # pid 1's namespace is not ours to read (a VM's or sandbox's init): joining is right anyway
        on_host = False
    return HOST if on_host else JOIN


def host_identity() -> str:
    """This machine's boot and pid namespace: an owner pid read from a label means something only where they match."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return "unknown"
    return f"{boot}/{pid_namespace.removeprefix('pid:').strip('[]')}"


def owner_labels() -> dict[str, str]:
    pid = os.getpid()
    return {reaper.OWNER_LABEL: reaper.REAPER.mark, OWNER_PID_LABEL: str(pid),
            OWNER_START_LABEL: reaper.start_time(pid), OWNER_HOST_LABEL: host_identity()}


def new_container(image: str, command: list[str], where: str, *, env: dict[str, str] | None = None,
                  exposed_ports: tuple[int, ...] = (), extra_hosts: dict[str, str] | None = None) -> Any:
    """A testcontainers DockerContainer for `image` with `command` (its entrypoint's arguments), placed `where`,
    labelled for its owner; not started (`start`)."""
    from testcontainers.core.config import testcontainers_config
    from testcontainers.core.container import DockerContainer

    testcontainers_config.ryuk_disabled = True  # Ryuk is an image to pull; our reaper removes what we start
    container = DockerContainer(image).with_command(command)
    for key, value in (env or {}).items():
        container.with_env(key, value)
    kwargs: dict[str, Any] = {"labels": owner_labels()}
    if where == HOST:
        kwargs.update(network_mode="host", network=None)
    elif where == JOIN:
        # No network of Docker's: the launcher moves the program into the caller's namespace before it starts.
        kwargs.update(network_mode="none", network=None, cap_add=["SYS_ADMIN"],
                      entrypoint=[LAUNCHER, NETNS, *_entrypoint(image)])
        container.with_volume_mapping(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net", NETNS, "ro")
        container.with_volume_mapping(str(_launcher()), LAUNCHER, "ro")
    else:
        container.with_exposed_ports(*exposed_ports)
        if extra_hosts:
            kwargs["extra_hosts"] = extra_hosts
    return container.with_kwargs(**kwargs)


def _launcher() -> Path:
    from harness.fakes.images import netns_launcher

    return netns_launcher()


def _entrypoint(image: str) -> list[str]:
    """The image's own entrypoint, which the launcher execs after joining (pulled first when it is not here)."""
    import docker

    client = docker.from_env(timeout=60)
    try:
        try:
            found = client.images.get(image)
        except docker.errors.ImageNotFound:
            found = client.images.pull(image)
        entrypoint: list[str] = list(found.attrs.get("Config", {}).get("Entrypoint") or [])
        return entrypoint
    except docker.errors.APIError as exc:
        raise UnreachableError(f"Docker has no image {image} and cannot pull it ({str(exc)[:200]}).") from exc
    finally:
        client.close()


def start(container: Any, what: str, advice: str) -> None:
    """Starts a container from `new_container` (the caller holds it first, so its close() removes one that started
    half-way); UnreachableError says what failed and what to do."""
    engine = docker_host()
    sweep_dead_owners(engine)
    reaper.watch_engine(engine)  # before it exists: from here on, a SIGKILL of this process leaves no container
    try:
        container.start()
    except Exception as exc:  # docker's errors are many; the user's next step is the same
        first = str(exc).splitlines()[0][:240] if str(exc) else type(exc).__name__
        raise UnreachableError(f"{what} did not start ({first}); {advice}") from exc


def logs(container: Any, limit: int = 400) -> str:
    """The last characters of a container's output, for an error message ("" when there is none to read)."""
    try:
        stdout, stderr = container.get_logs()
    except Exception:  # noqa: BLE001 - only for a message: a container that is gone has nothing to say
        return ""
    text: str = (stdout + stderr).decode(errors="replace").strip()
    return text[-limit:]


def remove(container: Any) -> None:
    """Removes the container (and its anonymous volumes); one that is already gone is fine."""
    import docker

    try:
        container.stop()
    except docker.errors.NotFound:
        pass


def sweep_dead_owners(engine: str, *, force: bool = False) -> list[str]:
    """Removes containers on `engine` whose owner (a process on this machine) is gone; their ids. Once per engine
    and process unless `force`; never raises (an engine that does not answer has nothing to sweep)."""
    with _sweep_guard:
        if engine in _swept and not force:
            return []
        _swept.add(engine)
    here = host_identity()
    try:
        found = reaper.labelled_containers(engine, f"{OWNER_HOST_LABEL}={here}")
    except (OSError, ValueError):
        return []
    removed = []
    for container in found:
        labels = container.get("Labels")
        if not isinstance(labels, dict) or here == "unknown":
            continue
        pid, started = str(labels.get(OWNER_PID_LABEL, "")), str(labels.get(OWNER_START_LABEL, ""))
        if not pid.isdigit() or reaper.start_time(int(pid)) == started:
            continue  # its owner lives
        if reaper.remove_container(engine, str(container["Id"])):
            removed.append(str(container["Id"]))
    return removed
