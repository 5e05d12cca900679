"""Downloads the wheels the production canary's install needs (its dependencies in pyproject.toml and the build
backend) into a folder, so `pip install --no-index --find-links DIR '.[canary]'` works on a host without an index.

`make test` runs it before pytest, whose tests run without a network (harness.isolation): tests/test_canary_standalone.py
installs the canary into a fresh virtualenv from this folder. Usage: python3 tools/canary_wheelhouse.py DIR
"""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def requirements() -> list[str]:
    """The canary's requirements: the base dependencies (the `canary` extra adds none) and the build backend's."""
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text(encoding="utf-8"))
    extra = project["project"].get("optional-dependencies", {}).get("canary", [])
    return [*project["build-system"]["requires"], *project["project"]["dependencies"], *extra]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    folder = Path(argv[0])
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet", "--only-binary=:all:",
               "--dest", str(folder), *requirements()]
    try:
        result = subprocess.run(command, timeout=900)
    except subprocess.TimeoutExpired:
        print("canary wheelhouse: pip download took over 15 minutes; check the package index is reachable", file=sys.stderr)
        return 1
    if result.returncode != 0:
        print(f"canary wheelhouse: pip download failed (exit {result.returncode}); the package index must be reachable "
              "(or set PIP_INDEX_URL to a mirror)", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
