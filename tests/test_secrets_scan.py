"""The secret leak scan: what the harness wrote fails the run, what the target wrote is a finding; no value is reported."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest

from harness.fakes.s3 import Bucket
from harness.outcomes import exit_code
from harness.reporting import target_leak_findings
from harness.run import harness_leaks
from harness.secrets_scan import SecretSet, scan_harness_artifacts, scan_target
from harness.summary_markdown import markdown
from harness.target import PROJECT_ROOT
from tests.leak_plant import PLANTED_ATTACHMENT, PLANTED_PREFIX
from tests.twin_copy import twin_copy

CLI = str(Path(sys.executable).with_name("quantlab-chaos"))
ITEM = "failure:live-ws-disabled"


def a_secret() -> str:
    return secrets.token_urlsafe(24)


def everything_in(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


# -- the scanner ----------------------------------------------------------------------------------------------


def test_every_written_form_of_a_secret_is_found_and_no_value_is_shown() -> None:
    value = "Ab/c+d=ef&<g>" + a_secret()
    found = SecretSet({"OBSERVER_TOKEN": value, "SHORT_KEY": "abc"})
    for form in (value, json.dumps(value)[1:-1], quote(value, safe=""),
                 value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")):
        assert found.found_in(f"x {form} y".encode()) == ["OBSERVER_TOKEN"], form
    assert found.found_in(b"nothing here abc") == []
    assert found.too_short == {"SHORT_KEY"}, "a value too short to scan is counted, not matched against every 'abc'"
    assert value not in repr(found) and "OBSERVER_TOKEN" in repr(found)


def test_harness_artifacts_name_the_file_the_attachment_and_the_test(tmp_path: Path) -> None:
    value = a_secret()
    allure = tmp_path / "allure-results"
    allure.mkdir()
    (allure / "abc-attachment.txt").write_text(f"careless {value}")
    (allure / "def-attachment.txt").write_text("clean")
    (allure / "r1-result.json").write_text(json.dumps({"fullName": "scenarios.test_x#test_y", "steps": [
        {"name": "inject", "attachments": [{"name": "journal live", "source": "abc-attachment.txt"}]}]}))
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "junit.xml").write_text(f"<testsuite><failure message='token {value}'/></testsuite>")
    paths = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    result = scan_harness_artifacts(paths, SecretSet({"OBSERVER_TOKEN": value}), base=tmp_path, allure_dir=allure)
    assert result.checked == 5
    leaks = sorted((leak.to_dict() for leak in result.leaks), key=lambda leak: leak["where"])
    assert leaks == [
        {"secret": "OBSERVER_TOKEN", "where": "allure-results/abc-attachment.txt", "kind": "allure-attachment",
         "test": "scenarios.test_x#test_y", "detail": "journal live"},
        {"secret": "OBSERVER_TOKEN", "where": "junit.xml", "kind": "junit"},
    ]
    assert value not in json.dumps(leaks)


def test_target_output_on_disk_and_in_the_bucket_is_scanned_but_not_the_env_files(tmp_path: Path, s3: Bucket) -> None:
    token, key = a_secret(), a_secret()
    env = SimpleNamespace(workdir=tmp_path, audit_dir=tmp_path / "audit-spool", state_dir=tmp_path / "state", bucket=s3)
    (env.audit_dir / "date=20260101").mkdir(parents=True)
    (env.audit_dir / "date=20260101" / "part-1-a.jsonl").write_text(json.dumps({"metadata": {"t": token}}) + "\n")
    (env.audit_dir / "date=20260101" / "part-2-b.jsonl").write_text("{}\n")
    (tmp_path / "journal").mkdir()
    (tmp_path / "journal" / "replayd.log").write_text(f"starting with key {key}\n")
    (tmp_path / "etc-quantlab").mkdir()
    (tmp_path / "etc-quantlab" / "observer.env").write_text(f"OBSERVER_TOKEN={token}\n")  # the harness's config, no leak
    s3.put("audit/date=20260101/part-1-a.jsonl", f"{token}\n")
    s3.put("replay_runs/replay_run_id=r/manifest.json", "{}")
    secret_set = SecretSet({"OBSERVER_TOKEN": token, "RUN_ARCHIVE_S3_SECRET_KEY": key})
    result = scan_target(env, secret_set, "t::x")  # type: ignore[arg-type]  # env: a SimpleNamespace of what the scan reads
    assert result.checked == 5 and not result.errors
    assert {(leak.secret, leak.where, leak.kind) for leak in result.leaks} == {
        ("OBSERVER_TOKEN", "audit-spool/date=20260101/part-1-a.jsonl", "audit-spool"),
        ("RUN_ARCHIVE_S3_SECRET_KEY", "journal/replayd.log", "journal"),
        ("OBSERVER_TOKEN", f"s3://{s3.name}/audit/date=20260101/part-1-a.jsonl", "s3"),
    }


# -- the summary and the exit code ----------------------------------------------------------------------------


def test_run_fails_on_a_harness_leak_and_names_it_without_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    leak = {"secret": "OBSERVER_TOKEN", "where": "allure-results/x-attachment.txt", "kind": "allure-attachment"}
    assert harness_leaks({"secrets": {"harness_leaks": [leak], "target_leaks": []}}) == [leak]
    assert harness_leaks({"secrets": {"harness_leaks": [], "target_leaks": [leak]}}) == []
    assert harness_leaks({}) == [], "a summary written before the scan existed has no secrets block"
    err = capsys.readouterr().err
    assert "OBSERVER_TOKEN" in err and "allure-results/x-attachment.txt" in err and "fix the code" in err


def test_markdown_lists_leaks_and_groups_target_findings() -> None:
    target = [{"secret": "OBSERVER_TOKEN", "where": f"audit-spool/p{i}.jsonl", "kind": "audit-spool", "test": "t"}
              for i in range(3)]
    findings = target_leak_findings(target)
    assert len(findings) == 1 and findings[0]["severity"] == "defect" and "3 place(s)" in findings[0]["detail"]
    data = {"target": "t", "runbook": "r", "started_at": "s", "duration_s": 1, "totals": {"pass": 0, "fail": 0, "skip": 0},
            "items": [], "drift": [],
            "security": {"tests": [{"nodeid": "a::test_security_probes", "outcome": "failed"}], "probes": [{"ok": False}],
                         "findings": findings, "failures": ["GET /observer/runs with no credentials answered 200"]},
            "secrets": {"checked": 9, "secret_names": ["OBSERVER_TOKEN"], "harness_leaks": [
                {"secret": "OBSERVER_TOKEN", "where": "junit.xml", "kind": "junit"}], "target_leaks": target}}
    text = markdown(data)
    assert "## Security probes" in text and "FAILURE: GET /observer/runs" in text and "test_security_probes **failed**" in text
    assert "HARNESS LEAK: `OBSERVER_TOKEN` in `junit.xml`" in text and text.count("target leak (finding)") == 3


INNER_LEAKY = """
import os

