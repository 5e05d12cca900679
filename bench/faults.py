"""Part 3, fault injection: from the toxiproxy call to the first refused or cut connection a client sees.

A client streams frames from the fake exchange through a toxiproxy proxy; the clock starts just before the API
call and stops when the client's connection ends (cut) or a connection attempt is refused. Kinds:
- `disable_cut`: proxy disabled, an open connection is cut;
- `disable_refused`: proxy disabled, a client that keeps connecting is refused;
- `reset_peer`: a reset_peer toxic (timeout 0) on the streaming connection;
- `exchange_drop` (no toxiproxy): the fake exchange's own drop_connections(), for comparison.
"""
from __future__ import annotations

import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench.common import Goal, PartResult, fmt, median, ratio, say
from harness.fakes.binance import FakeBinance, streams_for
from harness.fakes.toxiproxy import ChaosProxy, ToxiproxyServer

FAULT_GOAL_MS = 50.0
TOXIPROXY_KINDS = ("disable_cut", "disable_refused", "reset_peer")
SEEN_TIMEOUT_S = 10.0
STREAM_RATE = 200.0  # frames per second on the streaming connection, as a live feed would keep it busy


def run(trials: int = 5) -> PartResult:
    part = PartResult("faults")
    samples: dict[str, list[dict[str, float]]] = {kind: [] for kind in (*TOXIPROXY_KINDS, "exchange_drop")}
    with ToxiproxyServer() as toxiproxy, FakeBinance(rate=STREAM_RATE, seed="bench-faults", ping_interval=None) as exchange, \
            _sink() as sink_port:
        tag = uuid.uuid4().hex[:8]
        stream_proxy = toxiproxy.create_proxy(f"bench_stream_{tag}", f"{exchange.host}:{exchange.port}")
        sink_proxy = toxiproxy.create_proxy(f"bench_sink_{tag}", f"127.0.0.1:{sink_port}")
        try:
            url = f"ws://{stream_proxy.listen}/stream?streams={'/'.join(streams_for(['BTCUSDT']))}"
            direct = exchange.combined_url(streams_for(["BTCUSDT"]))
            for _ in range(trials):  # interleaved, so a noisy moment hits every kind alike
                samples["disable_cut"].append(_cut(url, stream_proxy.disable, after=stream_proxy.enable))
                samples["disable_refused"].append(_refused(sink_proxy))
                samples["reset_peer"].append(_cut(url, lambda: stream_proxy.reset_peer(0),
                                                  after=lambda: stream_proxy.clear()))
                samples["exchange_drop"].append(_cut(direct, exchange.drop_connections))
        finally:
            for proxy in (stream_proxy, sink_proxy):
                _destroy(proxy)
    raw: dict[str, Any] = {}
    for kind, runs in samples.items():
        raw[kind] = {"seen_ms_median": median(r["seen_ms"] for r in runs), "seen_ms_max": max(r["seen_ms"] for r in runs),
                     "call_ms_median": median(r["call_ms"] for r in runs), "trials": len(runs),
                     "seen_ms": [r["seen_ms"] for r in runs]}
        say(f"{kind}: seen by the client {fmt(raw[kind]['seen_ms_median'])} ms after the call (median of {len(runs)}, "
            f"max {fmt(raw[kind]['seen_ms_max'])} ms; the call itself {fmt(raw[kind]['call_ms_median'])} ms)")
    part.raw = raw
    slowest = max(TOXIPROXY_KINDS, key=lambda kind: raw[kind]["seen_ms_median"])
    part.ratios = {
        **{f"{kind}_vs_goal": ratio(raw[kind]["seen_ms_median"], FAULT_GOAL_MS) for kind in TOXIPROXY_KINDS},
        **{f"{kind}_call_share": ratio(raw[kind]["call_ms_median"], raw[kind]["seen_ms_median"]) for kind in TOXIPROXY_KINDS},
        "disable_cut_vs_exchange_drop": ratio(raw["disable_cut"]["seen_ms_median"], raw["exchange_drop"]["seen_ms_median"]),
    }
    part.goals = [Goal("faults.toxiproxy_to_client_ms", f"toxiproxy call to client-seen fault (slowest kind: {slowest})",
                       raw[slowest]["seen_ms_median"], FAULT_GOAL_MS, "ms", "max",
                       note=f"median of {trials} trials per kind; "
                            f"max over all {max(raw[k]['seen_ms_max'] for k in TOXIPROXY_KINDS):.1f} ms")]
    part.notes.append(f"disable: the client sees the cut {fmt(raw['disable_cut']['seen_ms_median'])} ms and the refusal "
                      f"{fmt(raw['disable_refused']['seen_ms_median'])} ms after the call starts, against "
                      f"{fmt(raw['disable_cut']['call_ms_median'])} ms for the API call itself: toxiproxy drops the "
                      "connections before it answers, so the API round trip bounds it")
    part.notes.append(f"reset_peer acts on the next data through the link: at {STREAM_RATE:g} frames/s that is up to "
                      f"{1000 / STREAM_RATE:g} ms after the call, which bounds its {fmt(raw['reset_peer']['seen_ms_median'])} ms")
    return part


