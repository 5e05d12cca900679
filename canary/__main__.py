"""`python -m canary --config FILE ...`: see canary/cli.py.

Run by a Python without the canary's packages (the system's, outside the project's .venv), it says how to run it
instead of ending in an ImportError's traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

EXIT_USAGE = 2
PROJECT = Path(__file__).resolve().parents[1]


def how_to_run(lacking: str) -> str:
    """One paragraph: what this Python lacks, and the two ways to run the canary with what it needs."""
    return (f"python -m canary: this Python ({sys.executable}) {lacking}, so it cannot run the canary here. Run "
            f"{PROJECT}/bin/quantlab-canary with the same arguments (it makes the project's environment, .venv, on "
            f"first use), or {PROJECT}/.venv/bin/python -m canary once `make bootstrap` has made it.")


def _main() -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - run by any python3: the point is to say this one is too old
        print(how_to_run(f"is {sys.version.split()[0]}, and the canary needs Python 3.11 or newer"), file=sys.stderr)
        return EXIT_USAGE
    try:
        from canary.cli import main
    except ModuleNotFoundError as exc:
        if (exc.name or "canary").partition(".")[0] == "canary":
            raise  # our own module missing is a broken checkout, not the wrong Python
        print(how_to_run(f"does not have the package {exc.name}"), file=sys.stderr)
        return EXIT_USAGE
    return main()


if __name__ == "__main__":
    sys.exit(_main())
