"""`quantlab-chaos`: the command line of the harness."""
from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from harness import bytecode
from quantlab_chaos.errors import EXIT_USAGE, ConfigError, HarnessError

if TYPE_CHECKING:
    from pathlib import Path

    from harness.systemd_analyze import UnitAnalysis
    from harness.target import Target
    from quantlab_chaos.runbook import Runbook

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


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.run import run

    return run(quantlab_root=args.quantlab_root, runbook=args.runbook, workers=args.n, only=args.only or [],
               s3_backend=args.s3_backend, s3_url=args.s3_url, toxiproxy_bin=args.toxiproxy_bin, html=args.html,
               reports_dir=Path(args.reports) if args.reports else None, pytest_args=args.pytest_args or [],
               toxiproxy_backend=args.toxiproxy_backend, shard=args.shard,
               durations=Path(args.durations).expanduser().resolve() if args.durations else None)


def _remedy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.remedy.command import remedy
    from harness.run import DEFAULT_REPORTS

    options = {"workers": args.n, "s3_backend": args.s3_backend, "s3_url": args.s3_url,
               "toxiproxy_bin": args.toxiproxy_bin, "toxiproxy_backend": args.toxiproxy_backend}
    return remedy(quantlab_root=args.quantlab_root, runbook=args.runbook,
                  from_dir=_reports_folder(Path(args.from_dir)) if args.from_dir else None,
                  out_dir=Path(args.out).expanduser().resolve() if args.out else None, verify=args.verify,
                  run_options=options, default_reports=DEFAULT_REPORTS)


def _reports_folder(path: Path) -> Path:
    """--from takes a reports folder or the summary.json in it."""
    path = path.expanduser().resolve()
    return path.parent if path.is_file() and path.name == "summary.json" else path


def _report_merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.merge import merge_reports

    return merge_reports([Path(d).expanduser().resolve() for d in args.dirs], Path(args.out).expanduser().resolve(),
                         html=args.html)


