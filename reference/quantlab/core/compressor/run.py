#!/usr/bin/python3
"""Daily audit compaction: fold one day of the audit spool into a single object in the archive bucket.

Usage: run.py --mode daily [--date YYYYMMDD]

The day is --date, else COMPACT_DATE, else yesterday (UTC). Every line of
<AUDIT_SPOOL_DIR>/date=YYYYMMDD/*.jsonl is folded, ordered by ts, into
s3://<RUN_ARCHIVE_S3_BUCKET>/audit_compacted/date=YYYYMMDD/audit.jsonl. The local spool is left as
it is (the canary reads it). Running it twice for a day rewrites the same object.

Exit codes: 0 done (also when there is nothing to fold), 1 the upload failed, 2 bad configuration.
Standard library only, so the unit can run it with a bare /usr/bin/python3: requests are signed with
AWS Signature Version 4 here, path-style, region "auto", like QuantLab's JS client.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TextIO

CONFIG_EXIT_CODE = 2
DEFAULT_SPOOL_DIR = "/tmp/quantlab-audit"
REGION = "auto"
SECRET_ENV_NAMES = ("OBSERVER_TOKEN", "RUN_ARCHIVE_S3_ACCESS_KEY", "RUN_ARCHIVE_S3_SECRET_KEY")
REQUIRED_S3_ENV = (
    "RUN_ARCHIVE_S3_BUCKET",
    "RUN_ARCHIVE_S3_ENDPOINT",
    "RUN_ARCHIVE_S3_ACCESS_KEY",
    "RUN_ARCHIVE_S3_SECRET_KEY",
)


class ConfigError(Exception):
    """A setting the operator must fix; the message is one sentence."""


class UploadError(Exception):
    """The bucket refused the object or could not be reached."""


@dataclass(frozen=True)
class Settings:
    day: str
    spool_dir: Path
    bucket: str
    endpoint: str
    access_key: str
    secret_key: str
    timeout_s: float


def redact(text: str, env: dict[str, str]) -> str:
    """Mask every non-empty secret value in text."""
    for name in SECRET_ENV_NAMES:
        value = env.get(name, "")
        if value:
            text = text.replace(value, "***")
    return text


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags; a usage mistake is a ConfigError rather than argparse's own exit."""

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise ConfigError(f"{message}; usage: run.py --mode daily [--date YYYYMMDD].")

    parser = Parser(prog="run.py", add_help=True)
    parser.add_argument("--mode", required=True, choices=["daily"])
    parser.add_argument("--date", default=None)
    return parser.parse_args(argv)


def pick_day(flag: str | None, env: dict[str, str], today: dt.date) -> str:
    """--date, else COMPACT_DATE, else yesterday (UTC); must be a real YYYYMMDD date."""
    source, value = ("--date", flag) if flag else ("COMPACT_DATE", env.get("COMPACT_DATE", "").strip())
    if not value:
        return (today - dt.timedelta(days=1)).strftime("%Y%m%d")
    try:
        if not re.fullmatch(r"\d{8}", value):
            raise ValueError
        dt.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise ConfigError(f'{source} must be a date written YYYYMMDD, such as 20240131 (got "{value}").') from None
    return value


def load_settings(argv: list[str], env: dict[str, str], today: dt.date) -> Settings:
    """Read and check everything before touching the spool or the bucket."""
    args = parse_args(argv)
    day = pick_day(args.date, env, today)
    missing = [name for name in REQUIRED_S3_ENV if not env.get(name, "").strip()]
    if missing:
        verb, them = ("is", "it") if len(missing) == 1 else ("are", "them")
        raise ConfigError(f"{', '.join(missing)} {verb} required; set {them} in /etc/quantlab/compact.env.")
    endpoint = env["RUN_ARCHIVE_S3_ENDPOINT"].strip().rstrip("/")
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f'RUN_ARCHIVE_S3_ENDPOINT must be an http(s) URL (got "{endpoint}").')
    timeout_raw = env.get("COMPACT_S3_TIMEOUT_S", "").strip() or "30"
    try:
        timeout_s = float(timeout_raw)
        if timeout_s <= 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f'COMPACT_S3_TIMEOUT_S must be a number of seconds > 0 (got "{timeout_raw}").') from None
    return Settings(
        day=day,
        spool_dir=Path(env.get("AUDIT_SPOOL_DIR", "").strip() or DEFAULT_SPOOL_DIR),
        bucket=env["RUN_ARCHIVE_S3_BUCKET"].strip(),
        endpoint=endpoint,
        access_key=env["RUN_ARCHIVE_S3_ACCESS_KEY"],
        secret_key=env["RUN_ARCHIVE_S3_SECRET_KEY"],
        timeout_s=timeout_s,
    )


