"""The real toxiproxy server, its proxies and toxics, driven through toxiproxy-python.

`ToxiproxyServer` finds a server binary (explicit path, TOXIPROXY_BIN, the project's .tools/bin, PATH),
an existing server (TOXIPROXY_URL), or its container (Docker), starts it on a port from the OS, and waits
until its API answers. `ChaosProxy` puts one upstream behind a proxy and applies the faults scenarios need.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import toxiproxy.api
from toxiproxy import Toxiproxy
from toxiproxy.proxy import Proxy

from harness.errors import MissingToolError, UnreachableError
from harness.fakes.docker import docker_status
from harness.ports import free_port, wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_BIN = PROJECT_ROOT / ".tools" / "bin"
TOXIPROXY_IMAGE = "ghcr.io/shopify/toxiproxy:2.12.0"
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

    def __init__(self, binary: str | os.PathLike[str] | None = None, *, log_path: Path | None = None) -> None:
        self._binary = binary
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._container: Any = None
        self._log_file: Any = None
        self.host = "127.0.0.1"
        self.port = 0
        self.source = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ToxiproxyServer:
        existing = os.environ.get("TOXIPROXY_URL")
        try:
            if existing:
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
        )
        wait_until(self._ready_or_dead, timeout=15, what=f"toxiproxy API at {self.url}")
        if self._process.poll() is not None:
            raise UnreachableError(
                f"toxiproxy-server ({binary}) exited with code {self._process.returncode} at start; "
                f"see {self._log_path or 'its output'}. Check the binary with '{binary} -version'."
            )

    def _run_container(self) -> None:
        from testcontainers.core.container import DockerContainer

        container = DockerContainer(TOXIPROXY_IMAGE).with_exposed_ports(8474).with_kwargs(network_mode="host")
        self._container = container.start()
        self.host = container.get_container_host_ip()
        self.port = 8474
        self.source = f"container {TOXIPROXY_IMAGE}"
        wait_until(self._answers, timeout=60, what=f"toxiproxy container API at {self.url}")

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

    def create_proxy(self, name: str, upstream: str) -> ChaosProxy:
        """A proxy on a port from toxiproxy (127.0.0.1:0) in front of upstream `host:port`."""
        existing = Toxiproxy().get_proxy(name)
        if existing is not None:
            existing.destroy()
        return ChaosProxy(Toxiproxy().create(upstream=upstream, name=name, listen="127.0.0.1:0"))

    def reset(self) -> None:
        """Enables every proxy and removes every toxic."""
        httpx.post(self.url + "/reset", timeout=API_TIMEOUT_S).raise_for_status()

    def destroy_all(self) -> None:
        Toxiproxy().destroy_all()

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
        self._process = None
        if self._container is not None:
            self._container.stop()
            self._container = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChaosProxy:
    """One toxiproxy proxy and the faults a runbook scenario injects through it."""

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self.name: str = proxy.name
        self.upstream: str = proxy.upstream
        host, _, port = proxy.listen.rpartition(":")
        self.host = host or "127.0.0.1"
        self.port = int(port)

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://{self.listen}"

    # connection-level faults
    def disable(self) -> None:
        """Stops listening and drops every open connection: clients see 'connection refused'."""
        self._proxy.disable()

    def enable(self) -> None:
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

    def remove_toxic(self, name: str) -> None:
        self._proxy.destroy_toxic(name)

    def toxics(self) -> list[str]:
        return sorted(self._proxy.toxics())

    def clear(self) -> None:
        """Removes every toxic and enables the proxy again."""
        for name in self.toxics():
            self.remove_toxic(name)
        if not self._proxy.enabled:
            self.enable()
