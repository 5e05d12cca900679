"""Opening a generated HTML report in headless Chromium, served over HTTP on a port from the OS."""
from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def rendered_text(site: Path, page: str = "index.html", budget_ms: int = 15000) -> str:
    """The page's DOM after its scripts ran, as text (tags stripped)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "headless Chromium is not installed"
    handler = functools.partial(_QuietHandler, directory=str(site))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server, \
            tempfile.TemporaryDirectory() as profile:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/{page}"
        try:
            done = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                   f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                                  capture_output=True, text=True, timeout=90)
        finally:
            server.shutdown()
    visible = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", done.stdout)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", visible))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass
