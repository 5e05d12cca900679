"""Secrets never reach logs, reports or attachments: one redaction for the harness and the canary.

A secret is masked wherever it stands as a whole token (not inside a longer word), longest first, so a secret that
contains another is masked whole rather than leaving its tail. Values shorter than MIN_SECRET_LENGTH are never masked
(they would blank out ordinary words); the canary's config refuses secrets that short, so none goes unmasked.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

REDACTED = "***"
MIN_SECRET_LENGTH = 4
SECRET_NAME = re.compile(r"TOKEN|SECRET|KEY|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z0-9_]")
# A token starts after a non-word character or after a percent-encoded one (`token%3Dabcd` in a logged URL).
_STARTS = r"(?:(?<![A-Za-z0-9_])|(?<=%[0-9A-Fa-f]{2}))"
_ENDS = r"(?![A-Za-z0-9_])"


def _whole(secret: str) -> str:
    """The secret as a pattern that matches it only as a whole token: a boundary is required only at an edge that
    is itself a word character (a secret ending in '/' may be followed by anything)."""
    starts = _STARTS if _WORD.match(secret[0]) else ""
    ends = _ENDS if _WORD.match(secret[-1]) else ""
    return f"{starts}{re.escape(secret)}{ends}"


class Redactor:
    """Masks a fixed set of secrets; compiled once, safe to share between threads (it holds no mutable state)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        maskable = sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
        self._pattern = re.compile("|".join(_whole(secret) for secret in maskable)) if maskable else None

    def __call__(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub(REDACTED, text)


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every whole-token occurrence of every secret (longest first) replaced by ***."""
    return Redactor(secrets)(text)


def is_secret_name(name: str) -> bool:
    """True for env names whose values must never be printed (tokens, keys, passwords)."""
    return bool(SECRET_NAME.search(name))


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` safe to print: secret-looking names keep their name, not their value."""
    return {key: (REDACTED if is_secret_name(key) and value else value) for key, value in env.items()}


def too_short(name: str, value: str) -> str | None:
    """Why a configured secret cannot be protected, or None: shorter than MIN_SECRET_LENGTH it cannot be masked."""
    if value and len(value) < MIN_SECRET_LENGTH:
        return (f"{name} is {len(value)} character(s) long; a secret shorter than {MIN_SECRET_LENGTH} cannot be masked in "
                "logs and reports without masking ordinary words, so use a longer one")
    return None
