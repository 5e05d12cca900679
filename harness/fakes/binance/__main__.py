"""`python -m harness.fakes.binance [--port P] [--rate R] [--seed S]`: the fake exchange until Ctrl-C or SIGTERM."""
from __future__ import annotations

from harness.fakes.binance.standalone import main

if __name__ == "__main__":
    raise SystemExit(main())
