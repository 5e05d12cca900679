"""The canary's host parts with real processes and a real S3 server: deadlines end whole process groups, the run
id is learnt only from safe output, commands get the service env, the archive probe tells missing from broken,
and the textfile keeps the last success across failures."""
from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from canary.checks import CheckResult
from canary.cli import write_textfile
from canary.config import load_config
from canary.live import RunIdWatcher
from canary.runner import Deadline, LocalRunner, S3ArchiveProbe, command_env
from harness.fakes.s3 import Bucket
from harness.ports import free_port
from tests.canary_support import write_env_file, write_toml


def test_the_deadline_ends_the_command_s_whole_process_group(tmp_path: Path) -> None:
    runner = LocalRunner(tmp_path, {"PATH": os.environ["PATH"]}, Deadline(30))
    pids: list[int] = []
    called: list[int] = []

    def remember_pids(line: str) -> None:
        pids.extend(int(p) for p in line.split())

    started = time.monotonic()
    # The shell starts a grandchild and reports both pids, then waits: only a group kill ends them both.
    result = runner.run_watched(["sh", "-c", "sleep 60 & echo $$ $!; wait"], None, 1.0,
                                on_stdout_line=remember_pids, on_deadline=lambda process: called.append(process.pid))
    assert result.timed_out and result.code is None
    assert time.monotonic() - started < 1.0 + 3.0 + 2.0
    assert len(called) == 1 and len(pids) == 2
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)


def test_a_command_that_ends_in_time_keeps_its_output_and_code(tmp_path: Path) -> None:
    runner = LocalRunner(tmp_path, {"PATH": os.environ["PATH"]}, Deadline(30))
    lines: list[str] = []
    result = runner.run_watched(["sh", "-c", "echo one; echo two >&2; exit 3"], None, 10,
                                on_stdout_line=lines.append, on_deadline=lambda process: pytest.fail("no deadline"))
    assert (result.code, result.stdout, result.stderr, result.timed_out) == (3, "one\n", "two\n", False)
    assert lines == ["one\n"]


def test_the_runner_never_waits_past_the_overall_deadline(tmp_path: Path) -> None:
    runner = LocalRunner(tmp_path, {"PATH": os.environ["PATH"]}, Deadline(0.5))
    started = time.monotonic()
    result = runner(["sleep", "30"], None, 60)
    assert result.timed_out and time.monotonic() - started < 3


@pytest.mark.parametrize("line,expected", [
    ('{"event":"live_run_start","live_run_id":"7b1c-42"}\n', "7b1c-42"),
    ('{"event":"x","live_run_id":"../../observer/health"}\n', None),
    ('{"live_run_id": 5}\n', None),
    ("live_run_id=abc\n", None),
])
def test_the_run_id_is_learnt_only_from_a_safe_json_line(line: str, expected: str | None) -> None:
    watcher = RunIdWatcher()
    watcher.feed(line)
    assert watcher.run_id == expected


def test_commands_get_the_env_files_then_the_canary_s_own_settings(tmp_path: Path) -> None:
    first = write_env_file(tmp_path / "live.env", {"OBSERVER_TOKEN": "from-file", "CORE_LIVE_WS_ENABLED": "1"})
    second = write_env_file(tmp_path / "more.env", {"CORE_LIVE_WS_ENABLED": "0"})
    config_path = write_toml(tmp_path / "canary.toml", {
        "target": {"observer_url": "http://127.0.0.1:9150"},
        "s3": {"endpoint": "http://127.0.0.1:9000", "bucket": "archive"},
        "live": {"env_files": [first, second, f"-{tmp_path / 'optional.env'}"]}})
    config = load_config(config_path, {"OBSERVER_TOKEN": "from-canary", "RUN_ARCHIVE_S3_ACCESS_KEY": "ak-0001",
                                       "RUN_ARCHIVE_S3_SECRET_KEY": "sk-0001", "UNRELATED": "x"})
    env = command_env(config, {"PATH": "/bin", "HOME": "/home/deploy", "UNRELATED": "x"})
    assert env["OBSERVER_TOKEN"] == "from-file", "the service's env file wins, as for the service itself"
    assert env["CORE_LIVE_WS_ENABLED"] == "0", "later env files override earlier ones, as in systemd"
    assert (env["RUN_ARCHIVE_S3_BUCKET"], env["RUN_ARCHIVE_S3_SECRET_KEY"]) == ("archive", "sk-0001")
    assert "UNRELATED" not in env and env["PATH"] == "/bin"
    assert "sk-0001" not in repr(config) and "from-canary" not in repr(config)


def test_the_archive_probe_tells_missing_from_broken(s3: Bucket) -> None:
    creds = s3.server.credentials
    s3.put("replay_runs/replay_run_id=r1/decisions.jsonl", '{"decision":{"symbol":"BTCUSDT"}}\nnot json\n')
    probe = S3ArchiveProbe(s3.server.endpoint_url, s3.name, "auto", creds.access_key, creds.secret_key, timeout=2)
    assert probe.head("replay_runs/replay_run_id=r1/decisions.jsonl") is not None
    assert probe.head("replay_runs/replay_run_id=r1/stats.json") is None
    assert probe.read_json_lines("replay_runs/replay_run_id=r1/decisions.jsonl") == [{"decision": {"symbol": "BTCUSDT"}}]
    assert creds.secret_key not in repr(probe)
    for wrong in (S3ArchiveProbe(s3.server.endpoint_url, "no-such-bucket-here", "auto", creds.access_key, creds.secret_key),
                  S3ArchiveProbe(f"http://127.0.0.1:{free_port()}", s3.name, "auto", creds.access_key, creds.secret_key)):
        with pytest.raises(Exception):  # noqa: B017 - any S3 error; the archive check reports it as S3 unreachable
            wrong.head("replay_runs/replay_run_id=r1/stats.json")


def test_the_textfile_keeps_the_last_success_across_failures(tmp_path: Path) -> None:
    prom = tmp_path / "quantlab_canary.prom"
    passed = [CheckResult("observer_auth", True, "ok", duration_s=0.1)]
    write_textfile(prom, passed, 0, 1.5)
    first = _samples(prom)[("quantlab_canary_last_success_timestamp_seconds", None)]
    write_textfile(prom, [CheckResult("observer_auth", False, "401")], 1, 1.0)
    samples = _samples(prom)
    assert samples[("quantlab_canary_last_success_timestamp_seconds", None)] == first
    assert samples[("quantlab_canary_success", None)] == 0
    assert samples[("quantlab_canary_check_success", "observer_auth")] == 0
    assert not list(tmp_path.glob("*.prom.*")), "no temporary file is left next to the textfile"



def _samples(prom: Path) -> dict[tuple[str, str | None], float]:
    return {(s.name, s.labels.get("check")): s.value for f in text_string_to_metric_families(prom.read_text())
            for s in f.samples}


def test_a_process_started_by_the_runner_is_in_its_own_session(tmp_path: Path) -> None:
    runner = LocalRunner(tmp_path, {"PATH": os.environ["PATH"]}, Deadline(10))
    result = runner(["sh", "-c", "ps -o sid= -p $$"], None, 5)
    assert int(result.stdout.strip()) != os.getsid(0), "the deadline's group kill would reach the canary itself"
