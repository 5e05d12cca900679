"""Secrets never reach logs, reports or attachments: every known secret value is replaced before writing."""
from __future__ import annotations

from collections.abc import Iterable

REDACTED = "***"
MIN_SECRET_LENGTH = 4  # shorter values would blank out ordinary text


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of every secret (longest first) replaced by ***."""
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text
