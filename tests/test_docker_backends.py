"""MinIO and toxiproxy in Docker containers: the same scenarios pass on them where Docker answers, and without
Docker the harness says so (skips with the reason, or refuses on the command line with what to do)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from harness.fakes.docker import docker_status
from harness.fakes.s3 import MinioS3
from harness.fakes.toxiproxy import CONTAINER_HOST_ALIAS, ToxiproxyServer, host_network_usable
from harness.target import PROJECT_ROOT
from quantlab_chaos.errors import MissingToolError

DOCKER, WHY_NOT = docker_status()
needs_docker = pytest.mark.skipif(not DOCKER, reason=WHY_NOT)
# A socket nobody listens on: the harness must behave as on a machine without Docker, wherever this runs.
NO_DOCKER_ENV = {"DOCKER_HOST": "unix:///nonexistent/quantlab-chaos-no-docker.sock"}
CONTAINERS = ["--s3-backend", "minio", "--toxiproxy-backend", "container"]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


# ------------------------------------------------------------------------------------------- with Docker


@needs_docker
def test_scenarios_pass_on_minio_and_the_toxiproxy_container(tmp_path: Path) -> None:
    done = _cli("run", "--only", "failure:s3-archive-unreachable", "--only", "failure:archive-missing", *CONTAINERS,
                "--reports", str(tmp_path), timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text())
    statuses = {row["id"]: row["outcome"] for row in summary["items"] if row["id"].startswith("failure:")}
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert statuses["failure:s3-archive-unreachable"] == "pass" and statuses["failure:archive-missing"] == "pass"


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@needs_docker
def test_container_proxies_carry_host_traffic_and_faults(upstream: str) -> None:
    with ToxiproxyServer(backend="container") as server:
        assert server.source.startswith("container")
        proxy = server.create_proxy("docker_backend_http", upstream)
        assert httpx.get(proxy.url() + "/", timeout=5).text == "hello"
        proxy.latency(400)
        assert httpx.get(proxy.url() + "/", timeout=5).elapsed.total_seconds() >= 0.35
        proxy.clear()
        with proxy.down():
            with pytest.raises(httpx.TransportError):
                httpx.get(proxy.url() + "/", timeout=3)
        assert httpx.get(proxy.url() + "/", timeout=5).status_code == 200


@needs_docker
def test_minio_serves_a_bucket() -> None:
    with MinioS3() as minio:
        bucket = minio.bucket()
        try:
            bucket.put("a/b.json", '{"ok": true}')
            assert bucket.read_json("a/b.json") == {"ok": True}
        finally:
            bucket.delete()


# ------------------------------------------------------------------------------------------- without Docker


@pytest.mark.parametrize("option", [["--s3-backend", "minio"], ["--toxiproxy-backend", "container"]],
                         ids=["minio", "toxiproxy-container"])
def test_without_docker_the_cli_refuses_and_says_what_to_do(option: list[str], tmp_path: Path) -> None:
    done = _cli("run", *option, "--only", "failure:live-ws-disabled", "--reports", str(tmp_path), env=NO_DOCKER_ENV)
    assert done.returncode == 2
    message = done.stderr.strip()
    assert message.startswith(f"quantlab-chaos: {' '.join(option)} runs ") and "\n" not in message
    assert "Start Docker" in message and "which needs no Docker" in message and "Traceback" not in done.stderr
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.skipif(DOCKER, reason="Docker answers here; the container starts instead")
def test_without_docker_the_container_backend_says_what_to_do() -> None:
    with pytest.raises(MissingToolError,
                       match=r"needs Docker, but no Docker engine answers here .* use --toxiproxy-backend binary"):
        with ToxiproxyServer(backend="container"):
            pass


def test_without_docker_the_scenarios_are_skipped_with_the_reason(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", "-q",
         "harness/scenarios/test_failure_live_ws_disabled.py", *CONTAINERS, "--junitxml", str(junit)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, **NO_DOCKER_ENV})
    assert done.returncode == 0, done.stdout[-2000:]
    text = junit.read_text()
    assert "<skipped" in text and "needs Docker: no Docker engine answers here" in text


# ------------------------------------------------------------------------------------------- the container design


def test_host_network_only_with_a_local_engine_on_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert host_network_usable() == sys.platform.startswith("linux")
    monkeypatch.setenv("DOCKER_HOST", "tcp://build-host:2376")
    assert not host_network_usable()


def test_bridge_mode_sends_loopback_upstreams_to_the_host_alias() -> None:
    server = ToxiproxyServer(backend="container")
    server._upstream_alias = CONTAINER_HOST_ALIAS  # what bridge mode sets after starting the container
    assert server._container_upstream("127.0.0.1:9000") == f"{CONTAINER_HOST_ALIAS}:9000"
    assert server._container_upstream("localhost:9000") == f"{CONTAINER_HOST_ALIAS}:9000"
    assert server._container_upstream("s3.example.net:443") == "s3.example.net:443"


def test_unknown_toxiproxy_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="choose one of binary, container"):
        ToxiproxyServer(backend="podman")
