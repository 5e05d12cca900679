"""What the canary tests share: writing a config and an env file, and running `python -m canary` as a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from quantlab_chaos.envfile import EnvFile, write_env_file

PROJECT = Path(__file__).resolve().parents[1]


# canary/strategies/steady.js alternates BUY and SELL, and crossing the spread makes most round trips lose, so
# QuantLab's loss-streak guard stops a run with it now and then. The tests' canary only ever buys: no realised
# loss, so no guard fires, and one decision every 4th event is plenty for the min_decisions guard.
CALM_STRATEGY = """\
export default class AccumulateStrategy {
  constructor() { this.seen = 0; this.symbols = new Set(); }
  onEvent(event) {
    this.seen += 1;
    const first = !this.symbols.has(event.symbol);
    this.symbols.add(event.symbol);
    if (!first && this.seen % 4 !== 0) return null;
    return { symbol: event.symbol, side: 'BUY', qty: 0.001 };
  }
}
"""


def calm_strategy(folder: Path) -> Path:
    path = folder / "accumulate.mjs"
    path.write_text(CALM_STRATEGY)
    return path


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_toml(path: Path, config: Mapping[str, Mapping[str, Any]]) -> Path:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class CanaryRun:
    code: int
    stdout: str
    stderr: str
    duration_s: float

    def json(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self.stdout)
        return report

    def checks(self) -> dict[str, dict[str, Any]]:
        return {check["name"]: check for check in self.json()["checks"]}

    def output(self) -> str:
        return self.stdout + self.stderr


def run_canary_cli(args: Sequence[str], *, env_file: Path | None = None, extra_env: Mapping[str, str] | None = None,
                   timeout: float = 120) -> CanaryRun:
    """`python -m canary ARGS` with a clean environment plus the env file's values, as systemd's EnvironmentFile= gives."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    if env_file is not None:
        env.update(EnvFile.read(env_file).values)
    env.update(extra_env or {})
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "canary", *args], cwd=PROJECT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    return CanaryRun(result.returncode, result.stdout, result.stderr, time.monotonic() - started)


def assert_no_secrets(secrets: Sequence[str], *texts: str) -> None:
    for secret in secrets:
        for text in texts:
            assert secret not in text, "a secret leaked into the canary's output"


@dataclass
class Webhook:
    """A local HTTP server that records every POST body."""

    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)


@contextmanager
def webhook_server() -> Iterator[Webhook]:
    hook = Webhook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
            hook.raw.append(body)
            hook.bodies.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


__all__ = ["CanaryRun", "Webhook", "assert_no_secrets", "calm_strategy", "run_canary_cli", "webhook_server", "write_env_file",
           "write_toml"]