def _soak(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.run import DEFAULT_REPORTS
    from harness.soak import soak

    extra = list(args.run_args or [])
    extra += ["--s3-backend", args.s3_backend] if args.s3_backend else []
    extra += ["--toxiproxy-backend", args.toxiproxy_backend] if args.toxiproxy_backend else []
    return soak(runs=args.runs, cpu_pressure_on=args.cpu_pressure, only=args.only or [],
                reports_dir=Path(args.reports) if args.reports else DEFAULT_REPORTS, workers=args.n,
                quantlab_root=args.quantlab_root, runbook=args.runbook, extra_run_args=extra,
                run_timeout_s=args.run_timeout)


def _env_up(args: argparse.Namespace) -> int:
    from harness.environment import serve_environment
    from harness.run import require_programs
    from harness.target import Target

    # What cannot work is refused before anything boots, in one sentence, not as a failed service's journal.
    target = Target.load(args.quantlab_root, args.runbook)
    target.check_units(args.service)
    require_programs(target, args.service)
    return serve_environment(quantlab_root=args.quantlab_root, runbook=args.runbook, s3_backend=args.s3_backend,
                             s3_url=args.s3_url, toxiproxy_bin=args.toxiproxy_bin, services=args.service)


def _runbook_show(args: argparse.Namespace) -> int:
    from harness.target import Target
    from quantlab_chaos.runbook import load_runbook

    path = args.runbook if args.runbook and not args.quantlab_root else Target.load(args.quantlab_root, args.runbook).runbook
    runbook = load_runbook(path)
    print(runbook.to_json() if args.json else format_runbook(runbook))
    return 0


def _runbook_check(args: argparse.Namespace) -> int:
    from harness.drift import check_drift, report
    from harness.target import Target
    from quantlab_chaos.runbook import load_runbook

    target = Target.load(args.quantlab_root, args.runbook)
    runbook = load_runbook(target.runbook)
    drifts = check_drift(runbook, target)
    units = _analysed_units(target)
    if args.json:
        print(json.dumps({**report(drifts, runbook, target), "units": [unit.to_dict() for unit in units]}, indent=2))
    else:
        print(f"runbook {runbook.path} against {target.root}: {len(runbook.items())} items, {len(drifts)} mismatch(es)")
        for drift in drifts:
            print(f"  {drift}")
        if units:
            print("systemd-analyze (verify; security --offline=yes exposure, 0 safe to 10 unsafe):")
        for unit in units:
            exposure = f"exposure {unit.exposure:g} {unit.rating}" if unit.exposure is not None else "no exposure score"
            verdict = "verifies" if unit.verifies else "does not verify: " + " | ".join(unit.complaints)
            print(f"  {unit.unit}: {verdict}; {exposure}")
    return 1 if drifts else 0


def _analysed_units(target: Target) -> list[UnitAnalysis]:
    """systemd-analyze's verify and security on every unit of the checkout; none where systemd is not installed.
    Reported beside the drift, not counted in the exit code: the runbook says nothing about sandboxing."""
    import tempfile
    from pathlib import Path

    from harness import systemd_analyze

    binary = systemd_analyze.tool()
    if binary is None:
        return []
    with tempfile.TemporaryDirectory(prefix="quantlab-units-") as folder:
        return systemd_analyze.analyse(target, Path(folder), binary)


def format_runbook(rb: Runbook) -> str:
    """A readable outline of the runbook model."""
    lines = [f"{rb.title}  ({rb.path})", "", "Items:"]
    lines += [f"  {item.id:<36} line {item.source.line:<4} {item.title}" for item in rb.items()]
    lines += ["", "Units: " + ", ".join(rb.unit_names())]
    lines += ["systemctl: " + ", ".join(sorted({c.action for c in rb.systemctl}))]
    lines += [f"Health: {r.method} {r.url}" for r in rb.health_checks]
    lines += [f"Self-test: {c.text}" for c in rb.self_tests]
    if rb.kill_switch:
        lines.append(f"Kill-switch: {rb.kill_switch.method} {rb.kill_switch.url}")
    if rb.canary:
        lines.append(f"Canary: {rb.canary.text}")
        lines += [f"  expect: {text}" for text, _ in rb.canary_expected]
    lines.append("Failures:")
    for f in rb.failures:
        lines.append(f"  {f.number}) {f.title} [{f.id}]")
        lines.append(f"     symptom: {f.symptom}  codes={list(f.symptom_ids.codes)} statuses={list(f.symptom_ids.http_statuses)}")
        lines.append(f"     fix: {f.fix}  env={list(f.fix_ids.env_names)} values={f.fix_ids.env()} paths={list(f.fix_ids.paths)}")
    lines.append("Break glass:")
    lines += [f"  {s.id}: {s.text}" for s in rb.break_glass]
    lines.append("Safety defaults: " + ", ".join(f"{s.name}={s.value}" for s in rb.unit_directives))
    lines.append("Env limits: " + ", ".join(f"{s.name}={s.value}" for s in rb.env_limits))
    if rb.unknown_sections:
        lines.append("Sections the harness does not know: " + ", ".join(name for name, _ in rb.unknown_sections))
    return "\n".join(lines)


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantlab-root", help="QuantLab checkout (default: QUANTLAB_ROOT, then the twin)")
    parser.add_argument("--runbook", help="runbook markdown (default: <quantlab-root>/docs/runbook.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantlab-chaos", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    main_job = commands.add_parser(
        "run", help="the chaos suite against the target, with reports (the main job)",
        description="Runs every runbook scenario against the target. Each scenario and runbook item ends in one "
                    "outcome: pass; fail (the system does not do what the runbook says); drift (the runbook's text "
                    "disagrees with the units or code); blocked (the steady state could not be reached before any "
                    "fault, naming the item that blocks it); error (the harness itself failed).",
        epilog="Exit codes: 0 every item passed; 1 any item is fail, drift or blocked; 3 any is error (the harness's "
               "own failure); 2 bad input. Reports: summary.md, summary.json, junit.xml, allure-results/.")
    _add_target_options(main_job)
    main_job.add_argument("-n", default=None, help="parallel workers (pytest-xdist; 0 for serial, auto for one per "
                                                    "core); default: what this machine can carry for the scenarios, "
                                                    "from their recorded time, CPU and memory (durations.json)")
    main_job.add_argument("--shard", metavar="K/N", help="run only the K-th of N duration-balanced shards (every "
                                                        "scenario in exactly one; merge with `report merge`)")
    main_job.add_argument("--durations", metavar="FILE",
                          help="durations.json to order and shard by (default: the reports folder's from the run "
                               "before, else the baseline shipped with the scenarios; shards: the baseline)")
    main_job.add_argument("--only", action="append", metavar="ITEM", help="only this runbook item (repeatable)")
    main_job.add_argument("--s3-backend", default="moto", choices=("moto", "minio", "url"))
    main_job.add_argument("--s3-url", help="S3 endpoint for --s3-backend url")
    main_job.add_argument("--toxiproxy-bin", help="path of toxiproxy-server")
    main_job.add_argument("--toxiproxy-backend", choices=("binary", "container"),
                          help="toxiproxy as a binary or in a Docker container (default: the binary, else the "
                               "container when Docker answers)")
    main_job.add_argument("--html", action="store_true", help="also render the allure report as HTML (npm allure 3)")
    main_job.add_argument("--reports", help="reports folder (default: reports/ in this project)")
    main_job.add_argument("--pytest-arg", dest="pytest_args", action="append", help="extra argument for pytest (repeatable)")
    main_job.set_defaults(handler=_run)

    fix = commands.add_parser(
        "remedy", help="what to change for each mismatch (runbook patch, unit drop-ins), and --verify proves it",
        description="Writes REPORTS/remedy/: runbook.patch (the runbook's text made to say what the system does, "
                    "where the text is what is wrong), systemd/<unit>.d/10-runbook-safety.conf (the runbook's safety "
                    "defaults for each unit that lacks them) and REMEDY.md (for every fail, drift and blocked item: "
                    "what is proposed and why, or why nothing is). --verify applies them to copies of the checkout "
                    "and the runbook and reruns the affected items; neither the checkout nor the runbook is changed.",
        epilog="Exit codes: 0 written (with --verify: every proposal verified); 1 with --verify, some proposal is not "
               "verified or not applicable; 3 the rerun itself failed (the harness's error); 2 bad input.")
    _add_target_options(fix)
    fix.add_argument("--from", dest="from_dir", metavar="REPORTS",
                     help="a run's reports folder (its summary.json gives the items' outcomes; its runbook.html and "
                          "summary.md are brought up to date); default: the static check alone")
    fix.add_argument("--out", help="where to write the remedy (default: REPORTS/remedy, or reports/remedy)")
    fix.add_argument("--verify", action="store_true", help="apply the proposals to copies and rerun the affected items")
    fix.add_argument("-n", default="auto", help="parallel workers of the rerun (default auto)")
    fix.add_argument("--s3-backend", default="moto", choices=("moto", "minio", "url"), help="for the rerun")
    fix.add_argument("--s3-url", help="S3 endpoint for --s3-backend url")
    fix.add_argument("--toxiproxy-bin", help="path of toxiproxy-server")
    fix.add_argument("--toxiproxy-backend", choices=("binary", "container"), help="for the rerun")
    fix.set_defaults(handler=_remedy)

    soak_job = commands.add_parser("soak", help="the chaos suite N times; fails listing every test whose outcome differed")
    _add_target_options(soak_job)
    soak_job.add_argument("-N", dest="runs", type=int, default=20, help="how many runs (default 20)")
    soak_job.add_argument("--cpu-pressure", action="store_true", help="one busy loop per core during the whole soak")
    soak_job.add_argument("--only", action="append", metavar="ITEM", help="only this runbook item (repeatable)")
    soak_job.add_argument("--reports", help="folder for soak.json, soak.md and soak/run-NN/ (default: reports/)")
    soak_job.add_argument("-n", default=None, help="parallel workers per run (default: as `run` chooses)")
    soak_job.add_argument("--s3-backend", choices=("moto", "minio", "url"), help="passed on to every run")
    soak_job.add_argument("--toxiproxy-backend", choices=("binary", "container"), help="passed on to every run")
    soak_job.add_argument("--run-timeout", type=float, default=1200.0, help="deadline of one run in seconds (default 1200)")
    soak_job.add_argument("--run-arg", dest="run_args", action="append", metavar="ARG",
                          help="extra argument for every 'quantlab-chaos run' (repeatable; write --run-arg=--flag)")
    soak_job.set_defaults(handler=_soak)

    reports = commands.add_parser("report", help="work on reports: merge the shards of a run")
    report_commands = reports.add_subparsers(dest="report_command", required=True, metavar="ACTION")
    merge = report_commands.add_parser(
        "merge", help="merge the reports of shards (`run --shard K/N`) into one set",
        description="Merges the reports folders of a run's shards into one: summary.json and summary.md with every "
                    "item's outcome computed over all shards, junit.xml, allure-results/, runbook.html, the remedy "
                    "and durations.json. An item whose scenarios were split across shards gets its outcome here.",
        epilog="Exit codes: as `run` over the merged items (0 all pass, 1 fail/drift/blocked, 3 error); 2 bad input "
               "(a folder without summary.json, shards of different targets or runbooks).")
    merge.add_argument("dirs", nargs="+", metavar="DIR", help="each shard's reports folder")
    merge.add_argument("--out", required=True, help="the merged reports folder")
    merge.add_argument("--html", action="store_true", help="also render the merged allure report as HTML")
    merge.set_defaults(handler=_report_merge)

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
    book = commands.add_parser("runbook", help="the runbook model and the drift check")
    book_commands = book.add_subparsers(dest="runbook_command", required=True, metavar="ACTION")
    show = book_commands.add_parser("show", help="print what the harness reads from the runbook")
    _add_target_options(show)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_runbook_show)
    check = book_commands.add_parser("check", help="static drift check of the runbook against the target (exit 1 on drift)")
    _add_target_options(check)
    check.add_argument("--json", action="store_true")
    check.set_defaults(handler=_runbook_check)
    return parser


def restore_default_sigint() -> None:
    """A process started in the background of a non-interactive shell (`cmd &` in a CI script) inherits SIGINT as
    ignored, and Python keeps it so: Ctrl-C or `kill -INT` would then stop neither the harness nor what it started,
    and every child would inherit the deafness. Puts Python's own handler (KeyboardInterrupt) back; a handler that
    someone installed on purpose is left alone."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _check_paths(args: argparse.Namespace) -> None:
    """A folder given where a file belongs is named as such, with the argument to pass instead."""
    from pathlib import Path

    runbook = getattr(args, "runbook", None)
    if runbook and Path(runbook).expanduser().is_dir():
        folder = Path(runbook).expanduser().resolve()
        if (folder / "docs" / "runbook.md").is_file():
            instead = (f"pass the checkout as --quantlab-root {folder} (its docs/runbook.md is read from there), or "
                       f"--runbook {folder / 'docs' / 'runbook.md'}")
        elif (folder / "runbook.md").is_file():
            instead = f"pass --runbook {folder / 'runbook.md'}"
        else:
            instead = "pass the runbook's markdown file itself (QuantLab keeps it at docs/runbook.md in its checkout)"
        raise ConfigError(f"--runbook {runbook} is a folder, not a runbook file: {instead}.")


CHAOS_MODULES = ("pytest", "xdist", "moto", "websockets", "psutil", "allure_pytest", "testcontainers")


def missing_chaos_packages() -> list[str]:
    """The harness's own packages this Python lacks: none in a full install, all of them in the canary's."""
    return [name for name in CHAOS_MODULES if importlib.util.find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    bytecode.use_cache()  # before the harness's modules are imported (harness.bytecode)
    restore_default_sigint()
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = missing_chaos_packages()
    if missing:
        print(f"quantlab-chaos: this install ({sys.executable}) lacks the harness's packages ({', '.join(missing)}): it "
              "is the production canary's install, which runs `python -m canary` only. Install the harness with "
              "`pip install 'quantlab-chaos[chaos]'`, or run bin/quantlab-chaos from a checkout (it makes its own .venv).",
              file=sys.stderr)
        return EXIT_USAGE
    handler: Command = args.handler
    try:
        _check_paths(args)
        return handler(args)
    except HarnessError as exc:
        print(f"quantlab-chaos: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a path the user gave that cannot be read or written (e.g. --reports)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"quantlab-chaos: {where}{exc.strerror or exc}. Check the path and its permissions, then run again.",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
