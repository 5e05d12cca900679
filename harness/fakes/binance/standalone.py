"""The fake exchange on its own: `python -m harness.fakes.binance` (or `quantlab-chaos fake-binance`).

This lives apart from `__main__.py` so the package can re-export `main` without importing its own `__main__`,
which would make `python -m` warn that the module was imported before it ran.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
import threading
from collections.abc import Callable

from harness.fakes.binance.server import DEFAULT_PING_INTERVAL, DEFAULT_RATE, FakeBinance
from quantlab_chaos.errors import UnreachableError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantlab-chaos fake-binance",
        description="Serve fake Binance USDⓈ-M futures market streams until Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 lets the OS pick one (default 0)")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help=f"bookTicker/aggTrade events per second per connection (default {DEFAULT_RATE:g})")
    parser.add_argument("--seed", default="0", help="seed of the per-symbol price walks (default 0)")
    parser.add_argument("--ideal", action="store_true",
                        help="strictly increasing event times across all frames, for debugging")
    parser.add_argument("--ping-interval", type=float, default=DEFAULT_PING_INTERVAL,
                        help=f"seconds between server pings (default {DEFAULT_PING_INTERVAL:g})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Serves until SIGINT/SIGTERM; prints one JSON line with the URL once listening."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.rate < 0 or not math.isfinite(args.rate):
        parser.error("--rate must be a number >= 0")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    seed: int | str = int(args.seed) if re.fullmatch(r"-?\d+", args.seed) else args.seed
    stop = threading.Event()
    restore = _install_stop_handlers(stop)
    try:
        fake = FakeBinance(host=args.host, port=args.port, rate=args.rate, seed=seed, ideal=args.ideal,
                           ping_interval=args.ping_interval or None)
        try:
            fake.start()
        except UnreachableError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        try:
            print(json.dumps({"event": "fake_binance", "status": "listening", "url": fake.url, "host": args.host,
                              "port": fake.port, "rate": args.rate, "seed": seed, "ideal": args.ideal}),
                  flush=True)
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            fake.stop()
    finally:
        restore()
    return 0


def _install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM set `stop`; returns a function restoring the previous handlers (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
