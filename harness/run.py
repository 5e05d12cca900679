"""`quantlab-chaos run`: the chaos suite against a target, with reports per runbook item.

Order: bootstrap what is missing, load target and runbook, static drift check, every scenario under
pytest-xdist (progress as it goes), then summary.json / summary.md / junit.xml / allure results in reports/.
Exit 0 when every runbook item passed, 1 when any is fail, drift or blocked, 3 when any is error (the harness's own
failure), 2 for bad input.
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
from typing import Any

from harness import bytecode, reaper, schedule
from harness.drift import by_item, check_drift, collect_scenarios
from harness.fakes.docker import require_docker
from harness.isolation import run_isolation
from harness.outcomes import ERROR, EXIT_CODES, OUTCOMES, exit_code, one_sentence
from harness.reporting import SUMMARY_JSON
from harness.summary_markdown import longest_sentence
from harness.sysd.cgroups import Cgroups
from harness.sysd.stopping import group_members
from harness.target import PROJECT_ROOT, TWIN_ROOT, Target
from quantlab_chaos import procgroup
from quantlab_chaos.errors import ConfigError, HarnessError, MissingToolError
from quantlab_chaos.runbook import load_runbook

SCENARIOS_DIR = Path(__file__).with_name("scenarios")
EXIT_HARNESS = EXIT_CODES[ERROR]
DEFAULT_REPORTS = PROJECT_ROOT / "reports"
ALLURE_TOOL_DIR = PROJECT_ROOT / "tools" / "allure"


def require_programs(target: Target, services: Sequence[str] | None = None) -> None:
    """MissingToolError unless node (the harness runs QuantLab's commands with it) is on PATH, and npm too when
    a unit to boot runs it (the console's `npm run start`)."""
    if shutil.which("node") is None:
        raise MissingToolError("node is not on PATH. Install Node.js 20 (with npm) and run again.")
    if shutil.which("npm") is None:
        users = [name for name in _units_to_boot(target, services) if "npm" in _words(target.units[name])]
        if users:
            raise MissingToolError(f"npm is not on PATH, and {', '.join(users)} runs it. Install Node.js 20 with "
                                   f"npm and run again.")


def _units_to_boot(target: Target, services: Sequence[str] | None) -> list[str]:
    wanted = {target.role(name).unit for name in services} if services else None
    return sorted(name for name in target.services if wanted is None or name in wanted)


def _words(unit_path: Path) -> set[str]:
    from harness.sysd.unitfile import parse_unit

    unit = parse_unit(unit_path)
    return {word for key in ("ExecStartPre", "ExecStart", "ExecStartPost")
            for value in unit.get_all("Service", key) for word in value.split()}


def bootstrap(target: Target, build_toxiproxy: bool = True, toxiproxy_bin: str | None = None) -> None:
    """Installs what the run needs and is missing: toxiproxy, the twin's npm packages. Says what it does."""
    require_programs(target)
    from harness.fakes.toxiproxy import find_server_binary

    if toxiproxy_bin or os.environ.get("TOXIPROXY_BIN"):
        find_server_binary(toxiproxy_bin)  # a binary named explicitly must exist: never build another in its place
    try:
        find_server_binary(None)
    except MissingToolError:
        if os.environ.get("TOXIPROXY_URL") or not build_toxiproxy:
            pass
        else:
            # The installer says what it does (and how long a build takes); go's download lines stay in its stderr.
            _run_or_explain([str(PROJECT_ROOT / "tools" / "install-toxiproxy.sh")], "installing toxiproxy",
                            says_why="toxiproxy:")
    if target.root == TWIN_ROOT.resolve() and not (target.root / "node_modules").is_dir():
        if shutil.which("npm") is None:
            raise MissingToolError("npm is not on PATH. Install Node.js 20 with npm and run again.")
        print("quantlab-chaos: installing the twin's npm packages (npm ci)", flush=True)
        _run_or_explain(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], "npm ci in the twin", cwd=target.root)


def _run_or_explain(argv: list[str], what: str, cwd: Path | None = None, *, says_why: str = "") -> None:
    """Runs an installer; on failure, MissingToolError. When its last error line starts with `says_why` (the
    installer's own advice), that line is the message; otherwise its output is shown and pointed at."""
    done = subprocess.run(argv, cwd=cwd, timeout=900, stderr=subprocess.PIPE if says_why else None, text=True)
    if done.returncode == 0:
        return
    lines = (done.stderr or "").strip().splitlines()
    if says_why and lines and lines[-1].startswith(says_why):
        raise MissingToolError(f"{what} failed: {lines[-1].removeprefix(says_why).strip()}")
    if lines:
        print("\n".join(lines), file=sys.stderr)
    raise MissingToolError(f"{what} failed (exit {done.returncode}); see the output above, fix it, and run again.")


def run(*, quantlab_root: str | None, runbook: str | None, workers: str | None, only: Sequence[str], s3_backend: str,
        s3_url: str | None, toxiproxy_bin: str | None, html: bool, reports_dir: Path | None,
        pytest_args: Sequence[str] = (), toxiproxy_backend: str | None = None, shard: str | None = None,
        durations: Path | None = None) -> int:
    target = Target.load(quantlab_root, runbook)
    target.check_units()  # a unit that cannot be booted fails here, naming its file and line, not in every scenario
    model = load_runbook(target.runbook)
    known = [item.id for item in model.items()]
    unknown = [item for item in only if item not in known]
    if unknown:
        raise ConfigError(f"--only {', '.join(unknown)}: not in the runbook {model.path}; its items are "
                          f"{', '.join(known)}. Pass one of those.")
    # Refuse before anything runs: without Docker every scenario would only be skipped.
    if s3_backend == "minio":
        require_docker("--s3-backend minio runs MinIO", "--s3-backend moto")
    if toxiproxy_backend == "container":
        require_docker("--toxiproxy-backend container runs toxiproxy", "--toxiproxy-backend binary")
    bootstrap(target, build_toxiproxy=toxiproxy_backend != "container", toxiproxy_bin=toxiproxy_bin)
    reports = (reports_dir or DEFAULT_REPORTS).resolve()
    allure_dir = reports / "allure-results"
    _clean(reports, allure_dir)

    scenarios = collect_scenarios(SCENARIOS_DIR)
    drift = [d.to_dict() for d in check_drift(model, target, by_item(scenarios))]
    drift_file = reports / "drift.json"
    drift_file.write_text(json.dumps(drift, indent=2) + "\n")
    timings_file, plan = _plan(scenarios, only, shard, durations, reports, workers)
    isolation = run_isolation(s3_backend, toxiproxy_backend)
    print(f"quantlab-chaos: target {target.root}\nquantlab-chaos: runbook {model.path} ({len(known)} items, "
          f"{len(drift)} drift finding(s))\nquantlab-chaos: isolation: {isolation}\n"
          f"quantlab-chaos: service limits (MemoryMax=, CPUQuota=, ...): {Cgroups().describe()}\n"
          f"quantlab-chaos: {plan.why}", flush=True)

    argv = [sys.executable, "-m", "pytest", str(SCENARIOS_DIR), "-v", "-p", "no:cacheprovider",
            "--rootdir", str(PROJECT_ROOT), "-n", workers or str(plan.workers), "--junitxml", str(reports / "junit.xml"),
            "--alluredir", str(allure_dir), "--runbook-report", str(reports), "--runbook-drift", str(drift_file),
            "--quantlab-root", str(target.root), "--runbook", str(model.path), "--s3-backend", s3_backend]
    argv += ["--s3-url", s3_url] if s3_url else []
    argv += ["--toxiproxy-bin", toxiproxy_bin] if toxiproxy_bin else []
    argv += ["--toxiproxy-backend", toxiproxy_backend] if toxiproxy_backend else []
    for item in only:
        argv += ["--runbook-item", item]
    argv += ["--scenario-durations", str(timings_file)] if timings_file else []
    argv += ["--shard", shard] if shard else []
    argv += list(pytest_args)
    code = _pytest(argv)

    summary_path = reports / SUMMARY_JSON
    if not summary_path.is_file():
        print(f"quantlab-chaos: pytest ended (exit {code}) without writing {summary_path}; see its output above.",
              file=sys.stderr)
        return EXIT_HARNESS
    summary = json.loads(summary_path.read_text())
    _print_summary(summary, reports)
    if html:
        render_html(allure_dir, reports / "allure-report")
    verdict = exit_code(row["outcome"] for row in [*summary["items"], *summary.get("beyond", [])])
    if harness_leaks(summary) or (code not in (0, 1) and verdict == 0):
        # A leak in our own reports, or pytest itself ending badly (usage error, internal error), is the harness's.
        return EXIT_HARNESS
    return verdict


def _plan(scenarios: Sequence[tuple[str, str | None]], only: Sequence[str], shard: str | None,
          durations: Path | None, reports: Path, workers: str | None) -> tuple[Path | None, schedule.WorkerFit]:
    """The durations file the run is ordered (and sharded) by, and its worker count with the reason.

    Order: --durations, else this reports folder's durations.json from the run before, else the baseline shipped
    with the scenarios. Shards: --durations, else the baseline only, so that every machine computes the same shards.
    Workers: -n when given, else what the machine can carry for the scenarios to run (harness.schedule)."""
    if durations is not None and not durations.is_file():
        raise ConfigError(f"--durations {durations} does not exist; pass the durations.json of an earlier run's "
                          "reports, or leave it out.")
    local = reports / schedule.DURATIONS_JSON
    source = durations or (schedule.BASELINE if shard else local if local.is_file() else schedule.BASELINE)
    timings_file = source if source.is_file() else None
    timings = schedule.load(timings_file) if timings_file else {}
    nodeids = [nodeid for nodeid, item in scenarios if not only or item in only]
    if shard:
        k, n = schedule.parse_shard(shard)
        nodeids = schedule.shards(nodeids, timings, n)[k - 1]
    where = f"durations from {timings_file}" if timings_file else "no durations recorded"
    if workers is not None:
        return timings_file, schedule.WorkerFit(0, f"workers: -n {workers} as given; longest first by {where}")
    fit = schedule.fit_workers(nodeids, timings)
    shard_note = f"shard {shard}: {len(nodeids)} scenario(s); " if shard else ""
    return timings_file, schedule.WorkerFit(fit.workers, f"{shard_note}workers: {fit.workers} ({fit.why}); "
                                                         f"longest first by {where}")


def harness_leaks(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The secrets the harness wrote into its own reports (names and places only); each one fails the run."""
    leaks = list((summary.get("secrets") or {}).get("harness_leaks") or [])
    for leak in leaks:
        print(f"quantlab-chaos: the harness leaked the secret {leak['secret']} into {leak['where']}"
              + (f" ({leak['detail']})" if leak.get("detail") else "")
              + "; these reports must not be published: fix the code that wrote it.", file=sys.stderr)
    return leaks


def _clean(reports: Path, allure_dir: Path) -> None:
    reports.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(allure_dir, ignore_errors=True)
    shutil.rmtree(reports / "allure-report", ignore_errors=True)
    for name in ("summary.json", "summary.md", "junit.xml", "drift.json", "journals.json"):
        (reports / name).unlink(missing_ok=True)


def _pytest(argv: list[str]) -> int:
    """Runs pytest in its own process group; Ctrl-C or SIGTERM is passed on, so every worker cleans up.
    If this process is killed outright, the reaper ends pytest's group. Interrupted raises HarnessError."""
    process = subprocess.Popen(argv, cwd=PROJECT_ROOT, start_new_session=True, env=reaper.child_env(bytecode.child_env()))
    reaper.watch(process.pid)
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if signum == signal.SIGINT:  # the controller passes it on to its workers (harness.plugin), once
            procgroup.signal_pid(process.pid, signal.SIGINT)
        else:
            procgroup.signal_group(process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            code = process.wait()
        except KeyboardInterrupt:
            forward(signal.SIGINT, None)
            code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process.poll() is None:
            procgroup.kill(process)
        if not group_members(process.pid):  # else the reaper ends the stragglers when we exit
            reaper.forget(process.pid)
    if received:
        name = signal.Signals(received[0]).name
        raise HarnessError(f"interrupted by {name}: pytest and every service it started were stopped, and the "
                           f"reports of this run are incomplete. Run it again to get a full report.",
                           exit_code=128 + received[0])
    return code


def _print_summary(summary: dict[str, Any], reports: Path) -> None:
    print("\nRunbook items:")
    for row in summary["items"]:
        extra = f"  {one_sentence(row['message'], 200)}" if row["outcome"] != "pass" else ""
        print(f"  {row['outcome'].upper():<7}  {row['id']:<36} (runbook line {row['line']}){extra}")
    totals = summary["totals"]
    print("\n" + ", ".join(f"{totals.get(o, 0)} {o}" for o in OUTCOMES) + " runbook item(s); "
          f"{len(summary['drift'])} drift finding(s); exit code {summary.get('exit_code')}. Reports: {reports}")
    if summary.get("beyond"):
        print("\nBeyond the runbook:")
        for row in summary["beyond"]:
            accepted = sum(1 for f in row["findings"] if f.get("accepted"))
            extra = f"  {one_sentence(row['message'], 200)}" if row["outcome"] != "pass" else ""
            print(f"  {row['outcome'].upper():<7}  {row['id']:<36} {len(row['findings'])} finding(s)"
                  + (f", {accepted} accepted" if accepted else "") + extra)
    longest = longest_sentence((summary.get("timing") or {}).get("longest"))
    if longest:
        print(f"Longest scenario (no worker count makes a run shorter): {longest}")
    security, secrets = summary.get("security") or {}, summary.get("secrets") or {}
    if security.get("tests"):
        print(f"Security probes: {len(security.get('probes', []))} probe(s), {len(security.get('failures', []))} failure(s), "
              f"{len(security.get('findings', []))} finding(s) (summary.json: security)")
    if secrets:
        print(f"Secret leak scan: {secrets.get('checked', 0)} artifact(s); {len(secrets.get('harness_leaks', []))} harness "
              f"leak(s), {len(secrets.get('target_leaks', []))} target leak(s) (summary.json: secrets)")


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
