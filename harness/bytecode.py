"""Compiled modules kept in a cache of ours, for `quantlab-chaos` and the pytest it starts.

Every xdist worker imports the harness and its libraries, and pytest rewrites the asserts of each plugin and test
module. Where PYTHONDONTWRITEBYTECODE is set (many CI images set it) nothing is cached, and every process compiles
it all again: seconds of CPU each, taken from the services under test on a machine that runs many scenarios at
once. So our processes write bytecode, but to `cache()` (PYTHONPYCACHEPREFIX), never beside the sources; a
PYTHONPYCACHEPREFIX of the user's own is kept. Light on purpose: the command line imports it first.
`python -m harness.bytecode COMMAND...` runs a command with this environment (make test-harness uses it).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path


def cache() -> Path:
    """`$QUANTLAB_CHAOS_CACHE/pycache`, by default `${XDG_CACHE_HOME:-~/.cache}/quantlab-chaos/pycache`."""
    explicit = os.environ.get("QUANTLAB_CHAOS_CACHE")
    base = Path(explicit) if explicit else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quantlab-chaos"
    return base.expanduser() / "pycache"


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: ours) for a Python child that should keep its compiled modules in `cache()`."""
    result = dict(os.environ if env is None else env)
    result.pop("PYTHONDONTWRITEBYTECODE", None)
    result.setdefault("PYTHONPYCACHEPREFIX", str(cache()))
    return result


def use_cache() -> None:
    """This process too: what it imports from now on is compiled once, into the same cache as its children's."""
    sys.dont_write_bytecode = False
    if not sys.pycache_prefix:
        sys.pycache_prefix = os.environ.get("PYTHONPYCACHEPREFIX") or str(cache())


def main(argv: list[str]) -> int:
    """Replaces this process with `argv`, run with `child_env()`."""
    if not argv:
        print("usage: python -m harness.bytecode COMMAND [ARG...]: runs COMMAND with compiled modules kept in "
              f"{cache()}", file=sys.stderr)
        return 2
    os.execvpe(argv[0], argv, child_env())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
