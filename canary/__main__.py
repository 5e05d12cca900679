"""`python -m canary --config FILE ...`: see canary/cli.py."""
from __future__ import annotations

import sys

from canary.cli import main

if __name__ == "__main__":
    sys.exit(main())
