"""`python -m canary`: QuantLab's production canary.

Exit codes: 0 every check passed, 1 a check failed, 2 bad config or usage, 3 the target (observer) is unreachable.
Output is a table, or JSON with --json; every secret the canary holds is masked in anything it prints, writes
or sends. --prom-file writes a textfile for node_exporter's textfile collector (atomically); a configured
webhook is POSTed to when the canary fails.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from canary.checks import CheckResult
from canary.config import CanaryConfig, ConfigProblem, load_config
from canary.runner import Deadline
from canary.suite import CHECK_NAMES, DeadlineExceeded, Suite, plan, runbook_context
from quantlab_chaos import tls
from quantlab_chaos.redact import Redactor

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
METRIC_PREFIX = "quantlab_canary"
# The alarm fires a little after the deadline: everything inside is bounded by the deadline already, the
# alarm only catches what is not (a DNS lookup, a library's own retries).
ALARM_SLACK_S = 1.0


def positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 < seconds <= 86400:
        raise argparse.ArgumentTypeError(f"{value} must be more than 0 and at most 86400 seconds")
    return seconds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m canary", description="Checks a running QuantLab against its runbook. Read-only unless --live.",
        epilog="Exit codes: 0 all passed, 1 a check failed, 2 bad config or usage, 3 target unreachable. "
               "Secrets come from the environment or files named in the config, never from flags.")
    p.add_argument("--config", required=True, type=Path, help="the canary's TOML config file")
    p.add_argument("--check", action="append", choices=CHECK_NAMES, metavar="NAME",
                   help=f"run only this check (repeatable): {', '.join(CHECK_NAMES)}")
    p.add_argument("--live", action="store_true", help="allow the live canary run (starts one run of its own)")
    p.add_argument("--run-id", help="also check the archive and audit entries of this live run")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--prom-file", type=Path, help="write a node_exporter textfile (*.prom) here, atomically")
    p.add_argument("--timeout", type=positive_seconds, help="hard deadline for the whole run in seconds "
                   "(default: [run] timeout_s, 300)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # Started in the background of a non-interactive shell (`cmd &`), SIGINT comes ignored, and so would the live
    # canary's own run inherit it: Python's handler is put back so Ctrl-C or `kill -INT` stops both.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parser().parse_args(argv)  # argparse exits 2 on usage errors
    started = time.time()
    try:
        _check_prom_path(args.prom_file)
        config = load_config(args.config)
        runbook = runbook_context(config)
        names = plan(config, args.check, live=args.live, run_id=args.run_id)
    except ConfigProblem as problem:
        for line in problem.problems:
            print(f"quantlab-canary: {line}", file=sys.stderr)
        if args.prom_file and not _prom_path_problem(args.prom_file):
            write_textfile(args.prom_file, [], EXIT_USAGE, time.time() - started)
        return EXIT_USAGE
    if not config.token:
        print(f"quantlab-canary: the observer token ({config.token_source or 'not configured'}) is empty, so the "
              "observer will answer 401; set it in the canary's env file.", file=sys.stderr)
    results = run_checks(Suite(config, Deadline(args.timeout or config.timeout_s), runbook, args.run_id), names)
    return publish(args, config, results, started, runbook.source)


def run_checks(suite: Suite, names: Sequence[str]) -> list[CheckResult]:
    """The suite under the hard deadline's alarm."""
    with hard_deadline(suite.deadline.seconds + ALARM_SLACK_S):
        try:
            return suite.run(names)
        except DeadlineExceeded:  # the alarm went off between two checks
            return [CheckResult("deadline", False, f"stopped by the hard deadline of {suite.deadline.seconds:g} s",
                                "raise --timeout (or [run] timeout_s)")]


def publish(args: argparse.Namespace, config: CanaryConfig, results: Sequence[CheckResult], started: float,
            runbook_source: str) -> int:
    """Prints the report, writes the textfile and sends the alert; returns the exit code."""
    code = exit_code(results)
    duration = time.time() - started
    redact = Redactor(config.secrets())
    report = report_dict(config, results, code, started, duration, runbook_source)
    print(redact(json.dumps(report, indent=2, default=str) if args.json else render_table(report)))
    if args.prom_file:
        try:
            write_textfile(args.prom_file, results, code, duration)
        except OSError as exc:
            print(f"quantlab-canary: cannot write {args.prom_file} ({exc.strerror or exc}); make its folder writable "
                  "by the canary's user.", file=sys.stderr)
            code = code or EXIT_USAGE
    if code != EXIT_OK and config.webhook_url:
        send_alert(config, report, redact)
    return code


def exit_code(results: Sequence[CheckResult]) -> int:
    if any(result.unreachable for result in results):
        return EXIT_UNREACHABLE
    return EXIT_OK if results and all(result.ok for result in results) else EXIT_FAILED


@contextmanager
def hard_deadline(seconds: float) -> Iterator[None]:
    """SIGALRM after `seconds` raises DeadlineExceeded in the main thread, wherever it is waiting."""
    def expire(signum: int, frame: Any) -> None:
        raise DeadlineExceeded()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- output -----------------------------------------------------------------------------------------------


def report_dict(config: CanaryConfig, results: Sequence[CheckResult], code: int, started: float, duration: float,
                runbook_source: str) -> dict[str, Any]:
    return {
        "event": "quantlab_canary",
        "status": "PASS" if code == EXIT_OK else "UNREACHABLE" if code == EXIT_UNREACHABLE else "FAIL",
        "exit_code": code,
        "observer_url": public_url(config.observer_url),
        "fixes_from": runbook_source,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "duration_s": round(duration, 3),
        "passed": sum(1 for r in results if r.ok),
        "failed": sum(1 for r in results if not r.ok),
        "checks": [r.to_dict() for r in results],
    }


def render_table(report: dict[str, Any]) -> str:
    checks = report["checks"]
    width = max([len("CHECK")] + [len(c["name"]) for c in checks])
    lines = [f"QuantLab canary against {report['observer_url']} ({report['duration_s']:.1f} s)",
             f"{'CHECK':<{width}}  {'RESULT':<11}  {'TIME':>7}  DETAIL"]
    indent = " " * (width + 2 + 11 + 2 + 7 + 2)
    for check in checks:
        result = "PASS" if check["ok"] else "UNREACHABLE" if check["unreachable"] else "FAIL"
        lines.append(f"{check['name']:<{width}}  {result:<11}  {check['duration_s']:>6.2f}s  {check['message']}")
        if not check["ok"] and check["fix"]:
            lines.append(f"{indent}fix: {check['fix']}")
        if not check["ok"] and check["runbook_item"]:
            lines.append(f"{indent}runbook: {check['runbook_item']}")
    verdict = {EXIT_OK: "all checks passed", EXIT_FAILED: "a check failed",
               EXIT_UNREACHABLE: "the target is unreachable"}[report["exit_code"]]
    lines.append(f"{report['status']}: {report['passed']} passed, {report['failed']} failed; {verdict} (exit {report['exit_code']})")
    return "\n".join(lines)


def public_url(url: str) -> str:
    """The URL without user info or query, which may carry credentials."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# -- the textfile -----------------------------------------------------------------------------------------


def _prom_path_problem(path: Path) -> str | None:
    if path.suffix != ".prom":
        return f"--prom-file {path} must end in .prom: node_exporter's textfile collector reads only *.prom files."
    if not path.parent.is_dir():
        return f"--prom-file {path}: the folder {path.parent} does not exist; create it (node_exporter's textfile directory)."
    if not os.access(path.parent, os.W_OK):
        return f"--prom-file {path}: the folder {path.parent} is not writable by this user; grant it write access."
    return None


def _check_prom_path(path: Path | None) -> None:
    problem = _prom_path_problem(path) if path else None
    if problem:
        raise ConfigProblem([problem])


def write_textfile(path: Path, results: Sequence[CheckResult], code: int, duration: float) -> None:
    """The run's metrics for node_exporter; written to a temporary file and renamed, so a scrape never sees half."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    now = time.time()
    last_success = now if code == EXIT_OK else previous_last_success(path)
    Gauge(f"{METRIC_PREFIX}_success", "1 when every canary check passed, else 0", registry=registry).set(int(code == EXIT_OK))
    Gauge(f"{METRIC_PREFIX}_exit_code", "exit code of the last canary run (0 ok, 1 failed, 2 config, 3 unreachable)",
          registry=registry).set(code)
    Gauge(f"{METRIC_PREFIX}_duration_seconds", "wall time of the last canary run", registry=registry).set(round(duration, 3))
    Gauge(f"{METRIC_PREFIX}_last_run_timestamp_seconds", "when the last canary run finished (Unix time)",
          registry=registry).set(now)
    Gauge(f"{METRIC_PREFIX}_last_success_timestamp_seconds", "when a canary run last passed (Unix time; 0 never)",
          registry=registry).set(last_success)
    per_check = Gauge(f"{METRIC_PREFIX}_check_success", "1 when the check passed, else 0", ["check"], registry=registry)
    per_duration = Gauge(f"{METRIC_PREFIX}_check_duration_seconds", "wall time of the check", ["check"], registry=registry)
    for result in results:
        per_check.labels(check=result.name).set(int(result.ok))
        per_duration.labels(check=result.name).set(result.duration_s)
    write_to_textfile(str(path), registry)


def previous_last_success(path: Path) -> float:
    """The last success time carried over from the previous textfile, so a failing run does not erase it."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        families = list(text_string_to_metric_families(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return 0.0
    for family in families:
        for sample in family.samples:
            if sample.name == f"{METRIC_PREFIX}_last_success_timestamp_seconds":
                return float(sample.value)
    return 0.0


# -- the alert --------------------------------------------------------------------------------------------


def alert_payload(report: dict[str, Any]) -> dict[str, Any]:
    """What the webhook gets: the verdict and each failure's message and fix; no evidence, no secrets."""
    return {
        "event": "quantlab_canary_failed",
        "status": report["status"],
        "exit_code": report["exit_code"],
        "host": socket.gethostname(),
        "observer_url": report["observer_url"],
        "started_at": report["started_at"],
        "failed": [{"check": c["name"], "message": c["message"], "fix": c["fix"], "runbook_item": c["runbook_item"]}
                   for c in report["checks"] if not c["ok"]],
    }


def send_alert(config: CanaryConfig, report: dict[str, Any], redact: Redactor) -> bool:
    """POSTs the failure to the webhook; a failed delivery is reported on stderr (the URL itself is not printed)."""
    import httpx

    body = redact(json.dumps(alert_payload(report)))
    try:
        response = httpx.post(str(config.webhook_url), content=body, headers={"Content-Type": "application/json"},
                              timeout=config.webhook_timeout_s, verify=tls.context())
    except httpx.HTTPError as exc:
        print(f"quantlab-canary: the alert webhook could not be reached ({type(exc).__name__}); check [alert] in the config.",
              file=sys.stderr)
        return False
    if response.status_code >= 300:
        print(f"quantlab-canary: the alert webhook answered {response.status_code}; check [alert] in the config.",
              file=sys.stderr)
        return False
    return True
