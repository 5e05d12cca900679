"""Secret leak scans of a run: what the harness wrote and what the target wrote, for every configured secret.

A leak is named by the file or object and the secret's name, never by its value. Two kinds:
- harness leaks: a secret in the run's own artifacts (summary.json/md, drift.json, junit.xml, allure results and
  attachments, the tests' captured output and tracebacks). They fail the run.
- target leaks: a secret in what the target wrote (audit spool, state, service journals, every object in its
  bucket). They are security findings of the target, reported, not failures of the run.

How the values travel: each test process keeps the secrets of the environments its tests built in memory. An xdist
worker hands them to the controller in `workeroutput`, the in-memory channel xdist uses when a worker finishes,
so no value is ever written to a file, a report or a log. The controller scans after every other plugin has
written its artifacts, adds the `secrets` block to summary.json and fails the session on a harness leak.
A worker that crashes takes its values with it: its tests' artifacts are then scanned for the other workers'
secrets only.
"""
from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest

if TYPE_CHECKING:
    from harness.environment import QuantLabEnvironment

GUARD_NAME = "quantlab-secrets-guard"
WORKER_OUTPUT_KEY = "quantlab_chaos_secrets"
TARGET_SCAN_PROPERTY = "secret_scan"
MIN_SCANNED_LENGTH = 8  # shorter values would match ordinary text; such secrets are counted, not scanned
MAX_SCANNED_BYTES = 64 * 1024 * 1024  # per file or object: enough for any journal, bounded for a runaway one
MAX_SCANNED_OBJECTS = 5000
MAX_TOLD = 10  # target leaks printed on the terminal; summary.json lists them all
_ITEM_SECRETS = pytest.StashKey["SecretSet"]()


@dataclass(frozen=True)
class Leak:
    """One secret found in one place: the secret's name and where, never the value."""

    secret: str
    where: str
    kind: str
    test: str | None = None
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


