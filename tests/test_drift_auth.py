"""The observer scenarios can fail: against a twin copy with one behaviour changed so it disagrees with the
runbook, each scenario fails and its message names the runbook line the system broke."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness.target import PROJECT_ROOT
from quantlab_chaos.runbook import Runbook, Source, load_runbook
from tests.twin_copy import twin_copy

SCENARIOS = PROJECT_ROOT / "harness" / "scenarios"
SERVER = "core/observer/server.js"
INDEX = "core/observer/index.js"
STREAM = "core/live/BinanceFuturesStream.js"
AUTH_CHECK = "if (!bearerMatches(req.headers.authorization, token)) {"
STOP_ROUTE = "if (!registry.requestStop(id, 'MANUAL_STOP')) return"
TOKEN_READ = "const token = envStr('OBSERVER_TOKEN', '', env);"
# An observer that keeps the first token it ever read (in its state dir) and ignores later env files.
STICKY_TOKEN = """const fs = process.getBuiltinModule('node:fs');
  const pinned = `${envStr('QUANTLAB_STATE_DIR', '/tmp/quantlab-state', env)}/observer-token`;
  if (!fs.existsSync(pinned)) fs.writeFileSync(pinned, envStr('OBSERVER_TOKEN', '', env));
  const token = fs.readFileSync(pinned, 'utf8');"""


def run_scenarios(copy: Path, *node_ids: str, stop_first: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pytest", *node_ids, "-p", "no:cacheprovider", "-q", "--quantlab-root", str(copy)]
    return subprocess.run(argv + (["-x"] if stop_first else []), cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=240)


def runbook_of(copy: Path) -> Runbook:
    return load_runbook(copy / "docs" / "runbook.md")


def assert_fails_naming(result: subprocess.CompletedProcess[str], *sources: Source) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"the scenario did not fail (exit {result.returncode}):\n{output[-3000:]}"
    for source in sources:
        line = f"runbook line {source.line}"
        assert line in output, f"the failure does not name {line}:\n{output[-3000:]}"


def test_unauthorized_fails_when_observer_accepts_requests_without_token(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql", {SERVER: (AUTH_CHECK, "if (req.headers.authorization !== undefined && "
                                                           "!bearerMatches(req.headers.authorization, token)) {")})
    result = run_scenarios(copy, f"{SCENARIOS / 'test_failure_observer_unauthorized.py'}"
                                 "::test_clients_without_a_valid_bearer_header")
    assert_fails_naming(result, runbook_of(copy).failure("observer-unauthorized").symptom_source)
    assert "no token" in result.stdout


def test_unauthorized_fails_when_an_observer_without_token_lets_everyone_in(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql", {SERVER: ("if (!token || typeof header !== 'string') return false;",
                                                "if (!token) return true;\n  if (typeof header !== 'string') return false;")})
    result = run_scenarios(copy, f"{SCENARIOS / 'test_failure_observer_unauthorized.py'}"
                                 "::test_observer_started_without_token")
    assert_fails_naming(result, runbook_of(copy).failure("observer-unauthorized").symptom_source)
    assert "observer without a token" in result.stdout


def test_health_checks_fail_when_health_hides_the_feed(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql", {SERVER: ("ws_connected: running.some((r) => r.ws_connected === true),",
                                                "ws_connected: false,")})
    result = run_scenarios(copy, str(SCENARIOS / "test_health_checks.py"))
    health = next(r for r in runbook_of(copy).health_checks if r.path.endswith("/health"))
    assert_fails_naming(result, health.source)
    assert "ws_connected" in result.stdout


def test_kill_switch_and_break_glass_stop_fail_when_the_stop_route_stops_nothing(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql", {SERVER: (STOP_ROUTE, "if (!registry.get(id)) return")})
    result = run_scenarios(copy, str(SCENARIOS / "test_kill_switch.py"),
                           f"{SCENARIOS / 'test_break_glass.py'}::test_stop_live_runs", stop_first=False)
    runbook = runbook_of(copy)
    assert runbook.kill_switch is not None, "the twin's runbook documents a kill switch"
    assert_fails_naming(result, runbook.kill_switch.source, runbook.break_glass_step("stop-live-runs").source)
    assert "2 failed" in result.stdout and "still RUNNING" in result.stdout


def test_rotate_fails_when_the_observer_keeps_its_first_token(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql", {INDEX: (TOKEN_READ, STICKY_TOKEN)})
    result = run_scenarios(copy, f"{SCENARIOS / 'test_break_glass.py'}::test_rotate_observer_token")
    assert_fails_naming(result, runbook_of(copy).break_glass_step("rotate-observer-token").source)


def test_disable_live_ws_fails_when_the_runner_ignores_the_flag(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql", {STREAM: ("if (!envBool('CORE_LIVE_WS_ENABLED', false, this.env)) throw",
                                                "if (false) throw")})
    result = run_scenarios(copy, f"{SCENARIOS / 'test_break_glass.py'}::test_disable_live_ws")
    assert_fails_naming(result, runbook_of(copy).break_glass_step("disable-live-ws").source)
    assert "new connections: " in result.stdout
