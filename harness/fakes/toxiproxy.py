"""The real toxiproxy server, its proxies and toxics, driven through toxiproxy-python.

`ToxiproxyServer` finds a server binary (explicit path, TOXIPROXY_BIN, the project's .tools/bin, PATH),
an existing server (TOXIPROXY_URL), or its container (Docker), starts it on a port from the OS, and waits
until its API answers. `ChaosProxy` puts one upstream behind a proxy and applies the faults scenarios need.

The container backend must do what the binary does: proxies listen on ports the harness reaches on this host,
and reach upstreams that listen on this host's 127.0.0.1. On Linux the container shares the host's network
(`network_mode=host`), so both hold as they are and the API gets a port from the OS. Elsewhere (Docker Desktop)
host networking is not available: the container runs on the bridge with its API and a pool of proxy ports
published on random host ports, and upstreams on 127.0.0.1 are reached as host.docker.internal. Either way a
probe proxy proves the round trip host -> proxy -> host before any test uses the server. (In bridge mode a
disabled proxy sits behind Docker's port forwarder, which accepts the connection and then closes it: clients see a
reset, not "connection refused". Host networking, the Linux default, has no such difference.)
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import toxiproxy.api
from toxiproxy import Toxiproxy
from toxiproxy.proxy import Proxy

from harness import reaper
from quantlab_chaos.errors import MissingToolError, UnreachableError
from harness.fakes.docker import docker_status
from harness.ports import free_port
from quantlab_chaos.waiting import wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_BIN = PROJECT_ROOT / ".tools" / "bin"
TOXIPROXY_IMAGE = "ghcr.io/shopify/toxiproxy:2.12.0"
TOXIPROXY_BACKENDS = ("binary", "container")
# Bridge mode only: ports inside the container's own network namespace (so fixed numbers cannot clash with
# anything), each published on a host port Docker picks. Two proxies per environment, one environment at a time.
CONTAINER_PROXY_PORTS = tuple(range(20000, 20016))
CONTAINER_HOST_ALIAS = "host.docker.internal"
API_TIMEOUT_S = 5.0
HOW_TO_GET_IT = (
    "Run 'make bootstrap' (it builds toxiproxy with 'go install github.com/Shopify/toxiproxy/v2/cmd/server@v2.12.0' "
    "into .tools/bin), or put toxiproxy-server on PATH, or pass --toxiproxy-bin PATH, or point TOXIPROXY_URL at a "
    "running server."
)


def _with_timeout(method: Any) -> Any:
    """toxiproxy-python calls requests without a timeout; every API call here gets one."""

    @functools.wraps(method)
    def call(url: str, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", API_TIMEOUT_S)
        return method(url, *args, **kwargs)

    return classmethod(lambda cls, url, *a, **kw: call(url, *a, **kw))


for _verb in ("get", "post", "delete"):
    _original = getattr(toxiproxy.api.APIConsumer, _verb)
    if not getattr(_original, "_quantlab_timeout", False):
        _patched = _with_timeout(_original)
        _patched.__func__._quantlab_timeout = True  # type: ignore[attr-defined]
        setattr(toxiproxy.api.APIConsumer, _verb, _patched)


def find_server_binary(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The toxiproxy-server binary to run; MissingToolError says how to get one."""
    candidates: list[tuple[str, Path | None]] = []
    if explicit:
        candidates.append(("--toxiproxy-bin", Path(explicit)))
    if os.environ.get("TOXIPROXY_BIN"):
        candidates.append(("TOXIPROXY_BIN", Path(os.environ["TOXIPROXY_BIN"])))
    candidates.append(("the project's .tools/bin", PROJECT_BIN / "toxiproxy-server"))
    on_path = shutil.which("toxiproxy-server")
    candidates.append(("PATH", Path(on_path) if on_path else None))
    for source, path in candidates:
        if path is not None and path.is_file() and os.access(path, os.X_OK):
            return path
        if source in ("--toxiproxy-bin", "TOXIPROXY_BIN"):
            raise MissingToolError(f"{source} names {path}, which is not an executable file. {HOW_TO_GET_IT}")
    raise MissingToolError(f"toxiproxy-server was not found. {HOW_TO_GET_IT}")