class SecretSet:
    """Secret values by name, and the forms a value takes in text (as is, URL-quoted, JSON- and XML-escaped)."""

    def __init__(self, secrets: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._names: dict[str, str] = {}  # value -> name
        self.too_short: set[str] = set()
        self.update(secrets)

    def __repr__(self) -> str:  # values stay out of reprs, tracebacks and pytest's assertion rewriting
        return f"SecretSet({len(self._names)} secrets: {', '.join(self.names())})"

    def __len__(self) -> int:
        return len(self._names)

    def add(self, name: str, value: str) -> None:
        if not value:
            return
        if len(value) < MIN_SCANNED_LENGTH:
            self.too_short.add(name)
            return
        self._names.setdefault(value, name)

    def update(self, secrets: Mapping[str, str] | Iterable[tuple[str, str]]) -> None:
        pairs = secrets.items() if isinstance(secrets, Mapping) else secrets
        for name, value in pairs:
            self.add(str(name), str(value))

    def names(self) -> list[str]:
        return sorted(set(self._names.values()))

    def pairs(self) -> list[list[str]]:
        """[name, value] pairs, for the in-memory hand-over from a worker to the controller only."""
        return [[name, value] for value, name in self._names.items()]

    def found_in(self, data: bytes) -> list[str]:
        """Names of the secrets that occur in `data` in any of their forms."""
        return sorted({name for value, name in self._names.items() if any(form in data for form in _forms(value))})


def _forms(value: str) -> set[bytes]:
    return {form.encode("utf-8") for form in (value, quote(value, safe=""), json.dumps(value)[1:-1], html.escape(value))}


def read_bounded(path: Path) -> bytes | None:
    """The file's first MAX_SCANNED_BYTES, or None when it cannot be read (gone, a folder, no permission)."""
    try:
        with path.open("rb") as handle:
            return handle.read(MAX_SCANNED_BYTES)
    except OSError:
        return None


def files_under(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
    elif root.is_dir():
        yield from sorted(path for path in root.rglob("*") if path.is_file() and not path.is_symlink())


# -- what the target wrote ---------------------------------------------------------------------------------------


@dataclass
class ScanResult:
    """Leaks found in a set of files or objects, and how many were read."""

    checked: int = 0
    leaks: list[Leak] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "leaks": [leak.to_dict() for leak in self.leaks], "errors": self.errors}


def target_output_places(env: QuantLabEnvironment) -> list[tuple[Path, str]]:
    """The target's output on disk, with a kind each: audit spool, state, service journals, a background canary's log.
    The env files are not in it: the harness writes the secrets there on purpose, as an operator would."""
    return [(env.audit_dir, "audit-spool"), (env.state_dir, "state"), (env.workdir / "journal", "journal"),
            (env.workdir / "background-canary.log", "journal")]


def scan_target(env: QuantLabEnvironment, secrets: SecretSet, test: str | None = None) -> ScanResult:
    """Every file the target wrote and every object in its bucket, scanned for every secret."""
    result = ScanResult()
    for root, kind in target_output_places(env):
        for path in files_under(root):
            data = read_bounded(path)
            if data is None:
                continue
            result.checked += 1
            where = str(path.relative_to(env.workdir)) if path.is_relative_to(env.workdir) else str(path)
            result.leaks += [Leak(name, where, kind, test) for name in secrets.found_in(data)]
    scan_bucket(env.bucket, secrets, result, test)
    return result


def scan_bucket(bucket: Any, secrets: SecretSet, result: ScanResult, test: str | None = None) -> None:
    """Every object of the bucket (archives, audit copies, compacted days), read through the harness's own client."""
    try:
        keys = bucket.list_keys()
    except Exception as exc:  # noqa: BLE001 - an unreadable bucket is reported, it does not break the test's teardown
        result.errors.append(f"bucket {bucket.name} could not be listed ({type(exc).__name__})")
        return
    for key in keys[:MAX_SCANNED_OBJECTS]:
        try:
            data = bucket.read_bytes(key)[:MAX_SCANNED_BYTES]
        except Exception as exc:  # noqa: BLE001 - one unreadable object must not hide the others
            result.errors.append(f"s3://{bucket.name}/{key} could not be read ({type(exc).__name__})")
            continue
        result.checked += 1
        result.leaks += [Leak(name, f"s3://{bucket.name}/{key}", "s3", test) for name in secrets.found_in(data)]
    if len(keys) > MAX_SCANNED_OBJECTS:
        result.errors.append(f"bucket {bucket.name}: only the first {MAX_SCANNED_OBJECTS} of {len(keys)} objects scanned")


# -- what the harness wrote --------------------------------------------------------------------------------------


def allure_attachment_names(allure_dir: Path) -> dict[str, tuple[str, str | None]]:
    """Attachment file -> (its name in the report, the test it belongs to), from the allure result and container files."""
    names: dict[str, tuple[str, str | None]] = {}

    def walk(node: Any, test: str | None) -> None:
        if isinstance(node, dict):
            for attachment in node.get("attachments") or []:
                if isinstance(attachment, dict) and attachment.get("source"):
                    names[str(attachment["source"])] = (str(attachment.get("name") or ""), test)
            for key in ("steps", "befores", "afters"):
                for child in node.get(key) or []:
                    walk(child, test)

    for path in sorted(allure_dir.glob("*-result.json")) + sorted(allure_dir.glob("*-container.json")):
        try:
            data = json.loads(path.read_text(errors="replace"))
        except (OSError, ValueError):
            continue
        walk(data, data.get("fullName") if isinstance(data, dict) else None)
    return names


def harness_artifacts(reports_dir: Path | None, allure_dir: Path | None, junit: Path | None) -> list[Path]:
    """Every file of the run's reports: summaries, drift, JUnit, allure results and attachments (no duplicates)."""
    seen: dict[Path, None] = {}
    for root in (reports_dir, allure_dir, junit):
        if root is not None:
            for path in files_under(root):
                seen.setdefault(path.resolve(), None)
    return list(seen)


def scan_harness_artifacts(paths: Iterable[Path], secrets: SecretSet, *, base: Path | None = None,
                           allure_dir: Path | None = None) -> ScanResult:
    attachments = allure_attachment_names(allure_dir) if allure_dir is not None and allure_dir.is_dir() else {}
    result = ScanResult()
    for path in paths:
        data = read_bounded(path)
        if data is None:
            continue
        result.checked += 1
        names = secrets.found_in(data)
        if not names:
            continue
        where = str(path.relative_to(base)) if base is not None and path.is_relative_to(base) else str(path)
        attachment, test = attachments.get(path.name, (None, None))
        kind = "allure-attachment" if attachment is not None else _artifact_kind(path)
        result.leaks += [Leak(name, where, kind, test, attachment or None) for name in names]
    return result


def _artifact_kind(path: Path) -> str:
    if path.suffix == ".xml":
        return "junit"
    if path.name.startswith("summary."):
        return "summary"
    return "allure-result" if path.parent.name == "allure-results" else "report"


def scan_texts(texts: Iterable[tuple[str, str, str]], secrets: SecretSet) -> ScanResult:
    """The tests' captured output and tracebacks, as (test, section, text): what the console and CI log show."""
    result = ScanResult()
    for test, section, text in texts:
        result.checked += 1
        result.leaks += [Leak(name, f"pytest output: {section}", "test-output", test)
                         for name in secrets.found_in(text.encode("utf-8", "replace"))]
    return result


# -- the pytest plugin -------------------------------------------------------------------------------------------


def remember(item: pytest.Item, secrets: Mapping[str, str]) -> None:
    """Keeps an environment's secrets for the scans: the test's own (target scan) and the process's (harness scan)."""
    item.stash.setdefault(_ITEM_SECRETS, SecretSet()).update(secrets)
    guard = item.config.pluginmanager.get_plugin(GUARD_NAME)
    if isinstance(guard, SecretsGuard):
        guard.remember(secrets)


def scan_environment_output(item: pytest.Item, env: QuantLabEnvironment) -> ScanResult:
    """At the end of a test, before its bucket is deleted: stops the services (so their last words are written),
    scans what the target wrote for every secret the test's environment had, and puts the result (names and
    places only) into the test's report."""
    remember(item, env.secrets())
    try:
        env.supervisor.close()  # idempotent: the environment's own close does it again, finding nothing left
    except Exception:  # noqa: BLE001 - the scan still reads what was written; the environment's close reports stop errors
        pass
    secrets = item.stash.get(_ITEM_SECRETS, SecretSet())
    try:
        result = scan_target(env, secrets, item.nodeid)
    except Exception as exc:  # noqa: BLE001 - a scan that breaks is reported, it must not fail a passed scenario
        result = ScanResult(errors=[f"target scan failed ({type(exc).__name__})"])
    item.user_properties.append((TARGET_SCAN_PROPERTY, json.dumps(result.to_dict())))
    return result


class SecretsGuard:
    """One per pytest process. Workers remember secrets and hand them over; the controller gathers the target
    scans from the reports, scans the harness's artifacts at the very end, and reports both."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.secrets = SecretSet()
        self.target = ScanResult()
        self.outputs: list[tuple[str, str, str]] = []
        self.block: dict[str, Any] | None = None

    @property
    def is_worker(self) -> bool:
        return hasattr(self.config, "workerinput")

    def remember(self, secrets: Mapping[str, str]) -> None:
        self.secrets.update(secrets)
        if self.is_worker:
            self.config.workeroutput[WORKER_OUTPUT_KEY] = self.secrets.pairs()  # type: ignore[attr-defined]

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        self.secrets.update([tuple(pair) for pair in getattr(node, "workeroutput", {}).get(WORKER_OUTPUT_KEY, [])])

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.is_worker:
            return
        for name, value in report.user_properties:
            if name == TARGET_SCAN_PROPERTY and report.when == "teardown":
                found = json.loads(str(value))
                self.target.checked += int(found.get("checked", 0))
                self.target.leaks += [Leak(**leak) for leak in found.get("leaks", [])]
                self.target.errors += list(found.get("errors", []))
        if report.longrepr is not None and report.failed:
            self.outputs.append((report.nodeid, f"{report.when} traceback", report.longreprtext))
        for title, text in report.sections:
            if text:
                self.outputs.append((report.nodeid, title, text))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """After pytest's JUnit writer and the runbook report: scan, report, and fail the session on a harness leak."""
        if self.is_worker:
            return
        self.block = self.scan()
        report = self.config.pluginmanager.get_plugin("runbook-report")
        if report is not None and hasattr(report, "set_block"):
            report.set_block("secrets", self.block)
            report.write(allure_extras=False)
        harness = self.block["harness_leaks"]
        if harness:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        self._tell(harness, self.block["target_leaks"])
        self.secrets = SecretSet()  # the values are not needed any more

    def scan(self) -> dict[str, Any]:
        reports_dir = _path_option(self.config, "runbook_report")
        allure_dir = _path_option(self.config, "allure_report_dir")
        junit = _path_option(self.config, "xmlpath")
        paths = harness_artifacts(reports_dir, allure_dir, junit)
        files = scan_harness_artifacts(paths, self.secrets, base=reports_dir.resolve() if reports_dir else None,
                                       allure_dir=allure_dir)
        output = scan_texts(self.outputs, self.secrets)
        harness_leaks = _unique(files.leaks + output.leaks)
        target_leaks = _unique(self.target.leaks)
        return {
            "checked": files.checked + output.checked + self.target.checked,
            "harness_checked": files.checked + output.checked,
            "target_checked": self.target.checked,
            "secret_names": self.secrets.names(),
            "not_scanned_short": sorted(self.secrets.too_short),
            "harness_leaks": [leak.to_dict() for leak in harness_leaks],
            "target_leaks": [leak.to_dict() for leak in target_leaks],
            "errors": sorted(set(self.target.errors))[:50],
        }

    def _tell(self, harness: list[dict[str, Any]], target: list[dict[str, Any]]) -> None:
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        if terminal is None or not (harness or target):
            return
        terminal.write_sep("=", "secret leak scan", red=bool(harness), yellow=not harness)
        for leak in harness:
            terminal.write_line(f"HARNESS LEAK: {leak['secret']} in {leak['where']}"
                                + (f" ({leak['detail']})" if leak.get("detail") else ""))
        for leak in target[:MAX_TOLD]:
            terminal.write_line(f"target leak (finding): {leak['secret']} in {leak['where']} [{leak.get('test', '')}]")
        if len(target) > MAX_TOLD:
            terminal.write_line(f"... and {len(target) - MAX_TOLD} more target leak(s)")
        if harness:
            terminal.write_line("The harness wrote a secret into its own reports: fix the code that wrote it "
                                "before publishing them.")


def _path_option(config: pytest.Config, name: str) -> Path | None:
    value = config.getoption(name, None)
    return Path(os.path.expanduser(str(value))) if value else None


def _unique(leaks: Iterable[Leak]) -> list[Leak]:
    return list(dict.fromkeys(leaks))


def register(config: pytest.Config) -> None:
    """Registers the guard once per process (called from the harness plugin's pytest_configure)."""
    if config.pluginmanager.get_plugin(GUARD_NAME) is None:
        config.pluginmanager.register(SecretsGuard(config), GUARD_NAME)