@dataclass(frozen=True)
class Fold:
    body: bytes
    files: int
    entries: int
    skipped_lines: int


def fold_day(day_dir: Path) -> Fold:
    """Every JSON line of the day's spool files, ordered by (ts, audit_id); junk lines are skipped."""
    files = sorted(p for p in day_dir.glob("*.jsonl") if p.is_file()) if day_dir.is_dir() else []
    entries: list[tuple[int, str, str]] = []
    skipped = 0
    for path in files:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
                ts = int(entry.get("ts", 0))
            except (ValueError, TypeError, AttributeError):
                skipped += 1
                continue
            entries.append((ts, str(entry.get("audit_id", "")), line))
    entries.sort()
    body = "".join(line + "\n" for _, _, line in entries).encode("utf-8")
    return Fold(body=body, files=len(files), entries=len(entries), skipped_lines=skipped)


def _hmac(key: bytes, text: str) -> bytes:
    """One HMAC-SHA256 step of the SigV4 key derivation."""
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def sigv4_headers(
    method: str, url: str, body: bytes, access_key: str, secret_key: str, now: dt.datetime
) -> dict[str, str]:
    """Headers that sign a request with AWS Signature Version 4 (service s3, region auto)."""
    parts = urllib.parse.urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    scope_day = now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(body).hexdigest()
    headers = {"host": parts.netloc, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [
            method,
            parts.path or "/",
            parts.query,
            "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
            signed,
            payload_hash,
        ]
    )
    scope = f"{scope_day}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()]
    )
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret_key}".encode("utf-8"), scope_day), REGION), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    return {
        "x-amz-content-sha256": payload_hash,
        "x-amz-date": amz_date,
        "authorization": f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={signature}",
    }


def object_url(endpoint: str, bucket: str, key: str) -> str:
    """Path-style URL; each segment is percent-encoded the way SigV4's canonical URI expects."""
    encoded = "/".join(urllib.parse.quote(seg, safe="-_.~") for seg in [bucket, *key.split("/")])
    return f"{endpoint}/{encoded}"


def put_object(settings: Settings, key: str, body: bytes) -> None:
    """PUT one object; raises UploadError with the bucket's own error code when it refuses."""
    url = object_url(settings.endpoint, settings.bucket, key)
    now = dt.datetime.now(dt.timezone.utc)
    headers = sigv4_headers("PUT", url, body, settings.access_key, settings.secret_key, now)
    headers["content-type"] = "application/x-ndjson"
    request = urllib.request.Request(url, data=body, method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as err:
        detail = err.read(2000).decode("utf-8", errors="replace")
        code = re.search(r"<Code>([^<]+)</Code>", detail)
        raise UploadError(f"PutObject {key} failed: HTTP {err.code} {code.group(1) if code else err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UploadError(f"PutObject {key} failed: {reason}") from None


def emit(stream: TextIO, record: dict, env: dict[str, str]) -> None:
    """One redacted JSON line."""
    stream.write(redact(json.dumps(record), env) + "\n")
    stream.flush()


def run(argv: list[str], env: dict[str, str], today: dt.date) -> int:
    """The whole job; returns the exit code."""
    try:
        settings = load_settings(argv, env, today)
    except ConfigError as err:
        sys.stderr.write(f"[config] {redact(str(err), env)}\n")
        return CONFIG_EXIT_CODE
    day_dir = settings.spool_dir / f"date={settings.day}"
    key = f"audit_compacted/date={settings.day}/audit.jsonl"
    try:
        fold = fold_day(day_dir)
    except OSError as err:
        emit(sys.stderr, {"event": "compact", "mode": "daily", "date": settings.day, "status": "error",
                          "error": f"cannot read the audit spool {day_dir}: {err.strerror or err}"}, env)
        return 1
    summary = {"event": "compact", "mode": "daily", "date": settings.day, "files": fold.files,
               "entries": fold.entries, "skipped_lines": fold.skipped_lines}
    if fold.entries == 0:
        emit(sys.stdout, {**summary, "status": "ok", "uploaded": False,
                          "message": f"nothing to fold: no audit entries in {day_dir}"}, env)
        return 0
    try:
        put_object(settings, key, fold.body)
    except UploadError as err:
        emit(sys.stderr, {**summary, "status": "error", "error": str(err)}, env)
        return 1
    emit(sys.stdout, {**summary, "status": "ok", "uploaded": True, "bucket": settings.bucket,
                      "key": key, "bytes": len(fold.body)}, env)
    return 0


def main() -> int:
    """Entry point: real argv, environment and clock."""
    return run(sys.argv[1:], dict(os.environ), dt.datetime.now(dt.timezone.utc).date())


if __name__ == "__main__":
    sys.exit(main())
