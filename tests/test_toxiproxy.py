"""The real toxiproxy server: each fault provably changes traffic."""
from __future__ import annotations

import functools
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from quantlab_chaos.errors import MissingToolError
from harness.fakes.s3 import MotoS3
from harness.fakes.toxiproxy import ChaosProxy, ToxiproxyServer, find_server_binary


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with MotoS3() as server:
        yield server.endpoint_url.removeprefix("http://")


@pytest.fixture(scope="module")
def server() -> Iterator[ToxiproxyServer]:
    with ToxiproxyServer() as toxiproxy:
        yield toxiproxy


@pytest.fixture()
def proxy(server: ToxiproxyServer, upstream: str, request: pytest.FixtureRequest) -> Iterator[ChaosProxy]:
    chaos = server.create_proxy(f"s3_{request.node.name[:40]}", upstream)
    yield chaos
    server.reset()


def _get(proxy: ChaosProxy, timeout: float = 3.0) -> httpx.Response:
    return httpx.get(proxy.url() + "/", timeout=timeout)


def test_server_answers_on_an_allocated_port(server: ToxiproxyServer) -> None:
    assert server.port not in (0, 8474)
    assert "version" in server.version()


def test_clean_proxy_passes_traffic(proxy: ChaosProxy) -> None:
    assert _get(proxy).status_code == 200


def test_disabled_proxy_refuses_and_enable_restores_the_same_port(proxy: ChaosProxy) -> None:
    port = proxy.port
    with proxy.down():
        with pytest.raises(httpx.ConnectError):
            _get(proxy)
    assert proxy.port == port
    assert _get(proxy).status_code == 200


def test_latency_delays_responses(proxy: ChaosProxy) -> None:
    started = time.monotonic()
    _get(proxy)
    baseline = time.monotonic() - started
    proxy.latency(400)
    started = time.monotonic()
    _get(proxy)
    assert time.monotonic() - started >= baseline + 0.35


def test_reset_peer_cuts_connections(proxy: ChaosProxy) -> None:
    proxy.reset_peer()
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        _get(proxy)


def test_blackhole_accepts_but_never_answers(proxy: ChaosProxy) -> None:
    proxy.blackhole()
    with socket.create_connection((proxy.host, proxy.port), timeout=2):
        pass  # the connection is accepted...
    with pytest.raises(httpx.ReadTimeout):
        _get(proxy, timeout=0.8)  # ...and nothing comes back


def test_limit_data_closes_after_n_bytes(proxy: ChaosProxy) -> None:
    proxy.limit_data(20)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        _get(proxy)


def test_bandwidth_and_slicer_slow_a_large_body(server: ToxiproxyServer, tmp_path: Path) -> None:
    body = b"x" * 20_000
    (tmp_path / "big").write_bytes(body)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        proxy = server.create_proxy("big_body", f"127.0.0.1:{web.server_address[1]}")
        try:
            assert httpx.get(proxy.url() + "/big", timeout=3).content == body
            proxy.bandwidth(20)  # 20 KB/s: 20 KB take about a second
            started = time.monotonic()
            assert httpx.get(proxy.url() + "/big", timeout=5).content == body
            assert time.monotonic() - started >= 0.7
            proxy.clear()
            proxy.slicer(average_size=64, delay_us=20)
            started = time.monotonic()
            assert httpx.get(proxy.url() + "/big", timeout=5).content == body
            assert proxy.toxics() == ["slicer_downstream"]
            assert time.monotonic() - started < 5
        finally:
            web.shutdown()
            server.reset()


def test_reset_removes_toxics_and_enables(server: ToxiproxyServer, proxy: ChaosProxy) -> None:
    proxy.latency(1000)
    proxy.disable()
    server.reset()
    assert proxy.toxics() == []
    assert _get(proxy, timeout=0.9).status_code == 200


def test_missing_binary_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TOXIPROXY_BIN", raising=False)
    with pytest.raises(MissingToolError, match="make bootstrap"):
        find_server_binary(tmp_path / "no-such-toxiproxy")


def test_bad_toxiproxy_url_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantlab_chaos.errors import UnreachableError
    from harness.ports import free_port

    monkeypatch.setenv("TOXIPROXY_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UnreachableError, match="unset TOXIPROXY_URL"):
        with ToxiproxyServer():
            pass