import allure

from harness.secrets_scan import remember


def test_attaches_a_secret(request):
    remember(request.node, {"OBSERVER_TOKEN": os.environ["PLANTED_TOKEN"]})
    allure.attach("careless " + os.environ["PLANTED_TOKEN"], name="careless attachment",
                  attachment_type=allure.attachment_type.TEXT)


def test_prints_a_secret(request):
    remember(request.node, {"RUN_ARCHIVE_S3_SECRET_KEY": os.environ["PLANTED_KEY"]})
    print("debug", os.environ["PLANTED_KEY"])
"""

INNER_TARGET_LEAK = """
import json

import pytest


def test_target_wrote_a_secret(request):
    leak = {"secret": "OBSERVER_TOKEN", "where": "audit-spool/date=20260101/part-1.jsonl", "kind": "audit-spool",
            "test": request.node.nodeid}
    request.node.user_properties.append(("secret_scan", json.dumps({"checked": 4, "leaks": [leak], "errors": []})))


@pytest.mark.security
def test_a_security_probe(request):
    report = {"probes": [{"service": "replayd", "port": 1, "method": "GET", "path": "/", "credentials": "no credentials",
                          "status": 200, "expected": "reported", "ok": False, "note": ""}],
              "findings": [{"title": "replayd serves data without credentials", "detail": "GET /", "severity": "warning"}],
              "failures": []}
    request.node.user_properties.append(("security_probes", json.dumps(report)))
