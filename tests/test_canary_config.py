"""The canary's CLI without a QuantLab: bad config and usage exit 2 with one sentence per problem, a dead observer
exits 3, and the hard deadline holds even when the observer accepts connections and never answers."""
from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.ports import free_port
from tests.canary_support import assert_no_secrets, run_canary_cli, webhook_server, write_toml

SECRET = "literal-secret-value-" + "q" * 16


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # the OS just handed it out; nobody listens on it


def problems(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("quantlab-canary:")]


def test_invalid_toml_exits_2_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "canary.toml"
    config.write_text("[target\nobserver_url = 'x'\n")
    run = run_canary_cli(["--config", str(config)])
    assert run.code == 2 and run.stdout == ""
    assert problems(run.stderr) and "is not valid TOML" in run.stderr and str(config) in run.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    run = run_canary_cli(["--config", str(tmp_path / "absent.toml")])
    assert run.code == 2 and "does not exist" in run.stderr


def test_every_problem_is_reported_once_each(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "canary.toml", {
        "target": {"quantlab_root": tmp_path / "nowhere"},
        "s3": {"endpoint": "ftp://s3.example"},
        "live": {"duration_s": 0, "symbols": []},
        "colour": {"blue": 1},
    })
    run = run_canary_cli(["--config", str(config)])
    assert run.code == 2
    found = problems(run.stderr)
    for expected in ("observer_url is missing", "quantlab_root", "[s3] endpoint", "[s3] bucket is missing",
                     "RUN_ARCHIVE_S3_ACCESS_KEY", "[live] duration_s", "[live] symbols", "unknown section [colour]"):
        assert sum(expected in line for line in found) == 1, (expected, found)


@pytest.mark.parametrize("section,key", [("auth", "token"), ("s3", "secret_key"), ("s3", "access_key")])
def test_a_literal_secret_in_the_toml_is_refused_without_echoing_it(tmp_path: Path, section: str, key: str) -> None:
    config = write_toml(tmp_path / "canary.toml", {
        "target": {"observer_url": dead_url()},
        section: {key: SECRET, **({"endpoint": "http://127.0.0.1:9", "bucket": "b"} if section == "s3" else {})},
    })
    run = run_canary_cli(["--config", str(config)], extra_env={
        "RUN_ARCHIVE_S3_ACCESS_KEY": "a" * 20, "RUN_ARCHIVE_S3_SECRET_KEY": "b" * 20})
    assert run.code == 2
    assert any(f"[{section}] {key} puts a secret in the config file" in line for line in problems(run.stderr))
    assert_no_secrets([SECRET], run.stdout, run.stderr)


def test_a_missing_token_file_exits_2(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "canary.toml", {
        "target": {"observer_url": dead_url()}, "auth": {"token_file": tmp_path / "no-token"}})
    run = run_canary_cli(["--config", str(config)])
    assert run.code == 2 and "[auth] token_file" in run.stderr and "cannot be read" in run.stderr


@pytest.mark.parametrize("args,expected", [
    (["--check", "canary"], "add --live"),
    (["--live"], "set [target] quantlab_root"),
    (["--check", "archive"], "needs an [s3] section"),
    (["--check", "audit"], "pass --run-id"),
    (["--prom-file", "metrics.txt"], "must end in .prom"),
])
def test_checks_that_cannot_run_with_this_config_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    config = write_toml(tmp_path / "canary.toml", {"target": {"observer_url": dead_url()}})
    run = run_canary_cli(["--config", str(config), *args])
    assert run.code == 2, run.output()
    assert expected in run.stderr


def test_unknown_check_or_flag_is_a_usage_error(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "canary.toml", {"target": {"observer_url": dead_url()}})
    assert run_canary_cli(["--config", str(config), "--check", "everything"]).code == 2
    assert run_canary_cli(["--config", str(config), "--token", SECRET]).code == 2, "there is no flag for secrets"


def test_a_dead_observer_exits_3_with_textfile_and_alert(tmp_path: Path) -> None:
    token = "tok-" + "z" * 24
    prom = tmp_path / "quantlab_canary.prom"
    with webhook_server() as hook:
        config = write_toml(tmp_path / "canary.toml", {
            "target": {"observer_url": "http://127.0.0.1:9"},  # overridden below
            "auth": {"token_env": "CANARY_TOKEN"}, "alert": {"webhook_url": hook.url}, "run": {"retries": 1}})
        run = run_canary_cli(["--config", str(config), "--json", "--prom-file", str(prom)],
                             extra_env={"CANARY_TOKEN": token, "QUANTLAB_CANARY_OBSERVER_URL": dead_url()})
        assert run.code == 3, run.output()
        report = run.json()
        assert report["status"] == "UNREACHABLE" and all(c["unreachable"] for c in report["checks"])
        assert "check that the observer runs" in report["checks"][0]["fix"]
        assert len(hook.bodies) == 1 and hook.bodies[0]["exit_code"] == 3
        assert_no_secrets([token], run.stdout, run.stderr, prom.read_text(), *hook.raw)
    samples = {s.name: s.value for f in text_string_to_metric_families(prom.read_text()) for s in f.samples
               if "check" not in s.labels}
    assert samples["quantlab_canary_success"] == 0 and samples["quantlab_canary_exit_code"] == 3
    assert samples["quantlab_canary_last_success_timestamp_seconds"] == 0


def test_a_bad_config_still_writes_the_textfile(tmp_path: Path) -> None:
    prom = tmp_path / "quantlab_canary.prom"
    config = write_toml(tmp_path / "canary.toml", {"target": {}})
    assert run_canary_cli(["--config", str(config), "--prom-file", str(prom)]).code == 2
    samples = {s.name: s.value for f in text_string_to_metric_families(prom.read_text()) for s in f.samples}
    assert samples["quantlab_canary_success"] == 0 and samples["quantlab_canary_exit_code"] == 2


@pytest.fixture()
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers: the worst kind of observer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in held:
            connection.close()
        listener.close()


def test_the_hard_deadline_holds_against_an_observer_that_never_answers(tmp_path: Path, silent_server: str) -> None:
    config = write_toml(tmp_path / "canary.toml", {
        "target": {"observer_url": silent_server}, "run": {"http_timeout_s": 30, "retries": 5}})
    run = run_canary_cli(["--config", str(config), "--timeout", "2", "--json"], extra_env={"OBSERVER_TOKEN": "t" * 20})
    assert run.code == 1, run.output()
    assert run.duration_s < 2 + 3, f"--timeout 2 took {run.duration_s:.1f} s"
    checks = json.loads(run.stdout)["checks"]
    assert [c["name"] for c in checks] == ["observer_auth", "runs_listing", "health_fields"]
    assert all(not c["ok"] and "deadline" in c["message"] for c in checks)
