"""One redaction for the harness and the canary: longest secret first, whole tokens only, nothing too short to mask."""
from __future__ import annotations

from pathlib import Path

import pytest

from canary.config import ConfigProblem, load_config
from quantlab_chaos.redact import MIN_SECRET_LENGTH, Redactor, redact, redact_env
from tests.canary_support import write_toml


def test_a_secret_that_contains_another_is_masked_whole() -> None:
    assert redact("tok=abcdWXYZ and abcd", ["abcd", "abcdWXYZ"]) == "tok=*** and ***"
    assert redact("tok=abcdWXYZ and abcd", ["abcdWXYZ", "abcd"]) == "tok=*** and ***", "the order given does not matter"


def test_only_whole_tokens_are_masked() -> None:
    # a secret standing inside a longer word is not that secret: "file" must not become "fi***"
    assert redact("file: xfile; file", ["file"]) == "***: xfile; ***"
    assert redact("Bearer s3cr3t-t0ken,", ["s3cr3t-t0ken"]) == "Bearer ***,"
    assert redact('{"token":"s3cr3t-t0ken"}', ["s3cr3t-t0ken"]) == '{"token":"***"}'
    assert redact("?key=s3cr3t&x=1", ["s3cr3t"]) == "?key=***&x=1"
    assert redact("GET /x?token%3Ds3cr3t%26y", ["s3cr3t"]) == "GET /x?token%3D***%26y", "percent-encoded neighbours"
    assert redact("key=abc/xyz", ["abc/"]) == "key=***xyz", "an edge that is no word character needs no boundary"


def test_secrets_with_regex_characters_are_literal() -> None:
    secret = "a+b*c(d)[e]\\f$"
    assert redact(f"x {secret} y", [secret]) == "x *** y"
    assert redact("x aaab*c(d)[e]\\f$ y", [secret]) == "x aaab*c(d)[e]\\f$ y"


def test_values_too_short_to_mask_are_left_and_the_redactor_is_reusable() -> None:
    short = "x" * (MIN_SECRET_LENGTH - 1)
    mask = Redactor([short, "", "longsecret"])
    assert mask(f"{short} longsecret") == f"{short} ***"
    assert mask("longsecret again") == "*** again"
    assert Redactor([])("nothing to hide") == "nothing to hide"


def test_redact_env_hides_secret_looking_names_only() -> None:
    assert redact_env({"OBSERVER_TOKEN": "t0ken", "RUN_ARCHIVE_S3_SECRET_KEY": "y", "PORT": "9150", "EMPTY_TOKEN": ""}) \
        == {"OBSERVER_TOKEN": "***", "RUN_ARCHIVE_S3_SECRET_KEY": "***", "PORT": "9150", "EMPTY_TOKEN": ""}


def test_the_canary_refuses_a_secret_too_short_to_mask(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "canary.toml", {"target": {"observer_url": "http://127.0.0.1:9150"}})
    with pytest.raises(ConfigProblem) as problem:
        load_config(config, {"OBSERVER_TOKEN": "abc"})
    assert "[auth] token (from env OBSERVER_TOKEN) is 3 character(s) long" in str(problem.value)
    assert "abc" not in str(problem.value).replace("character", "")
    assert load_config(config, {"OBSERVER_TOKEN": "abcd"}).token == "abcd"
