"""Part 5, the canary: time from start to verdict, the verdict's lag behind the live run's end, and peak memory.

Against the twin stack (moto + toxiproxy + fake exchange, the observer started from its unit file), in one run:
1. QuantLab's own canary tool, `node tools/run-canary-live.js ...`, as the runbook gives it;
2. our `python -m canary --config ... --live --json`, the production canary's default plan plus its live run
   (which runs the same tool, then checks archive, run and audit itself).
The live run's end is the `finished_at` its archive manifest records; a verdict's lag is the moment the verdict
is out (the canary_live line for QuantLab's tool, our process's report and exit for ours) minus that end. Peak
memory is the largest summed RSS of the process tree, sampled every 10 ms with psutil.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from bench.common import MB, Goal, PartResult, TreeMemory, fmt, ratio, say
from quantlab_chaos.redact import redact

LAG_GOAL_S = 0.5
PEAK_GOAL_MB = 150.0
RUN_SECONDS = 3
SYMBOLS = ("BTCUSDT", "ETHUSDT")
PROCESS_TIMEOUT_S = 120.0
POST_RUN_CHECKS = ("canary_pass", "archive", "canary_run", "audit")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Timed:
    """One process, its output lines with the wall time each arrived, and its memory peaks."""

    argv: list[str]
    started: float
    ended: float = 0.0
    code: int | None = None
    lines: list[tuple[float, str, str]] = field(default_factory=list)  # (time, stream, text)
    peak_root_mb: float = 0.0
    peak_tree_mb: float = 0.0
    peak_processes: int = 0

    def first_line(self, predicate: Any) -> tuple[float, str] | None:
        return next(((at, text) for at, _, text in self.lines if predicate(text)), None)

    def text(self, stream: str) -> str:
        return "".join(text for _, s, text in self.lines if s == stream)


def run(seconds: int = RUN_SECONDS) -> PartResult:
    part = PartResult("canary")
    twin, twin_end, ours, report, our_end = _measure(seconds)
    twin_line = _canary_line(twin)
    twin_verdict = twin.first_line(lambda text: '"canary_live"' in text)
    assert twin_verdict is not None  # _canary_line found it
    our_verdict = ours.first_line(lambda text: text.strip())
    our_print = our_verdict[0] if our_verdict else ours.ended
    raw: dict[str, Any] = {
        "run_seconds": seconds,
        "quantlab_tool": {"status": twin_line.get("status"), "start_to_verdict_s": twin_verdict[0] - twin.started,
                          "verdict_after_run_end_s": twin_verdict[0] - twin_end, "exit_after_run_end_s": twin.ended - twin_end,
                          "peak_tree_mb": twin.peak_tree_mb, "peak_processes": twin.peak_processes},
        "ours": {"status": report.get("status"), "exit_code": ours.code, "checks": [c["name"] for c in report.get("checks", [])],
                 "start_to_verdict_s": our_print - ours.started, "verdict_after_run_end_s": our_print - our_end,
                 "exit_after_run_end_s": ours.ended - our_end,
                 "peak_tree_mb": ours.peak_tree_mb, "peak_python_mb": ours.peak_root_mb, "peak_processes": ours.peak_processes,
                 "failed_checks": {c["name"]: c["message"] for c in report.get("checks", []) if not c.get("ok")},
                 "post_run_check_s": {c["name"]: c.get("duration_s") for c in report.get("checks", [])
                                      if c["name"] in POST_RUN_CHECKS}},
    }
    part.raw = raw
    q, o = raw["quantlab_tool"], raw["ours"]
    say(f"QuantLab's canary tool: {q['status']}, verdict {fmt(q['verdict_after_run_end_s'])} s after its run ended "
        f"(exit {fmt(q['exit_after_run_end_s'])} s after), {fmt(q['start_to_verdict_s'])} s from start; "
        f"peak {fmt(q['peak_tree_mb'])} MB")
    if o["failed_checks"]:
        say(f"our canary's failed checks: {o['failed_checks']}")
    say(f"python -m canary --live: {o['status']} (exit {o['exit_code']}), verdict {fmt(o['verdict_after_run_end_s'])} s "
        f"after its run ended, {fmt(o['start_to_verdict_s'])} s from start ({len(o['checks'])} checks); peak "
        f"{fmt(o['peak_tree_mb'])} MB for python and its children ({fmt(o['peak_python_mb'])} MB python alone)")
    part.ratios = {
        "our_lag_vs_quantlab_lag": ratio(o["verdict_after_run_end_s"], q["verdict_after_run_end_s"]),
        "our_lag_vs_quantlab_exit_lag": ratio(o["verdict_after_run_end_s"], q["exit_after_run_end_s"]),
        "our_start_to_verdict_vs_quantlab": ratio(o["start_to_verdict_s"], q["start_to_verdict_s"]),
        "our_peak_vs_quantlab_peak": ratio(o["peak_tree_mb"], q["peak_tree_mb"]),
        "python_share_of_our_peak": ratio(o["peak_python_mb"], o["peak_tree_mb"]),
        "our_lag_vs_goal": ratio(o["verdict_after_run_end_s"], LAG_GOAL_S),
        "our_peak_vs_goal": ratio(o["peak_tree_mb"], PEAK_GOAL_MB),
    }
    part.goals = [
        Goal("canary.verdict_after_run_end_s", "our canary's verdict after the live run's end",
             o["verdict_after_run_end_s"], LAG_GOAL_S, "s", "max"),
        Goal("canary.peak_rss_mb", "our canary's peak RSS (python and children)", o["peak_tree_mb"], PEAK_GOAL_MB, "MB", "max"),
    ]
    checks_s = sum(v or 0.0 for v in o["post_run_check_s"].values())
    part.notes.append(f"our verdict waits for QuantLab's tool to exit ({fmt(q['exit_after_run_end_s'])} s after the run's end in "
                      f"its own run: it flushes its audit copies after printing PASS), then checks archive, run and audit "
                      f"itself ({fmt(checks_s)} s, of which the archive check {fmt(o['post_run_check_s'].get('archive'))} s: "
                      "cProfile shows that one is mostly importing boto3 and building its S3 client, which happens lazily "
                      "after the run; building the probe's client before the run starts would take it off the verdict's path)")
    part.notes.append(f"QuantLab's node process peaks at {fmt(q['peak_tree_mb'])} MB by itself; it is "
                      f"{ratio(q['peak_tree_mb'], o['peak_tree_mb']) or 0:.0%} of our tree's peak")
    return part


def _measure(seconds: int) -> tuple[Timed, float, Timed, dict[str, Any], float]:
    """Both canaries against one twin stack: (QuantLab's tool, its run's end, ours, our report, our run's end)."""
    from harness.environment import QuantLabEnvironment, shared_parts
    from harness.fakes.binance import FakeBinance
    from harness.target import Target

    target = Target.load(None, None)
    with tempfile.TemporaryDirectory(prefix="quantlab-bench-canary-") as tmp:
        workdir = Path(tmp)
        with shared_parts("moto", log_dir=workdir) as (s3, toxiproxy), \
                FakeBinance(rate=40, seed="bench-canary") as exchange, \
                QuantLabEnvironment(target, workdir / "quantlab", s3=s3, toxiproxy=toxiproxy, exchange=exchange,
                                    name=f"bench_{uuid.uuid4().hex[:10]}") as env:
            env.start("observer")
            secrets = list(env.secrets().values())
            twin = _twin_canary(env, seconds)
            twin_end = _run_end(env, _canary_line(twin), twin, secrets)
            ours = _our_canary(env, workdir, seconds)
            report = _report(ours, secrets)
            our_run = _our_run_id(report)
            our_end = _run_end(env, {"live_run_id": our_run} if our_run else None, ours, secrets)
    return twin, twin_end, ours, report, our_end


# ------------------------------------------------------------------------------------------------ processes


def _timed_process(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout: float) -> Timed:
    """Runs argv in its own session with every output line timestamped and the tree's memory sampled."""
    record = Timed(list(argv), time.time())
    process = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    pumps = [threading.Thread(target=_pump, args=(process.stdout, "stdout", record.lines), daemon=True),
             threading.Thread(target=_pump, args=(process.stderr, "stderr", record.lines), daemon=True)]
    try:
        with TreeMemory(process.pid) as memory:
            for pump in pumps:
                pump.start()
            record.code = process.wait(timeout=timeout)
            record.ended = time.time()
        record.peak_root_mb = memory.peak_root / MB
        record.peak_tree_mb = memory.peak_tree / MB
        record.peak_processes = memory.peak_processes
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pump in pumps:
            pump.join(timeout=5)
    record.lines.sort(key=lambda item: item[0])
    return record


def _pump(stream: IO[str] | None, name: str, sink: list[tuple[float, str, str]]) -> None:
    if stream is None:
        return
    for line in stream:
        sink.append((time.time(), name, line))
    stream.close()


def _twin_canary(env: Any, seconds: int) -> Timed:
    argv = ["node", "tools/run-canary-live.js", "--exchange", "binance", "--symbols", ",".join(SYMBOLS),
            "--strategy", str(env.strategy("steady")), "--dataset-parquet", "live", "--dataset-meta", "live",
            "--duration-seconds", str(seconds)]
    process_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env.workdir), "LANG": "C.UTF-8",
                   **env.quantlab_env(), **env.plumbing_env()}
    return _timed_process(argv, cwd=env.target.root, env=process_env, timeout=PROCESS_TIMEOUT_S)