"""


def inner_pytest(tmp_path: Path, source: str, env: dict[str, str] | None = None,
                 workers: str = "2") -> tuple[subprocess.CompletedProcess[str], Path]:
    """A pytest session of its own (under xdist, so the secrets travel from workers), with every report the run writes."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(source))
    reports = tmp_path / "reports"
    argv = [sys.executable, "-m", "pytest", str(tmp_path / "test_inner.py"), "-p", "no:cacheprovider", "-n", workers,
            "--rootdir", str(tmp_path), "--runbook-report", str(reports), "--alluredir", str(reports / "allure-results"),
            "--junitxml", str(reports / "junit.xml")]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    return done, reports


def test_a_session_whose_tests_pass_fails_when_the_harness_leaked(tmp_path: Path) -> None:
    token, key = a_secret(), a_secret()
    done, reports = inner_pytest(tmp_path, INNER_LEAKY, {"PLANTED_TOKEN": token, "PLANTED_KEY": key})
    assert done.returncode == 1, done.stdout[-2000:]
    assert "2 passed" in done.stdout and "HARNESS LEAK: OBSERVER_TOKEN" in done.stdout
    block = json.loads((reports / "summary.json").read_text())["secrets"]
    found = {(leak["secret"], leak["kind"], leak.get("detail")) for leak in block["harness_leaks"]}
    assert ("OBSERVER_TOKEN", "allure-attachment", "careless attachment") in found
    assert ("RUN_ARCHIVE_S3_SECRET_KEY", "test-output", None) in found
    assert block["secret_names"] == ["OBSERVER_TOKEN", "RUN_ARCHIVE_S3_SECRET_KEY"] and block["checked"] > 3
    for text in (done.stdout, done.stderr, (reports / "summary.json").read_text(), (reports / "summary.md").read_text(),
                 (reports / "junit.xml").read_text()):
        assert token not in text and key not in text, "a leak report must name the secret, never show it"


def test_a_target_leak_is_a_defect_in_a_row_of_its_own_while_the_pytest_session_passes(tmp_path: Path) -> None:
    done, reports = inner_pytest(tmp_path, INNER_TARGET_LEAK, workers="0")
    assert done.returncode == 0, done.stdout[-2000:]
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["secrets"]["harness_leaks"] == [] and summary["secrets"]["target_checked"] == 4
    assert [leak["where"] for leak in summary["secrets"]["target_leaks"]] == ["audit-spool/date=20260101/part-1.jsonl"]
    security = summary["security"]
    assert [t["nodeid"].split("::")[-1] for t in security["tests"]] == ["test_a_security_probe"]
    titles = [f["title"] for f in security["findings"]]
    assert "replayd serves data without credentials" in titles
    assert len(security["probes"]) == 1 and security["failures"] == []
    rows = {row["id"]: row for row in summary["beyond"]}
    assert rows["beyond:security-probes"]["outcome"] == "pass"  # a warning finding does not fail its row
    secrets_row = rows["beyond:target-secrets"]
    assert [f["title"] for f in secrets_row["findings"]] == ["the target wrote the secret OBSERVER_TOKEN into its audit-spool"]
    assert secrets_row["outcome"] == "fail" and exit_code(row["outcome"] for row in summary["beyond"]) == 1


# -- the real run: `quantlab-chaos run` -------------------------------------------------------------------------


def chaos_run(reports: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "run", "--only", ITEM, "-n", "1", "--reports", str(reports), *args],
                          capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)


