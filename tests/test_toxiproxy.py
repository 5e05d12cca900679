"""The real toxiproxy server: each fault provably changes traffic."""
from __future__ import annotations

import functools
import http.server
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from harness.fakes.s3 import MotoS3
from harness.fakes.toxiproxy import ChaosProxy, ToxiproxyAPI, ToxiproxyError, ToxiproxyServer, find_server_binary
from harness.ports import free_port
from quantlab_chaos.errors import HarnessError, MissingToolError


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
    assert server.version() and "{" not in server.version()  # "2.12.0", or "git" for a build from source


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


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_bandwidth_and_slicer_slow_a_large_body(server: ToxiproxyServer, tmp_path: Path) -> None:
    body = b"x" * 20_000
    (tmp_path / "big").write_bytes(body)
    handler = functools.partial(_QuietFiles, directory=str(tmp_path))
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
    from harness.ports import free_port
    from quantlab_chaos.errors import UnreachableError

    monkeypatch.setenv("TOXIPROXY_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UnreachableError, match="unset TOXIPROXY_URL"):
        with ToxiproxyServer():
            pass


# ------------------------------------------------------------------------------------------- the API client


def test_two_servers_used_from_a_thread_pool_each_get_only_their_own_calls(upstream: str) -> None:
    """toxiproxy-python kept one server address for the whole process: interleaved calls for two servers went to
    whichever was selected last. Each client now has its own address, whatever thread calls it."""
    rounds = 12
    with ToxiproxyServer(backend="binary") as first, ToxiproxyServer(backend="binary") as second:
        servers = {"first": first, "second": second}

        def work(tag: str, index: int) -> str:
            mine, theirs = servers[tag], servers["second" if tag == "first" else "first"]
            name = f"{tag}_{index}"
            proxy = mine.create_proxy(name, upstream)
            proxy.latency(10 + index)
            proxy.reset_peer(stream="upstream")
            assert proxy.toxics() == ["latency_downstream", "reset_peer_upstream"]
            assert mine.api().get_toxic(name, "latency_downstream").attributes["latency"] == 10 + index
            proxy.disable()
            assert mine.api().proxy(name).enabled is False
            assert theirs.api().get_proxy(name) is None  # never on the other server
            assert all(other.startswith(tag) for other in mine.api().proxies())
            proxy.clear()
            assert proxy.info().enabled and proxy.info().toxics == ()
            return name

        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(work, tag, index) for index in range(rounds) for tag in servers]
            done = [future.result(timeout=60) for future in futures]
        assert len(done) == 2 * rounds
        for tag, server in servers.items():
            assert sorted(server.api().proxies()) == sorted(f"{tag}_{index}" for index in range(rounds))
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda server: server.destroy_all(), servers.values()))
        assert first.api().proxies() == {} and second.api().proxies() == {}


def test_a_proxy_name_that_exists_is_refused_with_toxiproxys_words(server: ToxiproxyServer, upstream: str) -> None:
    server.create_proxy("taken_name", upstream)
    try:
        with pytest.raises(ToxiproxyError) as caught:
            server.api().create_proxy("taken_name", upstream)
        error = caught.value
        assert (error.status, error.message, error.proxy, error.method) == (409, "proxy already exists", "taken_name", "POST")
        assert "'taken_name'" in str(error) and "HTTP 409: proxy already exists" in str(error)
        assert isinstance(error, HarnessError) and not isinstance(error, httpx.HTTPError)
    finally:
        server.destroy_proxy("taken_name")


def test_toxics_on_a_missing_proxy_and_twice_the_same_toxic_are_refused(server: ToxiproxyServer, proxy: ChaosProxy) -> None:
    expected = r"toxic 'latency_downstream' of proxy 'no_such_proxy'.*HTTP 404: proxy not found"
    with pytest.raises(ToxiproxyError, match=expected) as missing:
        server.api().add_toxic("no_such_proxy", "latency", attributes={"latency": 100})
    assert (missing.value.status, missing.value.message, missing.value.proxy) == (404, "proxy not found", "no_such_proxy")
    proxy.latency(100)
    with pytest.raises(ToxiproxyError, match=rf"of proxy '{proxy.name}'.*HTTP 409: toxic already exists") as twice:
        proxy.latency(200)
    assert twice.value.toxic == "latency_downstream"
    with pytest.raises(ToxiproxyError, match="HTTP 400: invalid toxic type"):
        proxy.add_toxic("no_such_kind")
    with pytest.raises(ToxiproxyError, match="HTTP 404: toxic not found"):
        proxy.remove_toxic("never_added")
    assert server.api().get_proxy("no_such_proxy") is None
    server.destroy_proxy("no_such_proxy")  # a teardown's removal of what is already gone is no error


def test_a_server_that_is_gone_or_silent_is_a_toxiproxy_error_not_an_httpx_one() -> None:
    with ToxiproxyAPI(f"http://127.0.0.1:{free_port()}") as gone:
        assert not gone.answers()
        expected = r"gave no answer to DELETE /proxies/some%20proxy for proxy 'some proxy'"
        with pytest.raises(ToxiproxyError, match=expected) as caught:
            gone.delete_proxy("some proxy")
        assert caught.value.status is None and "ConnectError" in caught.value.message
    with socket.socket() as silent:  # accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        with ToxiproxyAPI(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3) as api:
            started = time.monotonic()
            with pytest.raises(ToxiproxyError, match=r"no answer within 0.3 s"):
                api.proxies()
            assert time.monotonic() - started < 3


def test_importing_the_module_runs_nothing_and_needs_no_toxiproxy_library() -> None:
    code = ("import sys, harness.fakes.toxiproxy; "
            "assert not [m for m in sys.modules if m == 'toxiproxy' or m.startswith('toxiproxy.')], sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
