"""The Node preload sends a target's hard-coded exchange URL to a local server, for every way of opening a socket."""
from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.server import ServerConnection, serve

from harness.fakes.node import PRELOAD_PATH, node_options_with_preload, url_map_env

TWIN_MODULES = Path(__file__).resolve().parents[1] / "reference" / "quantlab" / "node_modules"
HARD_CODED = "wss://fstream.binance.com/stream?streams=btcusdt@aggTrade"

ESM_CLIENT = """
import WebSocket from 'ws';
const ws = new WebSocket(process.argv[2]);
ws.on('message', (m) => { console.log(String(m)); ws.close(); });
ws.on('error', (e) => { console.log('ERROR ' + e.message); });
"""
CJS_CLIENT = """
const { WebSocket } = require('ws');
const ws = new WebSocket(new URL(process.argv[2]));
ws.on('message', (m) => { console.log(String(m)); ws.close(); });
ws.on('error', (e) => { console.log('ERROR ' + e.message); });
"""
GLOBAL_CLIENT = """
const ws = new globalThis.WebSocket(process.argv[2]);
ws.onmessage = (m) => { console.log(String(m.data)); ws.close(); };
ws.onerror = () => { console.log('ERROR global'); };
"""


@pytest.fixture()
def exchange() -> Iterator[str]:
    def greet(connection: ServerConnection) -> None:
        assert connection.request is not None  # the handler runs after the opening handshake
        connection.send(f"hello {connection.request.path}")

    with serve(greet, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
        server.shutdown()


@pytest.fixture()
def client_dir(tmp_path: Path) -> Path:
    (tmp_path / "node_modules").symlink_to(TWIN_MODULES)
    (tmp_path / "esm.mjs").write_text(ESM_CLIENT)
    (tmp_path / "cjs.cjs").write_text(CJS_CLIENT)
    (tmp_path / "global.mjs").write_text(GLOBAL_CLIENT)
    return tmp_path


def _run(client: Path, url: str, env_extra: dict[str, str], node_flags: tuple[str, ...] = ()) -> str:
    env = {**os.environ, **env_extra}
    done = subprocess.run(
        ["node", *node_flags, str(client), url],
        env=env, cwd=client.parent, capture_output=True, text=True, timeout=20,
    )
    return done.stdout.strip() + done.stderr.strip()


@pytest.mark.parametrize("client", ["esm.mjs", "cjs.cjs"])
def test_ws_package_is_redirected(client_dir: Path, exchange: str, client: str) -> None:
    env = {"NODE_OPTIONS": node_options_with_preload(""), **url_map_env({"wss://fstream.binance.com": exchange})}
    assert _run(client_dir / client, HARD_CODED, env) == "hello /stream?streams=btcusdt@aggTrade"


def test_global_websocket_is_redirected(client_dir: Path, exchange: str) -> None:
    env = {"NODE_OPTIONS": node_options_with_preload(""), **url_map_env({"wss://fstream.binance.com": exchange})}
    out = _run(client_dir / "global.mjs", HARD_CODED, env, ("--experimental-websocket",))
    assert out.endswith("hello /stream?streams=btcusdt@aggTrade")


def test_without_the_preload_the_hard_coded_host_is_used(client_dir: Path, exchange: str) -> None:
    env = {"NODE_OPTIONS": "", **url_map_env({"wss://fstream.binance.com": exchange})}
    assert _run(client_dir / "esm.mjs", "wss://fstream.binance.invalid/ws/x", env).startswith("ERROR")


def test_unmapped_urls_pass_through(client_dir: Path, exchange: str) -> None:
    env = {"NODE_OPTIONS": node_options_with_preload(""), **url_map_env({"wss://other.example": "ws://127.0.0.1:9"})}
    assert _run(client_dir / "esm.mjs", exchange + "/ws/direct", env) == "hello /ws/direct"


def test_a_malformed_map_is_reported_not_fatal(client_dir: Path, exchange: str) -> None:
    env = {"NODE_OPTIONS": node_options_with_preload(""), "QUANTLAB_CHAOS_URL_MAP": "{not json"}
    out = _run(client_dir / "esm.mjs", exchange + "/ws/x", env)
    assert "QUANTLAB_CHAOS_URL_MAP is not valid JSON" in out and "hello /ws/x" in out


def test_existing_node_options_are_kept() -> None:
    merged = node_options_with_preload("--max-old-space-size=256")
    assert merged.startswith("--max-old-space-size=256 ") and str(PRELOAD_PATH) in merged
    assert json.loads(url_map_env({"a": "b"})["QUANTLAB_CHAOS_URL_MAP"]) == {"a": "b"}
