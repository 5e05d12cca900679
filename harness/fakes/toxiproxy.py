"""The real toxiproxy server, its proxies and toxics, driven through its HTTP API (`toxiproxy_api`).

`ToxiproxyServer` finds a server binary (explicit path, TOXIPROXY_BIN, the project's .tools/bin, PATH),
an existing server (TOXIPROXY_URL), or its container (Docker), starts it on a port from the OS, and waits
until its API answers. `ChaosProxy` puts one upstream behind a proxy and applies the faults scenarios need.

The container backend must do what the binary does: proxies listen on ports the harness reaches, and reach
upstreams that listen on the harness's 127.0.0.1. On Linux with a local engine the container shares the caller's
network (harness.fakes.containers: the host's network, or the test process's own namespace, which it joins), so
both hold as they are and the API gets a port from the OS. Elsewhere (Docker Desktop) host networking is not
available: the container runs on the bridge with its API and a pool of proxy ports published on random host ports,
and upstreams on 127.0.0.1 are reached as host.docker.internal. Either way a probe proxy proves the round trip
harness -> proxy -> harness before any test uses the server. The image is built here (harness.fakes.images)
unless the engine has the upstream one. (In bridge mode a
disabled proxy sits behind Docker's port forwarder, which accepts the connection and then closes it: clients see a
reset, not "connection refused". Host networking, the Linux default, has no such difference.)

Each server has an API client of its own (`ToxiproxyServer.api()`, a `ToxiproxyAPI`), so several servers and the
threads of a scenario never mix their calls; a failed call raises `ToxiproxyError`. Importing this module does
nothing but define names.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from harness import reaper
from harness.fakes import containers
from harness.fakes.containers import host_network_usable
from harness.fakes.docker import docker_status
from harness.fakes.images import TOXIPROXY_IMAGE, toxiproxy_image
from harness.fakes.toxiproxy_api import API_TIMEOUT_S, ProxyInfo, ToxicInfo, ToxiproxyAPI, ToxiproxyError
from harness.ports import free_port
from quantlab_chaos import procgroup
from quantlab_chaos.errors import MissingToolError, UnreachableError
from quantlab_chaos.waiting import wait_until

__all__ = ["API_TIMEOUT_S", "CONTAINER_HOST_ALIAS", "ChaosProxy", "ProxyInfo", "TOXIPROXY_BACKENDS", "TOXIPROXY_IMAGE",
           "ToxicInfo",
           "ToxiproxyAPI", "ToxiproxyError", "ToxiproxyServer", "find_server_binary", "host_network_usable"]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_BIN = PROJECT_ROOT / ".tools" / "bin"
TOXIPROXY_BACKENDS = ("binary", "container")
# Bridge mode only: ports inside the container's own network namespace (so fixed numbers cannot clash with
# anything), each published on a host port Docker picks. Two proxies per environment, one environment at a time.
CONTAINER_PROXY_PORTS = tuple(range(20000, 20016))
CONTAINER_HOST_ALIAS = "host.docker.internal"
STOP_GRACE_S = 5.0  # SIGTERM, then this long for the server to exit, then SIGKILL
HOW_TO_GET_IT = (
    "Run 'make bootstrap' (it builds toxiproxy with 'go install github.com/Shopify/toxiproxy/v2/cmd/server@v2.12.0' "
    "into .tools/bin), or put toxiproxy-server on PATH, or pass --toxiproxy-bin PATH, or point TOXIPROXY_URL at a "
    "running server."
)


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


class ToxiproxyServer(AbstractContextManager["ToxiproxyServer"]):
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
        self._published_lock = threading.Lock()  # one pool port per proxy, whichever thread creates them
        self._api: ToxiproxyAPI | None = None
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
            if self._container is not None:
                self._probe_round_trip()
        except BaseException:
            self.close()
            raise
        return self

    def _attach(self, url: str) -> None:
        parts = urlsplit(url)
        self._point_at(parts.hostname or "127.0.0.1", parts.port or 8474)
        self.source = f"TOXIPROXY_URL={url}"
        if not self._answers():
            raise UnreachableError(f"TOXIPROXY_URL is {url}, but no toxiproxy answers there. Start it or unset TOXIPROXY_URL.")

    def _point_at(self, host: str, port: int) -> None:
        """The server's address, and the API client of this server (and of no other) for it."""
        if self._api is not None:
            self._api.close()
        self.host, self.port = host, port
        self._api = ToxiproxyAPI(self.url, timeout=API_TIMEOUT_S)

    def _spawn(self, binary: Path) -> None:
        self._point_at(self.host, free_port())
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
        where = containers.placement()
        image = toxiproxy_image()
        if where in (containers.HOST, containers.JOIN):
            # The caller's network: API on a port from the OS (several xdist workers each run a container),
            # proxies on 127.0.0.1:0 like the binary's.
            self._point_at("127.0.0.1", free_port())
            self._container = containers.new_container(image, [f"-host={self.host}", f"-port={self.port}"], where)
            self._start_container(image)
            self.source = f"container {image} ({'host network' if where == containers.HOST else 'joined this namespace'})"
        else:
            # Docker Desktop defines the alias itself; Linux engines need host-gateway for it.
            self._container = containers.new_container(image, ["-host=0.0.0.0", "-port=8474"], where,
                                                       exposed_ports=(8474, *CONTAINER_PROXY_PORTS),
                                                       extra_hosts={CONTAINER_HOST_ALIAS: "host-gateway"})
            self._start_container(image)
            # Docker Desktop answers "localhost"; the binary's proxies are on 127.0.0.1, and so are these.
            host = self._container.get_container_host_ip()
            self._point_at("127.0.0.1" if host == "localhost" else host, int(self._container.get_exposed_port(8474)))
            self._published = {port: int(self._container.get_exposed_port(port)) for port in CONTAINER_PROXY_PORTS}
            self._upstream_alias = CONTAINER_HOST_ALIAS
            self.source = f"container {image} (bridge, published ports)"
        try:
            wait_until(self._container_ready_or_dead, timeout=60, what=f"toxiproxy container API at {self.url}")
        except TimeoutError:
            pass  # said below, with the container's own words
        if not self._answers():
            raise UnreachableError(
                f"The toxiproxy container ({self.source}) did not answer at {self.url} within 60 s (its output: "
                f"{containers.logs(self._container, 300) or 'none'}). Use --toxiproxy-backend binary (make bootstrap "
                "builds it)."
            )

    def _start_container(self, image: str) -> None:
        """Starts the container held in self._container (held first, so close() removes one that started half-way)."""
        containers.start(self._container, "The toxiproxy container",
                         f"check that Docker can run {image}, or use --toxiproxy-backend binary.")

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
        return self._api is not None and self._api.answers(timeout=1.0)

    def version(self) -> str:
        """The server's version, e.g. "2.12.0" ("git" for a build from source)."""
        return self.api().version()

    def api(self) -> ToxiproxyAPI:
        """The API client of this server: its address is its own, and it may be used from any thread."""
        if self._api is None:
            raise UnreachableError("This toxiproxy server is not running: use it inside 'with ToxiproxyServer() as server:'.")
        return self._api

    def destroy_proxy(self, name: str) -> None:
        """Removes the proxy if it exists (an environment's teardown)."""
        self.api().delete_proxy(name, missing_ok=True)

    def create_proxy(self, name: str, upstream: str) -> ChaosProxy:
        """A proxy on a port from toxiproxy (127.0.0.1:0) in front of upstream `host:port`, replacing any proxy of
        that name."""
        api = self.api()
        api.delete_proxy(name, missing_ok=True)
        if not self._published:
            return ChaosProxy(api, api.create_proxy(name, upstream, listen="127.0.0.1:0"))
        with self._published_lock:
            port = self._free_published_port()
            info = api.create_proxy(name, self._container_upstream(upstream), listen=f"0.0.0.0:{port}")
        return ChaosProxy(api, info, address=(self.host, self._published[port]))

    def _free_published_port(self) -> int:
        """A pool port no proxy listens on (environments destroy their proxies by name, so ask the server)."""
        taken = {proxy.listen_port for proxy in self.api().proxies().values()}
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
        self.api().reset()

    def destroy_all(self) -> None:
        """Removes every proxy of this server."""
        self.api().destroy_all()

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None
        if self._process is not None:
            procgroup.stop(self._process, STOP_GRACE_S)
            reaper.forget(self._process.pid)
        self._process = None
        if self._container is not None:
            containers.remove(self._container)
            self._container = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    """One toxiproxy proxy and the faults a runbook scenario injects through it (any thread may call them)."""

    def __init__(self, api: ToxiproxyAPI, proxy: ProxyInfo, address: tuple[str, int] | None = None) -> None:
        """api: the client of the proxy's server; address: where clients connect when that is not the proxy's own
        listen address (a port the container publishes)."""
        self._api = api
        self.name: str = proxy.name
        self.upstream: str = proxy.upstream
        host, _, port = proxy.listen.rpartition(":")
        self.host = host or "127.0.0.1"
        self.port = int(port)
        if address is not None:
            self.host, self.port = address

    def __repr__(self) -> str:
        return f"ChaosProxy({self.name!r}, {self.listen} -> {self.upstream}, {self._api.url})"

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://{self.listen}"

    def info(self) -> ProxyInfo:
        """What the server says of this proxy now (enabled, toxics)."""
        return self._api.proxy(self.name)

    # connection-level faults
    def disable(self) -> None:
        """Stops listening and drops every open connection: clients see 'connection refused'."""
        self._api.disable(self.name)

    def enable(self) -> None:
        self._api.enable(self.name)

    @contextmanager
    def down(self) -> Iterator[ChaosProxy]:
        self.disable()
        try:
            yield self
        finally:
            self.enable()

    # toxics
    def add_toxic(self, kind: str, *, stream: str = "downstream", name: str | None = None,
                  toxicity: float = 1.0, **attributes: int) -> str:
        toxic_name = name or f"{kind}_{stream}"
        self._api.add_toxic(self.name, kind, name=toxic_name, stream=stream, toxicity=toxicity, attributes=attributes)
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
        self._api.delete_proxy(self.name)

    def remove_toxic(self, name: str) -> None:
        self._api.remove_toxic(self.name, name)

    def toxics(self) -> list[str]:
        return sorted(toxic.name for toxic in self._api.toxics(self.name))

    def clear(self) -> None:
        """Removes every toxic and enables the proxy again."""
        current = self.info()
        for toxic in current.toxics:
            self.remove_toxic(toxic.name)
        if not current.enabled:
            self.enable()