def test_quantlab_chaos_run_fails_when_the_harness_writes_a_token_into_an_attachment(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    done = chaos_run(reports, "--pytest-arg=-ptests.leak_plant")
    summary = json.loads((reports / "summary.json").read_text())
    row = next(r for r in summary["items"] if r["id"] == ITEM)
    assert row["outcome"] == "pass", "the scenario itself passed"
    # A secret in the harness's own reports is the harness's failure: exit 3 (error), not a verdict on the target.
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    leaks = summary["secrets"]["harness_leaks"]
    assert [(leak["secret"], leak["kind"], leak.get("detail")) for leak in leaks] == \
        [("OBSERVER_TOKEN", "allure-attachment", PLANTED_ATTACHMENT)]
    planted = (reports / leaks[0]["where"]).read_text()
    assert planted.startswith(PLANTED_PREFIX), "the leak names the very file the plant wrote"
    token = planted.removeprefix(PLANTED_PREFIX)
    assert f"leaked the secret OBSERVER_TOKEN into {leaks[0]['where']}" in done.stderr
    for name in ("summary.json", "summary.md", "junit.xml"):
        assert token not in (reports / name).read_text(), f"{name} shows the value"
    assert token not in done.stdout + done.stderr


def test_quantlab_chaos_run_reports_a_target_that_writes_its_token_into_the_audit_trail(tmp_path: Path) -> None:
    leaky = twin_copy(tmp_path / "leaky", {
        "core/audit/AuditWriter.js": ("const line = redact(JSON.stringify(entry)) + '\\n';",
                                      "const line = JSON.stringify({ ...entry, metadata: { ...entry.metadata, "
                                      "planted: process.env.OBSERVER_TOKEN } }) + '\\n';"),
    })
    # The operator accepts the audit-spool leak by name; the same token in S3 is not accepted.
    (leaky / ".quantlab-chaos.toml").write_text('[accept]\n"target-secret:OBSERVER_TOKEN:audit-spool" = "OPS-42: '
                                                'the spool is root-only; fix due in 2.4"\n')
    reports = tmp_path / "reports"
    done = chaos_run(reports, "--quantlab-root", str(leaky))
    assert done.returncode == 1, "a secret the target writes is a defect beyond the runbook: " + done.stdout[-2000:]
    summary = json.loads((reports / "summary.json").read_text())
    row = next(row for row in summary["beyond"] if row["id"] == "beyond:target-secrets")
    by_name = {f["name"]: f for f in row["findings"]}
    assert by_name["target-secret:OBSERVER_TOKEN:audit-spool"]["accepted"] == {
        "by": ".quantlab-chaos.toml line 2", "reason": "OPS-42: the spool is root-only; fix due in 2.4"}
    assert "accepted" not in by_name["target-secret:OBSERVER_TOKEN:s3"]
    assert row["outcome"] == "fail" and "the target wrote the secret OBSERVER_TOKEN into its s3" in row["message"]
    assert all(item["outcome"] == "pass" for item in summary["items"]), "the runbook item itself still passes"
    block = summary["secrets"]
    assert block["harness_leaks"] == [], "the allure attachments of the audit spool are redacted"
    kinds = {leak["kind"] for leak in block["target_leaks"] if leak["secret"] == "OBSERVER_TOKEN"}
    assert kinds == {"audit-spool", "s3"}
    assert any(leak["where"].startswith("s3://") and "/audit/date=" in leak["where"] for leak in block["target_leaks"])
    markdown = (reports / "summary.md").read_text()
    assert "target leak (finding)" in markdown
    assert ("(`beyond:target-secrets`) | **fail** | 0 | 2 defect; "
            "defect: the target wrote the secret OBSERVER_TOKEN into its s3 |") in markdown
    assert "accepted by .quantlab-chaos.toml line 2" in markdown and "Beyond the runbook:" in done.stdout
    assert "0 harness leak(s)" in done.stdout
