"""MinIO and toxiproxy in Docker containers: the same scenarios pass on them where Docker answers, and without
Docker the harness says so (skips with the reason, or refuses on the command line with what to do)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import reaper
from harness.fakes import containers, images
from harness.fakes.docker import docker_status
from harness.fakes.s3 import MinioS3
from harness.fakes.toxiproxy import CONTAINER_HOST_ALIAS, ToxiproxyServer, host_network_usable
from harness.isolation import current_isolation
from harness.target import PROJECT_ROOT
from quantlab_chaos.errors import MissingToolError
from quantlab_chaos.waiting import wait_until

DOCKER, WHY_NOT = docker_status()
needs_docker = pytest.mark.skipif(not DOCKER, reason=WHY_NOT)
# A socket nobody listens on: the harness must behave as on a machine without Docker, wherever this runs.
NO_DOCKER_ENV = {"DOCKER_HOST": "unix:///nonexistent/quantlab-chaos-no-docker.sock"}
CONTAINERS = ["--s3-backend", "minio", "--toxiproxy-backend", "container"]


# Starts both container backends, says which containers and which reaper, and waits to be killed.
OWNER = """
import json, sys, time
from harness import reaper
from harness.fakes.s3 import MinioS3
from harness.fakes.toxiproxy import ToxiproxyServer
s3, toxiproxy = MinioS3().__enter__(), ToxiproxyServer(backend="container").__enter__()
ids = [s3._container.get_container_id(), toxiproxy._container.get_container_id()]
with open(sys.argv[1] + ".tmp", "w") as out:
    json.dump({"ids": ids, "reaper": reaper.REAPER.pid}, out)
import os; os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _inspect(container_id: str) -> dict[str, Any] | None:
    """The engine's account of a container, or None when it has none."""
    status, body = reaper.docker_request(containers.docker_host(), "GET", f"/containers/{container_id}/json")
    found: dict[str, Any] | None = json.loads(body) if status == 200 else None
    return found


def _orphans() -> list[str]:
    """Containers of this machine whose owner is gone (on the engine that the other tests share)."""
    engine, here = containers.docker_host(), containers.host_identity()
    found = reaper.labelled_containers(engine, f"{containers.OWNER_HOST_LABEL}={here}")
    return [str(c["Id"]) for c in found if isinstance(labels := c.get("Labels"), dict)
            and reaper.start_time(int(labels[containers.OWNER_PID_LABEL])) != labels[containers.OWNER_START_LABEL]]


def _start_owner(tmp_path: Path) -> tuple[subprocess.Popen[bytes], list[str], int]:
    """A process owning an S3 and a toxiproxy container: (it, the containers' ids, its reaper's pid)."""
    said = tmp_path / "owner.json"
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(said)], cwd=PROJECT_ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: said.is_file() or owner.poll() is not None, timeout=90, what="the owner's containers")
    except TimeoutError:
        owner.kill()
        raise
    if not said.is_file():
        raise AssertionError(f"the owner exited: {owner.communicate()[1].decode()[-2000:]}")
    facts = json.loads(said.read_text())
    return owner, facts["ids"], facts["reaper"]


def _kill(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


# ------------------------------------------------------------------------------------------- with Docker


@needs_docker
@pytest.mark.timeout(900)
def test_scenarios_pass_on_the_s3_and_toxiproxy_containers(tmp_path: Path) -> None:
    """The scenarios that run on moto and the toxiproxy binary pass on the containers: `quantlab-chaos run` from this
    test process (in a network namespace of its own, where it can make one), so its containers join that namespace."""
    done = _cli("run", "--only", "failure:s3-archive-unreachable", "--only", "failure:live-ws-disabled", "-n", "1",
                *CONTAINERS, "--reports", str(tmp_path), timeout=880)
    assert (tmp_path / "summary.json").is_file(), done.stdout[-3000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    statuses = {row["id"]: row["outcome"] for row in summary["items"] if row["id"].startswith("failure:")}
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert statuses == {"failure:s3-archive-unreachable": "pass", "failure:live-ws-disabled": "pass"}
    # None left behind (another test may leave an orphan for a moment, for its owner's reaper or its sweep).
    wait_until(lambda: not _orphans(), timeout=30, what="no container whose owner is gone")


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
    isolation = current_isolation()
    with ToxiproxyServer(backend="container") as server:
        # This test process's own namespace, where it has one: the container joins it, as the binary would be in it.
        assert server.source.startswith("container") and server.version() == "2.12.0"
        if isolation is not None and isolation.isolated:
            assert "joined this namespace" in server.source
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


@needs_docker
def test_every_container_is_labelled_and_a_killed_owner_leaves_none(tmp_path: Path) -> None:
    owner, ids, _ = _start_owner(tmp_path)
    try:
        for container_id in ids:
            found = _inspect(container_id)
            assert found is not None and found["State"]["Running"], container_id
            labels = found["Config"]["Labels"]
            assert labels[reaper.OWNER_LABEL].startswith(f"{owner.pid}-")
            assert labels[containers.OWNER_PID_LABEL] == str(owner.pid)
            assert labels[containers.OWNER_HOST_LABEL] == containers.host_identity()
    finally:
        _kill(owner)
    # Its reaper saw the pipe close and removed them.
    wait_until(lambda: all(_inspect(container_id) is None for container_id in ids), timeout=30,
               what="the killed owner's containers removed")


@needs_docker
def test_the_sweep_removes_containers_whose_owner_and_reaper_are_gone(tmp_path: Path) -> None:
    # A living owner's container first (its start sweeps this engine once, before there is anything to sweep).
    with ToxiproxyServer(backend="container") as alive:
        owner, ids, reaper_pid = _start_owner(tmp_path)
        try:
            os.kill(reaper_pid, signal.SIGKILL)  # the reaper first: nothing removes them when the owner dies
        finally:
            _kill(owner)
        time.sleep(1)
        assert all(_inspect(container_id) is not None for container_id in ids)
        removed = containers.sweep_dead_owners(containers.docker_host(), force=True)
        assert set(ids) <= set(removed)  # and any other test's orphan of the moment
        assert all(_inspect(container_id) is None for container_id in ids)
        assert alive.version() == "2.12.0", "a living owner's container stays"


@needs_docker
def test_the_images_are_built_here_once_per_content() -> None:
    tag = images.ensure_image("toxiproxy")
    assert tag.startswith(f"{images.REPOSITORY}/toxiproxy:")
    images._built.clear()  # as a new process finds it: the engine has this content's tag, nothing is built
    started = time.perf_counter()
    assert images.ensure_image("toxiproxy") == tag
    assert time.perf_counter() - started < 5
    assert images.TOXIPROXY_SERVER.key() == (images.BIN_DIR / ".toxiproxy-server.stamp").read_text()


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
