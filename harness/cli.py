"""`quantlab-chaos`: the command line of the harness."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from harness.errors import HarnessError

Command = Callable[[argparse.Namespace], int]


def _fake_binance(args: argparse.Namespace) -> int:
    from harness.fakes import binance

    argv = ["--host", args.host, "--port", str(args.port)]
    if args.rate is not None:
        argv += ["--rate", str(args.rate)]
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    if args.ideal:
        argv.append("--ideal")
    return binance.main(argv)


def _env_up(args: argparse.Namespace) -> int:
    from harness.environment import serve_environment

    return serve_environment(quantlab_root=args.quantlab_root, runbook=args.runbook, s3_backend=args.s3_backend,
                             s3_url=args.s3_url, toxiproxy_bin=args.toxiproxy_bin, services=args.service)


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantlab-root", help="QuantLab checkout (default: QUANTLAB_ROOT, then the twin)")
    parser.add_argument("--runbook", help="runbook markdown (default: <quantlab-root>/docs/runbook.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantlab-chaos", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fake = commands.add_parser("fake-binance", help="serve fake Binance USDⓈ-M futures market streams")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    fake.add_argument("--rate", type=float, help="events per second per connection")
    fake.add_argument("--seed", type=int, help="seed of the price walk")
    fake.add_argument("--ideal", action="store_true", help="strictly increasing event times (for debugging)")
    fake.set_defaults(handler=_fake_binance)

    env = commands.add_parser("env", help="the test environment for manual work")
    env_commands = env.add_subparsers(dest="env_command", required=True, metavar="ACTION")
    up = env_commands.add_parser("up", help="boot S3, toxiproxy, fake exchange and the target's services; Ctrl-C ends")
    _add_target_options(up)
    up.add_argument("--s3-backend", default="moto", choices=("moto", "minio", "url"))
    up.add_argument("--s3-url", help="S3 endpoint for --s3-backend url")
    up.add_argument("--toxiproxy-bin", help="path of toxiproxy-server")
    up.add_argument("--service", action="append", help="start only these services (role or unit; repeatable)")
    up.set_defaults(handler=_env_up)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Command = args.handler
    try:
        return handler(args)
    except HarnessError as exc:
        print(f"quantlab-chaos: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
