"""The canary's configuration: a TOML file, overridden by QUANTLAB_CANARY_* environment variables.

Secrets (the observer token, the S3 keys, the webhook URL when it carries one) come only from environment
variables or files named in the config, never from the TOML itself and never from flags. Every problem found
is reported, one sentence each, so a bad config is fixed in one round.
"""
from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from quantlab_chaos.redact import too_short

CONTRACT_CANARY_ARGV = ("node", "tools/run-canary-live.js", "--exchange", "binance", "--symbols", "BTCUSDT,ETHUSDT",
                        "--strategy", "/path/to/strategy.js", "--dataset-parquet", "live", "--dataset-meta", "live")
CONTRACT_SPOOL_DIR = "/tmp/quantlab-audit"
DEFAULT_TOKEN_ENV = "OBSERVER_TOKEN"
DEFAULT_ACCESS_KEY_ENV = "RUN_ARCHIVE_S3_ACCESS_KEY"
DEFAULT_SECRET_KEY_ENV = "RUN_ARCHIVE_S3_SECRET_KEY"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SYMBOL = re.compile(r"^[A-Z0-9]{2,30}$")

# Keys that would put a secret into the TOML file: refused, whatever their value.
LITERAL_SECRETS = {
    "auth": ("token", "bearer", "observer_token", "password"),
    "s3": ("access_key", "secret_key", "access_key_id", "secret_access_key", "aws_access_key_id", "aws_secret_access_key"),
}

SECRET_SOURCES = {
    "auth": "token_env or token_file",
    "s3": "access_key_env/secret_key_env or access_key_file/secret_key_file",
}

ALLOWED_KEYS: dict[str, tuple[str, ...]] = {
    "target": ("quantlab_root", "observer_url", "runbook"),
    "auth": ("token_env", "token_file"),
    "s3": ("endpoint", "bucket", "region", "access_key_env", "secret_key_env", "access_key_file", "secret_key_file"),
    "audit": ("spool_dir",),
    "health": ("max_last_event_age_ms",),
    "live": ("symbols", "strategy", "duration_s", "expected_stop_reasons", "max_last_event_age_ms", "env_files", "timeout_s"),
    "alert": ("webhook_url", "webhook_url_env", "webhook_url_file", "timeout_s"),
    "run": ("timeout_s", "http_timeout_s", "retries"),
}

# QUANTLAB_CANARY_<NAME> -> (section, key, kind); kind "list" is a comma list.
ENV_OVERRIDES: dict[str, tuple[str, str, str]] = {
    "QUANTLAB_CANARY_OBSERVER_URL": ("target", "observer_url", "str"),
    "QUANTLAB_CANARY_QUANTLAB_ROOT": ("target", "quantlab_root", "str"),
    "QUANTLAB_CANARY_RUNBOOK": ("target", "runbook", "str"),
    "QUANTLAB_CANARY_TOKEN_ENV": ("auth", "token_env", "str"),
    "QUANTLAB_CANARY_TOKEN_FILE": ("auth", "token_file", "str"),
    "QUANTLAB_CANARY_S3_ENDPOINT": ("s3", "endpoint", "str"),
    "QUANTLAB_CANARY_S3_BUCKET": ("s3", "bucket", "str"),
    "QUANTLAB_CANARY_S3_REGION": ("s3", "region", "str"),
    "QUANTLAB_CANARY_AUDIT_SPOOL_DIR": ("audit", "spool_dir", "str"),
    "QUANTLAB_CANARY_LIVE_SYMBOLS": ("live", "symbols", "list"),
    "QUANTLAB_CANARY_LIVE_DURATION_S": ("live", "duration_s", "str"),
    "QUANTLAB_CANARY_LIVE_ENV_FILES": ("live", "env_files", "list"),
    "QUANTLAB_CANARY_WEBHOOK_URL": ("alert", "webhook_url", "str"),
    "QUANTLAB_CANARY_TIMEOUT_S": ("run", "timeout_s", "str"),
}


class ConfigProblem(Exception):
    """The configuration cannot be used; `problems` holds one sentence per thing to fix."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class S3Settings:
    endpoint: str
    bucket: str
    region: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)


@dataclass(frozen=True)
class LiveSettings:
    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT")
    strategy: Path = field(default_factory=lambda: default_strategy())
    duration_s: int = 30
    expected_stop_reasons: tuple[str, ...] = ("STREAM_END",)
    max_last_event_age_ms: int = 5000
    env_files: tuple[Path, ...] = ()
    timeout_s: float | None = None

    @property
    def command_timeout_s(self) -> float:
        """How long the canary command may take: its run, then QuantLab's own archive and audit checks."""
        return self.timeout_s if self.timeout_s is not None else self.duration_s + 60.0


