"""Fixtures the supervisor tests share (tests/test_services.py, tests/test_cgroups.py)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.sysd.supervisor import Supervisor
from tests.supervised import Units


@pytest.fixture()
def units(tmp_path: Path) -> Units:
    """Writes scripts and unit files into this test's folder."""
    return Units(tmp_path)


@pytest.fixture()
def sup(tmp_path: Path) -> Iterator[Supervisor]:
    """A supervisor of this test's own, stopped (with everything it started) at the end."""
    with Supervisor(tmp_path / "runtime") as supervisor:
        yield supervisor
