"""A pytest plugin that leaks on purpose: it writes each test's observer token into an allure attachment.

Only tests/test_secrets_scan.py loads it (`quantlab-chaos run --pytest-arg=-ptests.leak_plant`), to prove that the
secret leak scan catches the harness writing a secret into its own reports and fails the run.
"""
from __future__ import annotations

from collections.abc import Iterator

import allure
import pytest

PLANTED_ATTACHMENT = "planted token"
PLANTED_PREFIX = "planted: "


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    yield
    env = getattr(item, "funcargs", {}).get("quantlab")
    if env is not None:
        allure.attach(PLANTED_PREFIX + env.token, name=PLANTED_ATTACHMENT, attachment_type=allure.attachment_type.TEXT)
