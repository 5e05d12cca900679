"""The security probes: their parts against real sockets and servers, and the scenario against a twin that is lax."""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from harness.secrets_scan import SecretSet
from harness.security import SecurityReport, connect_host, credential_mistakes, listening_sockets, probe_open_port
from harness.target import PROJECT_ROOT
from tests.twin_copy import twin_copy

SCENARIO = PROJECT_ROOT / "harness" / "scenarios" / "test_security_probes.py"


def test_wildcard_binds_are_reached_on_loopback() -> None:
    assert connect_host("0.0.0.0") == "127.0.0.1" and connect_host("::") == "127.0.0.1"
    assert connect_host("::1") == "[::1]" and connect_host("10.1.2.3") == "10.1.2.3"


def test_credential_mistakes_keep_the_token_out_of_their_repr() -> None:
    token = secrets.token_urlsafe(24)
    mistakes = credential_mistakes(token)
    assert len({m.label for m in mistakes}) == len(mistakes) >= 7
    assert token not in repr(mistakes)
    assert any(token in m.query for m in mistakes) and any(m.headers.get("Authorization") == f"bearer {token}" for m in mistakes)


def test_listening_sockets_of_a_process_tree() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert ("127.0.0.1", port) in listening_sockets([os.getpid()])
    assert ("127.0.0.1", port) not in listening_sockets([os.getpid()])


class _Leaky(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def open_server() -> Iterator[tuple[ThreadingHTTPServer, type[_Leaky]]]:
    handler = type("Handler", (_Leaky,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_port_serving_data_or_a_secret_without_credentials_is_a_finding(
        open_server: tuple[ThreadingHTTPServer, type[_Leaky]]) -> None:
    server, handler = open_server
    key = secrets.token_urlsafe(30)
    handler.body = json.dumps({"config": {"secret": key}}).encode()
    report = SecurityReport(secrets=SecretSet({"RUN_ARCHIVE_S3_SECRET_KEY": key}))
    with httpx.Client(timeout=3.0) as client:
        probe_open_port(client, report, "replayd", "127.0.0.1", server.server_address[1])
    assert [(p.path, p.status, p.ok) for p in report.probes] == [("/", 200, False), ("/health", 200, False)]
    severities = {(f.title, f.severity) for f in report.findings}
    assert ("replayd serves data without credentials", "warning") in severities
    assert ("replayd serves a secret without credentials", "defect") in severities
    assert key not in json.dumps(report.to_dict()) and not report.failures


def test_a_port_that_answers_no_http_is_reported() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        accepted: list[socket.socket] = []

        def close_at_once() -> None:
            conn, _ = server.accept()
            conn.close()
            accepted.append(conn)

        thread = threading.Thread(target=close_at_once, daemon=True)
        thread.start()
        report = SecurityReport()
        with httpx.Client(timeout=3.0) as client:
            probe_open_port(client, report, "odd", "0.0.0.0", server.getsockname()[1])
        thread.join(5)
    assert report.probes[0].status is None and "no HTTP answer" in report.probes[0].note
    assert report.findings[0].severity == "info"


def test_the_scenario_fails_a_lax_observer_and_reports_an_open_port(tmp_path: Path) -> None:
    lax = twin_copy(tmp_path / "lax", {
        "core/observer/server.js": ("export const STOP_RATE_LIMIT_PER_MIN = 30;", "export const STOP_RATE_LIMIT_PER_MIN = 300;"),
        "services/replayd/server.js": (
            "    if (!bearerOk(req, token)) return sendJson(res, 401, UNAUTHORIZED);",
            "    if (pathname === '/') return sendJson(res, 200, { service: SERVICE, key: archive.secretAccessKey });\n"
            "    if (!bearerOk(req, token)) return sendJson(res, 401, UNAUTHORIZED);"),
    })
    # A second edit of the observer (twin_copy makes one per file): the scheme compared without regard to case.
    observer = lax / "core/observer/server.js"
    assert "header.startsWith('Bearer ')" in observer.read_text()
    observer.write_text(observer.read_text().replace("header.startsWith('Bearer ')",
                                                     "header.toLowerCase().startsWith('bearer ')", 1))
    reports = tmp_path / "reports"
    done = subprocess.run([sys.executable, "-m", "pytest", str(SCENARIO), "-p", "no:cacheprovider", "-n", "0",
                           "--rootdir", str(PROJECT_ROOT), "--quantlab-root", str(lax), "--runbook-report", str(reports)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stdout[-3000:]
    summary = json.loads((reports / "summary.json").read_text())
    security = summary["security"]
    assert [t["outcome"] for t in security["tests"]] == ["failed"]
    failures = "\n".join(security["failures"])
    assert "lowercase 'bearer' scheme answered 200" in failures and "served it without the bearer header" in failures
    assert "stop-path limit" in failures and "none answered 429" in failures
    assert "no credentials answered" not in failures, "the requests without any token are still refused"
    titles = {(f["title"], f["severity"]) for f in security["findings"]}
    assert ("replayd serves data without credentials", "warning") in titles
    assert ("replayd serves a secret without credentials", "defect") in titles
    assert summary["secrets"]["harness_leaks"] == [], "the probe report names the secret it saw, never its value"
    assert {p["service"] for p in security["probes"]} >= {"observer", "replayd", "worker", "console"}
    assert security["ports"]["observer"] and security["ports"]["replayd"], "each service's listening sockets are listed"