class ToxiproxyServer(AbstractContextManager):
    """A toxiproxy API endpoint owned for the duration of a `with` block."""

    def __init__(self, binary: str | os.PathLike[str] | None = None, *, log_path: Path | None = None,
                 backend: str | None = None) -> None:
        """backend None: TOXIPROXY_URL, else the binary, else the container when Docker answers;
        "binary" or "container": exactly that one (TOXIPROXY_URL is then ignored)."""
        if backend not in (None, *TOXIPROXY_BACKENDS):
            raise ValueError(f"toxiproxy backend {backend!r}: choose one of {', '.join(TOXIPROXY_BACKENDS)}")
        self._binary = binary
        self._backend = backend
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._container: Any = None
        self._log_file: Any = None
        # bridge mode: container port -> published host port, and the name upstreams on 127.0.0.1 go by
        self._published: dict[int, int] = {}
        self._upstream_alias: str | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.source = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ToxiproxyServer:
        existing = os.environ.get("TOXIPROXY_URL")
        try:
            if self._backend == "binary":
                self._spawn(find_server_binary(self._binary))
            elif self._backend == "container":
                available, reason = docker_status()
                if not available:
                    raise MissingToolError(f"--toxiproxy-backend container needs Docker, but {reason}. Start a Docker "
                                           "engine and run again, or use --toxiproxy-backend binary.")
                self._run_container()
            elif existing:
                self._attach(existing)
            else:
                try:
                    self._spawn(find_server_binary(self._binary))
                except MissingToolError:
                    if not docker_status()[0]:
                        raise
                    self._run_container()
            # toxiproxy-python keeps its API address in class attributes: one server per process at a time.
            Toxiproxy().update_api_consumer(self.host, self.port)
            if self._container is not None:
                self._probe_round_trip()
        except BaseException:
            self.close()
            raise
        return self

    def _attach(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.source = parts.hostname or "127.0.0.1", parts.port or 8474, f"TOXIPROXY_URL={url}"
        if not self._answers():
            raise UnreachableError(f"TOXIPROXY_URL is {url}, but no toxiproxy answers there. Start it or unset TOXIPROXY_URL.")

    def _spawn(self, binary: Path) -> None:
        self.port = free_port()
        self.source = str(binary)
        output: Any = subprocess.DEVNULL
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = output = open(self._log_path, "ab")  # noqa: SIM115 - closed in close()
        self._process = subprocess.Popen(
            [str(binary), "-host", self.host, "-port", str(self.port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=reaper.child_env(),
        )
        reaper.watch(self._process.pid)  # a killed harness must not leave the server (and its proxies' ports) behind
        wait_until(self._ready_or_dead, timeout=15, what=f"toxiproxy API at {self.url}")
        if self._process.poll() is not None:
            raise UnreachableError(
                f"toxiproxy-server ({binary}) exited with code {self._process.returncode} at start; "
                f"see {self._log_path or 'its output'}. Check the binary with '{binary} -version'."
            )

    def _run_container(self) -> None:
        from testcontainers.core.container import DockerContainer

        if host_network_usable():
            # The host's network: API on a port from the OS (several xdist workers each run a container),
            # proxies on 127.0.0.1:0 like the binary's.
            self.host, self.port = "127.0.0.1", free_port()
            container = (DockerContainer(TOXIPROXY_IMAGE)
                         .with_command([f"-host={self.host}", f"-port={self.port}"])
                         .with_kwargs(network_mode="host"))
            self._start_container(container)
            self.source = f"container {TOXIPROXY_IMAGE} (host network)"
        else:
            container = (DockerContainer(TOXIPROXY_IMAGE)
                         .with_command(["-host=0.0.0.0", "-port=8474"])
                         .with_exposed_ports(8474, *CONTAINER_PROXY_PORTS)
                         # Docker Desktop defines the alias itself; Linux engines need host-gateway for it.
                         .with_kwargs(extra_hosts={CONTAINER_HOST_ALIAS: "host-gateway"}))
            self._start_container(container)
            # Docker Desktop answers "localhost"; the binary's proxies are on 127.0.0.1, and so are these.
            self.host = "127.0.0.1" if container.get_container_host_ip() == "localhost" else container.get_container_host_ip()
            self.port = int(container.get_exposed_port(8474))
            self._published = {port: int(container.get_exposed_port(port)) for port in CONTAINER_PROXY_PORTS}
            self._upstream_alias = CONTAINER_HOST_ALIAS
            self.source = f"container {TOXIPROXY_IMAGE} (bridge, published ports)"
        wait_until(self._container_ready_or_dead, timeout=60, what=f"toxiproxy container API at {self.url}")
        if not self._answers():
            stdout, stderr = self._container.get_logs()
            raise UnreachableError(
                f"The toxiproxy container exited at start ({(stdout + stderr).decode(errors='replace').strip()[-300:]}). "
                "Use --toxiproxy-backend binary (make bootstrap builds it)."
            )

    def _start_container(self, container: Any) -> None:
        self._container = container  # held before start(), so close() removes one that started half-way
        try:
            container.start()
        except Exception as exc:  # noqa: BLE001 - docker's errors are many; the user's next step is the same
            raise UnreachableError(
                f"The toxiproxy container did not start ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}); "
                f"check that Docker can pull and run {TOXIPROXY_IMAGE}, or use --toxiproxy-backend binary."
            ) from exc

    def _container_ready_or_dead(self) -> bool:
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        return wrapped.status in ("exited", "dead") or self._answers()

    def _probe_round_trip(self) -> None:
        """Proves the container's proxies are reachable here and reach this host's 127.0.0.1, with one echo."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            listener.settimeout(5)
            echo = threading.Thread(target=_echo_once, args=(listener,), daemon=True)
            echo.start()
            proxy = self.create_proxy("quantlab_chaos_probe", f"127.0.0.1:{listener.getsockname()[1]}")
            try:
                answer = _send_and_receive(proxy.host, proxy.port, b"probe")
            finally:
                proxy.destroy()
                echo.join(timeout=5)
        if answer != b"probe":
            raise UnreachableError(
                f"The toxiproxy container ({self.source}) does not carry traffic between this host and its own "
                f"127.0.0.1 (sent 'probe', got {answer!r}); rootless Docker, a remote DOCKER_HOST or running the "
                "harness inside a container cause this. Use --toxiproxy-backend binary (make bootstrap builds it)."
            )

    def _ready_or_dead(self) -> bool:
        assert self._process is not None
        return self._process.poll() is not None or self._answers()

    def _answers(self) -> bool:
        try:
            return httpx.get(self.url + "/version", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def version(self) -> str:
        return httpx.get(self.url + "/version", timeout=API_TIMEOUT_S).text.strip()

    def api(self) -> Toxiproxy:
        """toxiproxy-python's client, pointed at this server. Its address lives in class attributes shared by the
        whole process, so every call selects its server first (two servers in one process would otherwise mix)."""
        Toxiproxy().update_api_consumer(self.host, self.port)
        return Toxiproxy()

    def destroy_proxy(self, name: str) -> None:
        """Removes the proxy if it exists (an environment's teardown)."""
        existing = self.api().get_proxy(name)
        if existing is not None:
            existing.destroy()

    def create_proxy(self, name: str, upstream: str) -> ChaosProxy:
        """A proxy on a port from toxiproxy (127.0.0.1:0) in front of upstream `host:port`."""
        existing = self.api().get_proxy(name)
        if existing is not None:
            existing.destroy()
        if not self._published:
            return ChaosProxy(self.api().create(upstream=upstream, name=name, listen="127.0.0.1:0"), select=self.api)
        port = self._free_published_port()
        proxy = self.api().create(upstream=self._container_upstream(upstream), name=name, listen=f"0.0.0.0:{port}")
        return ChaosProxy(proxy, address=(self.host, self._published[port]), select=self.api)

    def _free_published_port(self) -> int:
        """A pool port no proxy listens on (environments destroy their proxies by name, so ask the server)."""
        taken = {int(p.listen.rpartition(":")[2]) for p in self.api().proxies().values()}
        for port in CONTAINER_PROXY_PORTS:
            if port not in taken:
                return port
        raise UnreachableError(f"All {len(CONTAINER_PROXY_PORTS)} published proxy ports of the toxiproxy container are "
                               "in use; a test left its proxies behind. Use --toxiproxy-backend binary.")

    def _container_upstream(self, upstream: str) -> str:
        host, _, port = upstream.rpartition(":")
        if self._upstream_alias and host in ("127.0.0.1", "localhost", "::1", "[::1]"):
            return f"{self._upstream_alias}:{port}"
        return upstream

    def reset(self) -> None:
        """Enables every proxy and removes every toxic."""
        httpx.post(self.url + "/reset", timeout=API_TIMEOUT_S).raise_for_status()

    def destroy_all(self) -> None:
        self.api().destroy_all()

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            try:
                os.killpg(self._process.pid, signal.SIGTERM)
                self._process.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self._process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._process.wait(timeout=5)
        if self._process is not None:
            reaper.forget(self._process.pid)
        self._process = None
        if self._container is not None:
            self._container.stop()
            self._container = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __exit__(self, *exc: object) -> None:
        self.close()


def host_network_usable() -> bool:
    """Whether a container on the host network shares this process's 127.0.0.1: Linux and a local engine.

    (Docker Desktop runs containers in a VM, whose host network is not this machine's; a remote DOCKER_HOST is
    another machine. Rootless Docker and a harness inside a container pass this check and fail the probe.)
    """
    if not sys.platform.startswith("linux"):
        return False
    docker_host = os.environ.get("DOCKER_HOST", "")
    return docker_host == "" or docker_host.startswith("unix://")


def _send_and_receive(host: str, port: int, data: bytes) -> bytes:
    try:
        with socket.create_connection((host, port), timeout=5) as client:
            client.settimeout(5)
            client.sendall(data)
            return client.recv(len(data) + 16)
    except OSError as exc:
        return f"error: {exc}".encode()


def _echo_once(listener: socket.socket) -> None:
    try:
        connection, _ = listener.accept()
    except OSError:
        return
    with connection:
        connection.settimeout(5)
        try:
            data = connection.recv(16)
            connection.sendall(data)
        except OSError:
            pass


class ChaosProxy:
    """One toxiproxy proxy and the faults a runbook scenario injects through it."""

    def __init__(self, proxy: Proxy, address: tuple[str, int] | None = None,
                 select: Callable[[], object] | None = None) -> None:
        """address: where clients connect when that is not the proxy's own listen address (a published port);
        select: points toxiproxy-python at this proxy's server before each call (see ToxiproxyServer.api)."""
        self._select = select or (lambda: None)
        self._proxy = proxy
        self.name: str = proxy.name
        self.upstream: str = proxy.upstream
        host, _, port = proxy.listen.rpartition(":")
        self.host = host or "127.0.0.1"
        self.port = int(port)
        if address is not None:
            self.host, self.port = address

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://{self.listen}"

    # connection-level faults
    def disable(self) -> None:
        """Stops listening and drops every open connection: clients see 'connection refused'."""
        self._select()
        self._proxy.disable()

    def enable(self) -> None:
        self._select()
        self._proxy.enable()

    @contextmanager
    def down(self) -> Iterator[ChaosProxy]:
        self.disable()
        try:
            yield self
        finally:
            self.enable()

    # toxics
    def add_toxic(self, kind: str, *, stream: str = "downstream", name: str | None = None,
                  toxicity: float = 1.0, **attributes: Any) -> str:
        toxic_name = name or f"{kind}_{stream}"
        self._select()
        self._proxy.add_toxic(type=kind, stream=stream, name=toxic_name, toxicity=toxicity, attributes=attributes)
        return toxic_name

    def latency(self, ms: int, jitter_ms: int = 0, stream: str = "downstream") -> str:
        return self.add_toxic("latency", stream=stream, latency=ms, jitter=jitter_ms)

    def timeout(self, ms: int = 0, stream: str = "downstream") -> str:
        """Stops all data; with ms=0 the connection is held open forever (a black hole)."""
        return self.add_toxic("timeout", stream=stream, timeout=ms)

    def blackhole(self) -> str:
        """Accepts connections and sends nothing upstream, ever: requests hang until the client gives up.

        (A downstream timeout of 0 makes toxiproxy close the connection at once, which is a reset, not a hole.)
        """
        return self.timeout(0, stream="upstream")

    def reset_peer(self, ms: int = 0, stream: str = "downstream") -> str:
        """Closes connections with a TCP RST after ms."""
        return self.add_toxic("reset_peer", stream=stream, timeout=ms)

    def bandwidth(self, kb_per_s: int, stream: str = "downstream") -> str:
        return self.add_toxic("bandwidth", stream=stream, rate=kb_per_s)

    def slicer(self, average_size: int, size_variation: int = 0, delay_us: int = 0, stream: str = "downstream") -> str:
        return self.add_toxic("slicer", stream=stream, average_size=average_size,
                              size_variation=size_variation, delay=delay_us)

    def limit_data(self, max_bytes: int, stream: str = "downstream") -> str:
        return self.add_toxic("limit_data", stream=stream, bytes=max_bytes)

    def destroy(self) -> None:
        self._select()
        self._proxy.destroy()

    def remove_toxic(self, name: str) -> None:
        self._select()
        self._proxy.destroy_toxic(name)

    def toxics(self) -> list[str]:
        self._select()
        return sorted(self._proxy.toxics())

    def clear(self) -> None:
        """Removes every toxic and enables the proxy again."""
        for name in self.toxics():
            self.remove_toxic(name)
        if not self._proxy.enabled:
            self.enable()