def _cut(url: str, inject: Callable[[], Any], *, after: Callable[[], Any] | None = None) -> dict[str, float]:
    """Opens a streaming client, injects, and times until the client's connection ends."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    ended = threading.Event()
    seen: list[float] = []
    ws = connect(url, open_timeout=5, close_timeout=0.5, ping_interval=None)

    def read() -> None:
        try:
            while True:
                ws.recv(timeout=SEEN_TIMEOUT_S)
        except (ConnectionClosed, OSError, TimeoutError):
            seen.append(time.perf_counter())
            ended.set()

    reader = threading.Thread(target=read, name="bench-fault-reader", daemon=True)
    try:
        ws.recv(timeout=5)  # frames flow through the proxy before the fault
        reader.start()
        started = time.perf_counter()
        inject()
        called = time.perf_counter()
        if not ended.wait(SEEN_TIMEOUT_S):
            raise TimeoutError(f"the client did not see the fault within {SEEN_TIMEOUT_S:.0f} s")
        return {"seen_ms": (seen[0] - started) * 1000, "call_ms": (called - started) * 1000}
    finally:
        ws.close()
        if reader.ident is not None:
            reader.join(timeout=5)
        if after is not None:
            after()


def _refused(proxy: ChaosProxy) -> dict[str, float]:
    """A client connects to the proxy again and again; times from the disable call to its first refusal."""
    refused: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection((proxy.host, proxy.port), timeout=0.5):
                    pass
            except ConnectionRefusedError:
                refused.append(time.perf_counter())
                return
            except OSError:
                pass
            time.sleep(0.0002)

    prober = threading.Thread(target=probe, name="bench-fault-prober", daemon=True)
    try:
        with socket.create_connection((proxy.host, proxy.port), timeout=2):
            pass  # accepting before the fault
        prober.start()
        started = time.perf_counter()
        proxy.disable()
        called = time.perf_counter()
        prober.join(SEEN_TIMEOUT_S)
        if not refused:
            raise TimeoutError(f"no connection was refused within {SEEN_TIMEOUT_S:.0f} s of disabling the proxy")
        return {"seen_ms": (refused[0] - started) * 1000, "call_ms": (called - started) * 1000}
    finally:
        stop.set()
        if prober.ident is not None:
            prober.join(timeout=5)
        proxy.enable()


class _SinkHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5)
        try:
            while self.request.recv(4096):
                pass
        except OSError:
            pass


@contextmanager
def _sink() -> Iterator[int]:
    """A TCP server that accepts and reads until the peer goes: the upstream of the refusal probe's proxy."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SinkHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="bench-sink", daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _destroy(proxy: ChaosProxy) -> None:
    """Removes the bench's proxy (it matters when TOXIPROXY_URL points at a server that outlives the bench)."""
    try:
        proxy.destroy()
    except Exception:  # noqa: BLE001 - best effort at teardown
        pass
