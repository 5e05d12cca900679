"""Errors a user can cause, each carrying one paragraph that says what to do, and an exit code."""
from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class HarnessError(Exception):
    """A failure the user can fix: the message says what happened and what to do next."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(" ".join(message.split()))
        if exit_code is not None:
            self.exit_code = exit_code


class MissingToolError(HarnessError):
    """A binary the harness needs (node, npm, go, toxiproxy) is not installed."""


class ConfigError(HarnessError):
    """Bad configuration or input files (runbook, unit files, TOML)."""


class UnitError(ConfigError):
    """A unit or env file that systemd would refuse, or that the harness cannot boot."""


class UnreachableError(HarnessError):
    """A target or dependency does not answer."""

    exit_code = EXIT_UNREACHABLE