def _our_canary(env: Any, workdir: Path, seconds: int) -> Timed:
    from quantlab_chaos.envfile import write_env_file

    plumbing = write_env_file(workdir / "plumbing.env", env.plumbing_env())
    live_env = env.wiring("observer").env_file
    creds = env.s3_server.credentials
    config = workdir / "canary.toml"
    config.write_text("\n".join([
        "[target]", f'quantlab_root = "{env.target.root}"', f'observer_url = "{env.observer_url}"',
        f'runbook = "{env.target.runbook}"', "",
        "[auth]", 'token_env = "OBSERVER_TOKEN"', "",
        "[s3]", f'endpoint = "{env.s3_endpoint}"', f'bucket = "{env.bucket.name}"', 'region = "auto"', "",
        "[audit]", f'spool_dir = "{env.audit_dir}"', "",
        "[live]", f"symbols = {json.dumps(list(SYMBOLS))}", f"duration_s = {seconds}",
        f"env_files = {json.dumps([str(p) for p in (live_env, plumbing) if p])}", "",
        "[run]", "timeout_s = 90", "",
    ]))
    # Secrets reach the canary the way its systemd unit gives them: in its environment, never on the command line.
    process_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir), "LANG": "C.UTF-8",
                   "OBSERVER_TOKEN": env.token, "RUN_ARCHIVE_S3_ACCESS_KEY": creds.access_key,
                   "RUN_ARCHIVE_S3_SECRET_KEY": creds.secret_key}
    argv = [sys.executable, "-m", "canary", "--config", str(config), "--live", "--json"]
    return _timed_process(argv, cwd=ROOT, env=process_env, timeout=PROCESS_TIMEOUT_S)


