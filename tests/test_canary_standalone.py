"""The production canary stands alone: installed with `pip install '.[canary]'` (offline, from the canary's
wheelhouse) into a fresh virtualenv from a copy of the project that holds only the canary and the shared core (no
harness/, no tests/), it imports, answers --help and runs a check against a live observer, and that virtualenv has
none of the harness's packages."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.environment import QuantLabEnvironment
from tests.canary_support import write_toml

PROJECT = Path(__file__).resolve().parents[1]
CANARY_PARTS = ("pyproject.toml", "README.md", "canary", "quantlab_chaos")
HARNESS_ONLY = ("pytest", "xdist", "moto", "testcontainers", "websockets", "psutil", "allure_pytest", "harness")
INSTALL_TIMEOUT_S = 600
# Made by `make test` (tools/canary_wheelhouse.py) before pytest: the tests themselves run without a network.
WHEELHOUSE = PROJECT / ".tools" / "wheelhouse"


def _copy_canary_only(destination: Path) -> Path:
    destination.mkdir(parents=True)
    for part in CANARY_PARTS:
        source = PROJECT / part
        if source.is_dir():
            shutil.copytree(source, destination / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, destination / part)
    return destination


@pytest.fixture(scope="module")
def canary_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A virtualenv with only the canary's install (made once for this module)."""
    if not any(WHEELHOUSE.glob("*.whl")):
        pytest.skip(f"no wheelhouse at {WHEELHOUSE}: `make test` makes it (python3 tools/canary_wheelhouse.py {WHEELHOUSE})")
    base = tmp_path_factory.mktemp("canary-install")
    source = _copy_canary_only(base / "source")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--no-index",
         "--find-links", str(WHEELHOUSE), f"{source}[canary]"],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, cwd=base,
        env={**os.environ, "PIP_NO_INPUT": "1", "PYTHONWARNINGS": "ignore"})
    assert install.returncode == 0, f"pip install '.[canary]' failed:\n{install.stdout[-2000:]}\n{install.stderr[-2000:]}"
    yield python


def _in(python: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, timeout=60, cwd="/")


def test_the_canary_install_imports_without_the_harness_s_packages(canary_python: Path) -> None:
    found = _in(canary_python, "import importlib.util, json; "
                f"print(json.dumps({{m: importlib.util.find_spec(m) is not None for m in {list(HARNESS_ONLY)!r}}}))")
    assert found.returncode == 0, found.stderr
    assert not any(json.loads(found.stdout).values()), f"the canary's install carries harness packages: {found.stdout}"
    imported = _in(canary_python, "import sys, canary, canary.cli, canary.suite, canary.live; "
                   "print(sorted(m for m in sys.modules if m.split('.')[0] in ('harness', 'pytest', 'moto')))")
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported.stdout + imported.stderr
    strategy = _in(canary_python, "from canary.config import default_strategy; p = default_strategy(); "
                   "print(p.is_file(), (p.parent / 'package.json').is_file())")
    assert strategy.stdout.split() == ["True", "True"], "the default strategy ships with the canary"


def test_help_and_the_harness_command_say_what_they_are(canary_python: Path) -> None:
    helped = subprocess.run([str(canary_python), "-m", "canary", "--help"], capture_output=True, text=True, timeout=60,
                            cwd="/")
    assert helped.returncode == 0 and "--config" in helped.stdout, helped.stderr
    # The harness's command, run by the canary's Python (as its console script would be from a full checkout's
    # `pip install '.[canary]'`), says which install it is in rather than failing on an import.
    chaos = subprocess.run([str(canary_python), "-c", "import sys; from harness.cli import main; sys.exit(main(['run']))"],
                           capture_output=True, text=True, timeout=60, cwd=PROJECT)
    assert chaos.returncode == 2 and "Traceback" not in chaos.stderr, chaos.stderr
    assert "quantlab-chaos[chaos]" in chaos.stderr and "production canary" in chaos.stderr, chaos.stderr


def test_a_check_runs_against_a_live_observer(canary_python: Path, quantlab: QuantLabEnvironment,
                                             tmp_path: Path) -> None:
    quantlab.start("observer")
    config = write_toml(tmp_path / "canary.toml", {
        "target": {"observer_url": quantlab.observer_url},
        "auth": {"token_env": "OBSERVER_TOKEN"},
    })
    env = {"PATH": os.environ["PATH"], "OBSERVER_TOKEN": quantlab.token}
    run = subprocess.run([str(canary_python), "-m", "canary", "--config", str(config), "--check", "observer_auth",
                          "--json"], capture_output=True, text=True, timeout=120, env=env, cwd="/")
    assert run.returncode == 0, run.stdout + run.stderr
    checks = {check["name"]: check for check in json.loads(run.stdout)["checks"]}
    assert list(checks) == ["observer_auth"] and checks["observer_auth"]["ok"], run.stdout
    assert quantlab.token not in run.stdout + run.stderr

    wrong = subprocess.run([str(canary_python), "-m", "canary", "--config", str(config), "--check", "observer_auth",
                            "--json"], capture_output=True, text=True, timeout=120,
                           env={**env, "OBSERVER_TOKEN": "not-the-token"}, cwd="/")
    assert wrong.returncode == 1, "the same check fails with the wrong token: " + wrong.stdout + wrong.stderr
    verdict = json.loads(wrong.stdout)["checks"][0]
    assert verdict["runbook_item"] == "failure:observer-unauthorized" and "OBSERVER_TOKEN" in verdict["fix"]
