"""`quantlab-chaos run`: the chaos suite against a target, with reports per runbook item.

Order: bootstrap what is missing, load target and runbook, static drift check, every scenario under
pytest-xdist (progress as it goes), then summary.json / summary.md / junit.xml / allure results in reports/.
Exit 0 only when every runbook item passed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.drift import check_drift, scenario_items
from harness.errors import EXIT_FAILED, ConfigError, MissingToolError
from harness.reporting import SUMMARY_JSON
from harness.runbook import load_runbook
from harness.target import PROJECT_ROOT, TWIN_ROOT, Target

SCENARIOS_DIR = Path(__file__).with_name("scenarios")
DEFAULT_REPORTS = PROJECT_ROOT / "reports"
ALLURE_TOOL_DIR = PROJECT_ROOT / "tools" / "allure"


def bootstrap(target: Target) -> None:
    """Installs what the run needs and is missing: toxiproxy, the twin's npm packages. Says what it does."""
    if shutil.which("node") is None:
        raise MissingToolError("node is not on PATH. Install Node.js 20 (with npm) and run again.")
    from harness.fakes.toxiproxy import find_server_binary

    try:
        find_server_binary(None)
    except MissingToolError:
        if os.environ.get("TOXIPROXY_URL"):
            pass
        else:
            print("quantlab-chaos: toxiproxy is missing; building it (first run only)", flush=True)
            _run_or_explain([str(PROJECT_ROOT / "tools" / "install-toxiproxy.sh")], "installing toxiproxy")
    if target.root == TWIN_ROOT.resolve() and not (target.root / "node_modules").is_dir():
        if shutil.which("npm") is None:
            raise MissingToolError("npm is not on PATH. Install Node.js 20 with npm and run again.")
        print("quantlab-chaos: installing the twin's npm packages (npm ci)", flush=True)
        _run_or_explain(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], "npm ci in the twin", cwd=target.root)


def _run_or_explain(argv: list[str], what: str, cwd: Path | None = None) -> None:
    done = subprocess.run(argv, cwd=cwd, timeout=900)
    if done.returncode != 0:
        raise MissingToolError(f"{what} failed (exit {done.returncode}); see the output above, fix it, and run again.")


def run(*, quantlab_root: str | None, runbook: str | None, workers: str, only: Sequence[str], s3_backend: str,
        s3_url: str | None, toxiproxy_bin: str | None, html: bool, reports_dir: Path | None,
        pytest_args: Sequence[str] = ()) -> int:
    target = Target.load(quantlab_root, runbook)
    model = load_runbook(target.runbook)
    known = [item.id for item in model.items()]
    unknown = [item for item in only if item not in known]
    if unknown:
        raise ConfigError(f"--only {', '.join(unknown)}: not in the runbook {model.path}; its items are {', '.join(known)}.")
    bootstrap(target)
    reports = (reports_dir or DEFAULT_REPORTS).resolve()
    allure_dir = reports / "allure-results"
    _clean(reports, allure_dir)

    drift = [d.to_dict() for d in check_drift(model, target, scenario_items(SCENARIOS_DIR))]
    drift_file = reports / "drift.json"
    drift_file.write_text(json.dumps(drift, indent=2) + "\n")
    print(f"quantlab-chaos: target {target.root}\nquantlab-chaos: runbook {model.path} ({len(known)} items, "
          f"{len(drift)} drift finding(s))", flush=True)

    argv = [sys.executable, "-m", "pytest", str(SCENARIOS_DIR), "-v", "-p", "no:cacheprovider",
            "--rootdir", str(PROJECT_ROOT), "-n", workers, "--junitxml", str(reports / "junit.xml"),
            "--alluredir", str(allure_dir), "--runbook-report", str(reports), "--runbook-drift", str(drift_file),
            "--quantlab-root", str(target.root), "--runbook", str(model.path), "--s3-backend", s3_backend]
    argv += ["--s3-url", s3_url] if s3_url else []
    argv += ["--toxiproxy-bin", toxiproxy_bin] if toxiproxy_bin else []
    for item in only:
        argv += ["--runbook-item", item]
    argv += list(pytest_args)
    code = _pytest(argv)

    summary_path = reports / SUMMARY_JSON
    if not summary_path.is_file():
        print(f"quantlab-chaos: pytest ended (exit {code}) without writing {summary_path}; see its output above.",
              file=sys.stderr)
        return code or EXIT_FAILED
    summary = json.loads(summary_path.read_text())
    _print_summary(summary, reports)
    if html:
        render_html(allure_dir, reports / "allure-report")
    passed = all(row["status"] == "pass" for row in summary["items"] if not only or row["id"] in only)
    return 0 if passed and code == 0 else EXIT_FAILED


def _clean(reports: Path, allure_dir: Path) -> None:
    reports.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(allure_dir, ignore_errors=True)
    shutil.rmtree(reports / "allure-report", ignore_errors=True)
    for name in ("summary.json", "summary.md", "junit.xml", "drift.json"):
        (reports / name).unlink(missing_ok=True)


def _pytest(argv: list[str]) -> int:
    """Runs pytest in its own process group; Ctrl-C or SIGTERM is passed on, so every worker cleans up."""
    process = subprocess.Popen(argv, cwd=PROJECT_ROOT, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.killpg(process.pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            return process.wait()
        except KeyboardInterrupt:
            forward(signal.SIGINT, None)
            return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _print_summary(summary: dict, reports: Path) -> None:
    print("\nRunbook items:")
    for row in summary["items"]:
        mark = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP"}[row["status"]]
        extra = f"  {row['message'][:160]}" if row["status"] != "pass" else ""
        print(f"  {mark}  {row['id']:<36} (runbook line {row['line']}){extra}")
    totals = summary["totals"]
    print(f"\n{totals['pass']} passed, {totals['fail']} failed, {totals['skip']} skipped runbook items; "
          f"{len(summary['drift'])} drift finding(s). Reports: {reports}")


def render_html(allure_dir: Path, out_dir: Path) -> Path:
    """Renders the allure results with the npm `allure` package (version 3): no Java needed."""
    cli = ALLURE_TOOL_DIR / "node_modules" / ".bin" / "allure"
    if not cli.exists():
        if shutil.which("npm") is None:
            raise MissingToolError("--html needs npm (Node.js 20) to install the allure report generator.")
        print("quantlab-chaos: installing the allure report generator (npm ci in tools/allure)", flush=True)
        _run_or_explain(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], "npm ci in tools/allure",
                        cwd=ALLURE_TOOL_DIR)
    done = subprocess.run([str(cli), "generate", str(allure_dir), "-o", str(out_dir), "--config",
                           str(ALLURE_TOOL_DIR / "allurerc.json")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"})
    if done.returncode != 0 or not (out_dir / "index.html").is_file():
        raise MissingToolError(f"allure generate failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
    print(f"quantlab-chaos: HTML report {out_dir / 'index.html'}", flush=True)
    return out_dir