# ------------------------------------------------------------------------------------------------ reading


def _canary_line(record: Timed) -> dict[str, Any]:
    found = record.first_line(lambda text: '"canary_live"' in text)
    if found is None:
        raise RuntimeError(f"QuantLab's canary tool printed no canary_live line (exit {record.code}); "
                           f"stderr ends: {record.text('stderr')[-600:]}")
    line: dict[str, Any] = json.loads(found[1])
    return line


def _report(record: Timed, secrets: Sequence[str]) -> dict[str, Any]:
    try:
        report: dict[str, Any] = json.loads(record.text("stdout"))
    except json.JSONDecodeError:
        raise RuntimeError(f"python -m canary printed no JSON report (exit {record.code}); stderr ends: "
                           f"{redact(record.text('stderr'), secrets)[-600:]}") from None
    return report


def _our_run_id(report: dict[str, Any]) -> str | None:
    for check in report.get("checks", []):
        line = check.get("evidence", {}).get("line") if check.get("name") == "canary_pass" else None
        if isinstance(line, dict) and line.get("live_run_id"):
            return str(line["live_run_id"])
    return None


def _run_end(env: Any, line: dict[str, Any] | None, record: Timed, secrets: Sequence[str]) -> float:
    """The live run's end (Unix time) from its archive manifest's finished_at."""
    run_id = (line or {}).get("live_run_id")
    if not run_id:
        raise RuntimeError(f"{record.argv[0]} named no live run (exit {record.code}); stderr ends: "
                           f"{redact(record.text('stderr'), secrets)[-600:]}")
    manifest = env.bucket.read_json(f"replay_runs/replay_run_id={run_id}/manifest.json")
    return datetime.fromisoformat(str(manifest["finished_at"]).replace("Z", "+00:00")).timestamp()
