"""What keeps a chaos run's own CPU low, so the services under test get the cores: bytecode kept in our cache
across runs (even where PYTHONDONTWRITEBYTECODE is set), and one TLS context for every HTTP call."""
from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness import bytecode
from quantlab_chaos import tls


def test_bytecode_env_writes_to_our_cache_even_where_the_environment_forbids_writing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTLAB_CHAOS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    env = bytecode.child_env()
    assert "PYTHONDONTWRITEBYTECODE" not in env and env["PYTHONPYCACHEPREFIX"] == str(tmp_path / "cache" / "pycache")
    assert bytecode.cache() == tmp_path / "cache" / "pycache"

    source = tmp_path / "src"
    source.mkdir()
    (source / "speedy.py").write_text("VALUE = 41 + 1\n")
    done = subprocess.run([sys.executable, "-c", "import speedy; print(speedy.VALUE)"], cwd=source, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "42", done.stderr
    cached = list((tmp_path / "cache" / "pycache").rglob("speedy*.pyc"))
    assert cached, "the module's bytecode is in our cache"
    assert not (source / "__pycache__").exists(), "nothing is written beside the sources"


def test_bytecode_env_keeps_a_prefix_of_the_users_own(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path / "mine"))
    assert bytecode.child_env()["PYTHONPYCACHEPREFIX"] == str(tmp_path / "mine")
    given = bytecode.child_env({"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1"})
    assert "PYTHONDONTWRITEBYTECODE" not in given and given["PYTHONPYCACHEPREFIX"].endswith("pycache")


def test_one_tls_context_is_shared_and_verifies_as_httpx_would() -> None:
    context = tls.context()
    assert context is tls.context(), "built once, not per call"
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname, "sharing it weakens nothing"
    assert context.cert_store_stats()["x509_ca"] > 0, "it carries the certificate authorities httpx loads"


def test_a_call_with_the_shared_context_reaches_a_plain_http_server() -> None:
    """The shared context is accepted wherever httpx takes verify= (the harness's calls are plain HTTP)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Answer) as server:
        Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/"
            assert httpx.get(url, timeout=5, verify=tls.context(), trust_env=False).status_code == 204
            with httpx.Client(timeout=5, verify=tls.context(), trust_env=False) as client:
                assert client.get(url).status_code == 204
        finally:
            server.shutdown()


def test_the_command_line_itself_compiles_into_the_cache(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "quick.py").write_text("VALUE = 7\n")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "QUANTLAB_CHAOS_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(source), str(Path(run_root()))])}
    env.pop("PYTHONPYCACHEPREFIX", None)
    code = "import sys; from harness import bytecode; bytecode.use_cache(); import quick; print(quick.VALUE, sys.pycache_prefix)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["7", str(tmp_path / "cache" / "pycache")]
    assert list((tmp_path / "cache" / "pycache").rglob("quick*.pyc")) and not (source / "__pycache__").exists()


def run_root() -> Path:
    """The project folder, where the harness package is."""
    return Path(bytecode.__file__).resolve().parents[1]


def test_the_module_runs_a_command_with_the_cache_environment(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "QUANTLAB_CHAOS_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONPYCACHEPREFIX", None)
    code = "import os; print(os.environ.get('PYTHONDONTWRITEBYTECODE'), os.environ['PYTHONPYCACHEPREFIX'])"
    done = subprocess.run([sys.executable, "-m", "harness.bytecode", sys.executable, "-c", code], cwd=run_root(), env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["None", str(tmp_path / "cache" / "pycache")], done.stderr
    bare = subprocess.run([sys.executable, "-m", "harness.bytecode"], cwd=run_root(), capture_output=True, text=True,
                          timeout=60)
    assert bare.returncode == 2 and "usage: python -m harness.bytecode COMMAND" in bare.stderr