@dataclass(frozen=True)
class CanaryConfig:
    path: Path
    observer_url: str
    token: str = field(repr=False)
    token_source: str
    quantlab_root: Path | None = None
    runbook: Path | None = None
    s3: S3Settings | None = None
    spool_dir: Path = Path(CONTRACT_SPOOL_DIR)
    max_health_event_age_ms: int = 5000
    live: LiveSettings = field(default_factory=LiveSettings)
    webhook_url: str | None = field(default=None, repr=False)
    webhook_timeout_s: float = 5.0
    timeout_s: float = 300.0
    http_timeout_s: float = 5.0
    retries: int = 2

    def secrets(self) -> list[str]:
        """Every secret value the canary holds, for redaction of anything it prints or sends."""
        values = [self.token, self.webhook_url or ""]
        if self.s3:
            values += [self.s3.access_key, self.s3.secret_key]
        return [value for value in values if value]


def default_strategy() -> Path:
    """The calm canary strategy, which decides on each symbol's first event (see steady.js)."""
    return Path(str(resources.files("canary").joinpath("strategies", "steady.js")))


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> CanaryConfig:
    """Reads, overrides and validates the config; ConfigProblem lists every problem found."""
    environ = os.environ if environ is None else environ
    config_path = Path(path)
    raw = _read_toml(config_path)
    _apply_env_overrides(raw, environ)
    return _Validator(config_path, raw, environ).config()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigProblem([f"The config file {path} does not exist; pass --config with the canary's TOML file."]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigProblem([f"The config file {path} cannot be read ({type(exc).__name__}); "
                             "make it readable UTF-8 for the canary's user."]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigProblem([f"The config file {path} is not valid TOML ({exc}); fix that line."]) from None


def _apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, (section, key, kind) in ENV_OVERRIDES.items():
        value = environ.get(name)
        if value is None or value == "":
            continue
        table = raw.setdefault(section, {})
        if isinstance(table, dict):
            table[key] = [part.strip() for part in value.split(",") if part.strip()] if kind == "list" else value


class _Validator:
    """Turns the raw TOML into a CanaryConfig, collecting one sentence per problem."""

    def __init__(self, path: Path, raw: dict[str, Any], environ: Mapping[str, str]) -> None:
        self.path = path
        self.raw = raw
        self.environ = environ
        self.problems: list[str] = []

    def config(self) -> CanaryConfig:
        self._check_shape()
        target = self._table("target")
        observer_url = self._url(target, "target", "observer_url", required=True)
        root = self._folder(target, "target", "quantlab_root")
        runbook = self._file(target, "target", "runbook")
        token, token_source = self._secret("auth", "token", DEFAULT_TOKEN_ENV, required_value=False)
        s3 = self._s3()
        spool = self._table("audit").get("spool_dir", CONTRACT_SPOOL_DIR)
        if not isinstance(spool, str) or not spool:
            self.problems.append("[audit] spool_dir must be the audit spool folder's path as a string.")
            spool = CONTRACT_SPOOL_DIR
        health_age = self._number(self._table("health"), "health", "max_last_event_age_ms", 5000, minimum=1, integer=True)
        live = self._live()
        webhook, webhook_timeout = self._alert()
        run = self._table("run")
        timeout = self._number(run, "run", "timeout_s", 300.0, minimum=1)
        http_timeout = self._number(run, "run", "http_timeout_s", 5.0, minimum=0.1)
        retries = self._number(run, "run", "retries", 2, minimum=0, maximum=10, integer=True)
        if self.problems:
            raise ConfigProblem([f"{self.path}: {problem}" for problem in self.problems])
        return CanaryConfig(
            path=self.path, observer_url=observer_url.rstrip("/"), token=token, token_source=token_source,
            quantlab_root=root, runbook=runbook, s3=s3, spool_dir=self._path(spool), max_health_event_age_ms=int(health_age),
            live=live, webhook_url=webhook, webhook_timeout_s=webhook_timeout, timeout_s=float(timeout),
            http_timeout_s=float(http_timeout), retries=int(retries),
        )

    # -- shape ------------------------------------------------------------------------------------------

    def _check_shape(self) -> None:
        for section, value in self.raw.items():
            if section not in ALLOWED_KEYS:
                self.problems.append(f"unknown section [{section}]; the sections are {', '.join(f'[{s}]' for s in ALLOWED_KEYS)}.")
                continue
            if not isinstance(value, dict):
                self.problems.append(f"{section} must be a table ([{section}]), not a single value.")
                continue
            for key in value:
                if key in LITERAL_SECRETS.get(section, ()):
                    # The value is deliberately not echoed: it is a secret in a file that should not hold one.
                    self.problems.append(f"[{section}] {key} puts a secret in the config file, which is refused; "
                                         f"remove it and name the environment variable or file that holds it "
                                         f"({SECRET_SOURCES[section]}).")
                elif key not in ALLOWED_KEYS[section]:
                    self.problems.append(f"[{section}] has an unknown key {key!r}; allowed are {', '.join(ALLOWED_KEYS[section])}.")

    def _table(self, section: str) -> dict[str, Any]:
        value = self.raw.get(section, {})
        return value if isinstance(value, dict) else {}

    # -- values -----------------------------------------------------------------------------------------

    def _path(self, value: str) -> Path:
        """A path from the config; a relative one is taken relative to the config file, not the current folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.path.parent / path

    def _url(self, table: dict[str, Any], section: str, key: str, *, required: bool) -> str:
        value = table.get(key)
        if value is None:
            if required:
                self.problems.append(f"[{section}] {key} is missing; set it to the URL, e.g. http://127.0.0.1:9150.")
            return ""
        parts = urlsplit(value) if isinstance(value, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            self.problems.append(f"[{section}] {key} must be an http:// or https:// URL with a host.")
            return ""
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            self.problems.append(f"[{section}] {key} has a port that is not a number from 1 to 65535.")
            return ""
        return str(value)

    def _folder(self, table: dict[str, Any], section: str, key: str) -> Path | None:
        value = table.get(key)
        if value is None:
            return None
        path = self._path(str(value))
        if not isinstance(value, str) or not path.is_dir():
            self.problems.append(f"[{section}] {key} {value} is not a folder; point it at the QuantLab checkout.")
            return None
        return path.resolve()

    def _file(self, table: dict[str, Any], section: str, key: str) -> Path | None:
        value = table.get(key)
        if value is None:
            return None
        path = self._path(str(value))
        if not isinstance(value, str) or not path.is_file():
            self.problems.append(f"[{section}] {key} {value} is not a readable file; fix the path.")
            return None
        return path.resolve()

    def _number(self, table: dict[str, Any], section: str, key: str, default: float, *, minimum: float,
                maximum: float = math.inf, integer: bool = False) -> float:
        value = table.get(key, default)
        if isinstance(value, str):  # from an environment override
            try:
                value = float(value) if not integer else int(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and minimum <= value <= maximum and (not integer or float(value).is_integer())
        if not ok:
            kind = "a whole number" if integer else "a number"
            upper = f" and at most {maximum:g}" if maximum != math.inf else ""
            self.problems.append(f"[{section}] {key} must be {kind} of at least {minimum:g}{upper}.")
            return default
        return float(value)

    def _secret(self, section: str, name: str, default_env: str | None, *, required_value: bool) -> tuple[str, str]:
        """A secret from `<name>_env` or `<name>_file` (default: the env variable `default_env`), long enough to be
        masked in everything the canary prints (quantlab_chaos.redact)."""
        value, source = self._secret_value(section, name, default_env, required_value=required_value)
        problem = too_short(f"[{section}] {name} (from {source})", value)
        if problem:
            self.problems.append(problem + ".")
        return value, source

    def _secret_value(self, section: str, name: str, default_env: str | None, *,
                      required_value: bool) -> tuple[str, str]:
        table = self._table(section)
        env_name, file_name = table.get(f"{name}_env"), table.get(f"{name}_file")
        if env_name is not None and file_name is not None:
            self.problems.append(f"[{section}] sets both {name}_env and {name}_file; keep one.")
            return "", ""
        if file_name is not None:
            return self._secret_file(section, name, file_name), f"file {file_name}"
        env_name = env_name if env_name is not None else default_env
        if env_name is None:
            return "", ""
        if not isinstance(env_name, str) or not ENV_NAME.match(env_name):
            self.problems.append(f"[{section}] {name}_env must be an environment variable name such as {default_env or 'NAME'}.")
            return "", ""
        value = self.environ.get(env_name, "")
        if required_value and not value:
            self.problems.append(f"the environment variable {env_name} ([{section}] {name}_env) is not set; "
                                 "set it in the canary's env file.")
        return value, f"env {env_name}"

    def _secret_file(self, section: str, name: str, file_name: Any) -> str:
        if not isinstance(file_name, str) or not file_name:
            self.problems.append(f"[{section}] {name}_file must be a file path.")
            return ""
        try:
            value = self._path(file_name).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            self.problems.append(f"[{section}] {name}_file {file_name} cannot be read ({type(exc).__name__}); "
                                 "create it, readable only by the canary's user.")
            return ""
        if not value:
            self.problems.append(f"[{section}] {name}_file {file_name} is empty; put the value in it.")
        return value

    def _s3(self) -> S3Settings | None:
        if "s3" not in self.raw:
            return None
        table = self._table("s3")
        endpoint = self._url(table, "s3", "endpoint", required=True)
        bucket = table.get("bucket")
        if not isinstance(bucket, str) or not bucket:
            self.problems.append("[s3] bucket is missing; set it to the archive bucket (RUN_ARCHIVE_S3_BUCKET).")
        region = table.get("region", "auto")
        if not isinstance(region, str) or not region:
            self.problems.append("[s3] region must be a region name (QuantLab's client uses 'auto').")
        access, _ = self._secret("s3", "access_key", DEFAULT_ACCESS_KEY_ENV, required_value=True)
        secret, _ = self._secret("s3", "secret_key", DEFAULT_SECRET_KEY_ENV, required_value=True)
        return S3Settings(endpoint.rstrip("/"), str(bucket or ""), str(region or "auto"), access, secret)

    def _live(self) -> LiveSettings:
        table = self._table("live")
        defaults = LiveSettings()
        symbols = table.get("symbols", list(defaults.symbols))
        if not isinstance(symbols, list) or not symbols or not all(isinstance(s, str) and SYMBOL.match(s.upper()) for s in symbols):
            self.problems.append("[live] symbols must be a non-empty list of exchange symbols such as [\"BTCUSDT\", \"ETHUSDT\"].")
            symbols = list(defaults.symbols)
        strategy = defaults.strategy
        if "strategy" in table:
            strategy = self._file(table, "live", "strategy") or defaults.strategy
        elif not strategy.is_file():
            self.problems.append(f"[live] strategy is not set and the default {strategy} is missing; set it to a strategy file.")
        duration = self._number(table, "live", "duration_s", defaults.duration_s, minimum=1, maximum=3600, integer=True)
        reasons = table.get("expected_stop_reasons", list(defaults.expected_stop_reasons))
        if not isinstance(reasons, list) or not reasons or not all(isinstance(r, str) and r for r in reasons):
            self.problems.append("[live] expected_stop_reasons must be a non-empty list such as [\"STREAM_END\"].")
            reasons = list(defaults.expected_stop_reasons)
        age = self._number(table, "live", "max_last_event_age_ms", defaults.max_last_event_age_ms, minimum=1, integer=True)
        timeout = table.get("timeout_s")
        if timeout is not None:
            timeout = self._number(table, "live", "timeout_s", 0, minimum=1)
        return LiveSettings(
            symbols=tuple(s.upper() for s in symbols), strategy=strategy, duration_s=int(duration),
            expected_stop_reasons=tuple(reasons), max_last_event_age_ms=int(age),
            env_files=self._env_files(table.get("env_files", [])), timeout_s=float(timeout) if timeout else None,
        )

    def _env_files(self, value: Any) -> tuple[Path, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problems.append("[live] env_files must be a list of env file paths, e.g. [\"/etc/quantlab/live.env\"].")
            return ()
        files = []
        for name in value:
            path = self._path(name.removeprefix("-"))
            optional = name.startswith("-")  # systemd's EnvironmentFile=-PATH: missing is fine
            if not path.is_file():
                if not optional:
                    self.problems.append(f"[live] env_files: {path} does not exist; fix the path, or write it as "
                                         f"\"-{path}\" if it may be missing.")
                continue
            if not os.access(path, os.R_OK):
                self.problems.append(f"[live] env_files: {path} is not readable by this user; make it group-readable "
                                     "by the canary's user (mode 0640).")
                continue
            files.append(path)
        return tuple(files)

    def _alert(self) -> tuple[str | None, float]:
        table = self._table("alert")
        timeout = self._number(table, "alert", "timeout_s", 5.0, minimum=0.1, maximum=60)
        if "webhook_url" in table and ("webhook_url_env" in table or "webhook_url_file" in table):
            self.problems.append("[alert] sets webhook_url and webhook_url_env/_file; keep one.")
            return None, float(timeout)
        if "webhook_url" in table:
            return self._url(table, "alert", "webhook_url", required=True) or None, float(timeout)
        if "webhook_url_env" not in table and "webhook_url_file" not in table:
            return None, float(timeout)
        url, source = self._secret("alert", "webhook_url", None, required_value=True)
        if url and urlsplit(url).scheme not in ("http", "https"):
            self.problems.append(f"[alert] the webhook URL from {source} must be an http:// or https:// URL.")
            return None, float(timeout)
        return url or None, float(timeout)
