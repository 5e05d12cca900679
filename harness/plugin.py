"""pytest plugin of the QuantLab chaos harness: options, the `runbook` marker and the environment fixtures.

Per test process (each xdist worker is one): one S3 server and one toxiproxy server. Per test: a bucket,
proxies, a fake exchange and a `QuantLabEnvironment` with its own token, spool, state and env files.
"""
from __future__ import annotations

import functools
import inspect
import json
import resource
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

import allure
import pluggy
import psutil
import pytest
from allure_commons.model2 import StatusDetails, TestResult

from harness import reaper, schedule
from harness.cli import restore_default_sigint
from harness.environment import QuantLabEnvironment, Settings
from harness.fakes.binance import FakeBinance
from harness.fakes.docker import docker_status
from harness.fakes.s3 import BACKENDS, Bucket, S3Server, open_s3
from harness.fakes.toxiproxy import TOXIPROXY_BACKENDS, ToxiproxyServer
from harness.isolation import host_network_reason, isolate_process_network, run_isolation
from harness.journal import Journal
from harness.outcomes import BLOCKED, DRIFT, ERROR, SKIPPED, Verdict, classify, one_sentence
from harness.reporting import (
    BEYOND_MARKERS,
    BEYOND_PARENT,
    BEYOND_PARENTS,
    RUNBOOK_PARENT,
    SECURITY_PROPERTY,
    allure_group_labels,
    findings_markdown,
    runbook_groups,
    skip_reason,
)
from harness.secrets_scan import register as register_secrets_guard
from harness.secrets_scan import remember as remember_secrets
from harness.secrets_scan import scan_environment_output
from harness.target import Target
from quantlab_chaos.errors import HarnessError
from quantlab_chaos.redact import redact
from quantlab_chaos.runbook import Runbook, load_runbook

F = TypeVar("F", bound=Callable[..., Any])
TEARDOWN_NAME = "__allure_teardown_name__"
HIDDEN_FINALIZER = "_quantlab_hidden_finalizer"
FINDINGS = pytest.StashKey[list[Mapping[str, Any]]]()
COST_START = pytest.StashKey[float]()
COST_RSS = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantlab-chaos", "QuantLab chaos harness")
    group.addoption("--quantlab-root", help="QuantLab checkout to test (default: QUANTLAB_ROOT, then the twin)")
    group.addoption("--runbook", help="runbook markdown (default: <quantlab-root>/docs/runbook.md)")
    group.addoption("--s3-backend", default="moto", choices=BACKENDS, help="S3 server for the target (default: moto)")
    group.addoption("--s3-url", help="S3 endpoint for --s3-backend url")
    group.addoption("--toxiproxy-bin", help="toxiproxy-server binary (default: .tools/bin, then PATH)")
    group.addoption("--toxiproxy-backend", choices=TOXIPROXY_BACKENDS, default=None,
                    help="toxiproxy as a binary or in a Docker container (default: TOXIPROXY_URL, else the binary, "
                         "else the container when Docker answers)")
    group.addoption("--runbook-item", action="append", default=[], metavar="ITEM",
                    help="run only scenarios proving this runbook item (repeatable)")
    group.addoption("--runbook-report", metavar="DIR", help="write summary.json and summary.md per runbook item into DIR")
    group.addoption("--runbook-drift", metavar="FILE", help="drift found before the run (JSON list), for the summary")
    group.addoption("--scenario-durations", metavar="FILE",
                    help="durations.json of an earlier run: scenarios run longest first, and --shard balances by it")
    group.addoption("--shard", metavar="K/N", help="run only the K-th of N duration-balanced shards of the scenarios")


def pytest_configure(config: pytest.Config) -> None:
    restore_default_sigint()  # a pytest started as `pytest ... &` from a script must still stop on SIGINT
    config.addinivalue_line("markers", "runbook(item): the runbook item this scenario proves (e.g. 'failure:live-ws-disabled')")
    config.addinivalue_line(
        "markers", "quantlab_settings(archive=True, live_ws=True, audit=True, extra=None): settings the quantlab fixture starts with"
    )
    config.addinivalue_line("markers", "hostile: a hostile exchange (junk, huge, duplicate, out-of-order frames, drops) "
                                       "against the live run")
    config.addinivalue_line("markers", "security: a security probe of the target (reported in summary.json's security block)")
    register_secrets_guard(config)  # every process: workers hand their secrets over, the controller scans
    if _runs_tests(config):
        config.pluginmanager.register(CostMeter(), "quantlab-cost-meter")
    _isolate(config)
    # Every process: what inherits this environment (xdist workers, tools a test starts) dies with it, even on SIGKILL.
    reaper.mark_environment()
    out_dir = config.getoption("runbook_report")
    if out_dir and not hasattr(config, "workerinput"):
        _register_report(config, Path(out_dir))


def _runs_tests(config: pytest.Config) -> bool:
    """An xdist worker, or a pytest process without workers: the processes that build environments."""
    return hasattr(config, "workerinput") or getattr(config.option, "dist", "no") == "no"


def _isolate(config: pytest.Config) -> None:
    """Moves a test process into a network namespace of its own before it starts any server, so units that hard-code
    their ports run side by side under xdist (else: port locks). Parts on the host's network (an S3 URL, a running
    toxiproxy, containers of an engine that is not local) cannot be reached from a namespace, so they keep the host's
    network; a local engine's containers join the namespace."""
    if not _runs_tests(config):
        return
    reason = host_network_reason(config.getoption("s3_backend"), config.getoption("toxiproxy_backend"))
    isolate_process_network(enabled=not reason, why_not=reason)  # environments read it with current_isolation()


def _register_report(config: pytest.Config, out_dir: Path) -> None:
    from harness.reporting import RunbookReport
    from harness.target import accepted_findings

    try:
        target = Target.load(config.getoption("quantlab_root"), config.getoption("runbook"))
        runbook = load_runbook(target.runbook)
        accepted = accepted_findings(target.root)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from exc
    drift_file = config.getoption("runbook_drift")
    drift = json.loads(Path(drift_file).read_text()) if drift_file else []
    allure_dir = config.getoption("allure_report_dir", None)
    report = RunbookReport(out_dir, runbook, target.root, drift, Path(allure_dir) if allure_dir else None,
                           config.getoption("runbook_item"), accepted)
    report.isolation = run_isolation(config.getoption("s3_backend"), config.getoption("toxiproxy_backend"))
    report.shard = config.getoption("shard")
    config.pluginmanager.register(report, "runbook-report")


def pytest_keyboard_interrupt() -> None:
    """A SIGINT sent to the xdist controller alone (`kill -INT`, not a terminal's Ctrl-C) is passed on to its
    workers, so they tear their services down now instead of being killed when xdist's 10 s exit timeout ends."""
    reaper.interrupt_xdist_workers()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tags each scenario's reports with its runbook item, and keeps only --runbook-item ones when asked."""
    wanted = set(config.getoption("runbook_item"))
    selected: list[pytest.Item] = []
    deselected: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("runbook")
        item_id = str(marker.args[0]) if marker and marker.args else None
        if item_id:
            item.user_properties.append(("runbook_item", item_id))
        _group_beyond(item)
        (selected if not wanted or item_id in wanted else deselected).append(item)
    selected, more = _scheduled(config, selected)
    deselected += more
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected


def _scheduled(config: pytest.Config, items: list[pytest.Item]) -> tuple[list[pytest.Item], list[pytest.Item]]:
    """The items longest first by the durations file, and of those the chosen shard's (harness.schedule); every
    process (each xdist worker) computes the same order from the same file."""
    path, shard = config.getoption("scenario_durations"), config.getoption("shard")
    if not path and not shard:
        return items, []
    try:
        timings = schedule.load(Path(path)) if path else {}
        by_id = {item.nodeid: item for item in items}
        order = schedule.longest_first(list(by_id), timings)
        other: list[str] = []
        if shard:
            k, n = schedule.parse_shard(shard)
            mine = set(schedule.shards(list(by_id), timings, n)[k - 1])
            order, other = [i for i in order if i in mine], [i for i in order if i not in mine]
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from exc
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    return [by_id[i] for i in schedule.paired(order, workers)], [by_id[i] for i in other]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under xdist's load distribution with a durations file: DurationScheduling (the scenarios longest first, each
    of the longest paired with a short one)."""
    if config.getvalue("dist") != "load" or not config.getoption("scenario_durations"):
        return None
    from harness.xdist_schedule import DurationScheduling

    return DurationScheduling(config, log)


class CostMeter:
    """What each scenario costs, for harness.schedule: the CPU time of its test process and of what that process
    reaps (its services, once torn down), from setup to the end of teardown, and the memory of the process tree while
    its body ran; recorded in the teardown report (`cost` user property)."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Iterator[None]:
        item.stash[COST_START] = _cpu_seconds()
        yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Iterator[None]:
        yield
        start = item.stash.get(COST_START, None)
        if start is not None:
            item.user_properties.append(("cost", json.dumps({"cpu_s": round(_cpu_seconds() - start, 3),
                                                              "rss_bytes": item.stash.get(COST_RSS, 0)})))


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _tree_rss() -> int:
    """The memory of this test process and everything it runs now (its environment's services, fakes, proxies)."""
    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total


def _group_beyond(item: pytest.Item) -> None:
    """A check beyond the runbook (hostile exchange, security) goes under its own allure parent, one group per test
    function (its parametrized cases inside)."""
    for row_id, (marker, _) in BEYOND_MARKERS.items():
        if item.get_closest_marker(marker) is not None:
            name = getattr(item, "originalname", item.name).removeprefix("test_").replace("_", " ")
            for label, value in allure_group_labels(BEYOND_PARENT, BEYOND_PARENTS[row_id], name):
                item.add_marker(pytest.mark.allure_label(value, label_type=label))
            return


def teardown_named(name: str) -> Callable[[F], F]:
    """Names a yield fixture's teardown as allure shows it (`<fixture>::<name>`): allure takes the finalizer's
    function name, which for pytest's own finalizers is a bare index or `<lambda>`."""
    def mark(func: F) -> F:
        setattr(func, TEARDOWN_NAME, name)
        return func
    return mark


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Iterator[None]:
    """Readable teardown steps in allure, which wraps each finalizer a fixture holds once it is set up (its wrapper
    runs around this one): the teardown of a yield fixture (pytest's partial) gets its name, and pytest's own call
    of the post-finalizer hook (a lambda, in every fixture, doing nothing a reader needs) is hidden from allure
    until the wrapper around allure's puts it back."""
    yield
    finalizers = getattr(fixturedef, "_finalizers", [])
    for finalizer in finalizers:
        if isinstance(finalizer, functools.partial):
            finalizer.__name__ = getattr(fixturedef.func, TEARDOWN_NAME, "teardown")  # type: ignore[attr-defined]
    if finalizers and getattr(finalizers[0], "__name__", None) == "<lambda>":
        setattr(fixturedef, HIDDEN_FINALIZER, finalizers.pop(0))


@pytest.hookimpl(hookwrapper=True, tryfirst=True, specname="pytest_fixture_setup")
def pytest_fixture_setup_restore(fixturedef: pytest.FixtureDef[Any]) -> Iterator[None]:
    """Puts pytest's post-finalizer call back first in the fixture's finalizers (they run last to first)."""
    yield
    hidden = fixturedef.__dict__.pop(HIDDEN_FINALIZER, None)
    if hidden is not None:
        fixturedef._finalizers.insert(0, hidden)


@pytest.fixture(scope="session")
def quantlab_target(pytestconfig: pytest.Config) -> Target:
    try:
        return Target.load(pytestconfig.getoption("quantlab_root"), pytestconfig.getoption("runbook"))
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from exc


@pytest.fixture(scope="session")
def runbook_model(quantlab_target: Target) -> Runbook:
    try:
        return load_runbook(quantlab_target.runbook)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from exc


@pytest.fixture(scope="session")
@teardown_named("stop the S3 server")
def s3_server(pytestconfig: pytest.Config) -> Iterator[S3Server]:
    backend = pytestconfig.getoption("s3_backend")
    if backend == "minio" and not docker_status()[0]:
        pytest.skip(f"--s3-backend minio needs Docker: {docker_status()[1]}")
    try:
        with open_s3(backend, pytestconfig.getoption("s3_url")) as server:
            yield server
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from exc


@pytest.fixture(scope="session")
@teardown_named("stop toxiproxy")
def toxiproxy_server(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToxiproxyServer]:
    log = tmp_path_factory.mktemp("toxiproxy") / "toxiproxy.log"
    backend = pytestconfig.getoption("toxiproxy_backend")
    if backend == "container" and not docker_status()[0]:
        pytest.skip(f"--toxiproxy-backend container needs Docker: {docker_status()[1]}")
    try:
        with ToxiproxyServer(pytestconfig.getoption("toxiproxy_bin"), log_path=log, backend=backend) as server:
            yield server
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from exc


@pytest.fixture()
@teardown_named("delete the bucket")
def s3(s3_server: S3Server) -> Iterator[Bucket]:
    """A bucket of this test's own, deleted afterwards."""
    bucket = s3_server.bucket()
    yield bucket
    bucket.delete()


@pytest.fixture()
@teardown_named("remove the toxics, enable the proxies")
def toxiproxy(toxiproxy_server: ToxiproxyServer) -> Iterator[ToxiproxyServer]:
    """The process's toxiproxy server; every toxic is removed and every proxy enabled after the test."""
    yield toxiproxy_server
    toxiproxy_server.reset()


@pytest.fixture()
@teardown_named("stop the fake exchange")
def fake_binance(request: pytest.FixtureRequest) -> Iterator[FakeBinance]:
    """A fake Binance USDⓈ-M futures stream server for this test (seeded by the test's name)."""
    with FakeBinance(rate=40, seed=request.node.nodeid) as server:
        yield server


@pytest.fixture()
def quantlab_settings(request: pytest.FixtureRequest) -> Settings:
    marker = request.node.get_closest_marker("quantlab_settings")
    return Settings(**marker.kwargs) if marker else Settings()


@pytest.fixture()
@teardown_named("stop the services, scan what they wrote for secrets")
def quantlab(quantlab_target: Target, s3_server: S3Server, toxiproxy: ToxiproxyServer, fake_binance: FakeBinance,
             quantlab_settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[QuantLabEnvironment]:
    """The target's services, wired through toxiproxy to S3 and the fake exchange; started on demand. At the end,
    what the target wrote is scanned for the environment's secrets while its bucket still exists."""
    name = f"ql_{uuid.uuid4().hex[:12]}"
    with QuantLabEnvironment(quantlab_target, tmp_path / "quantlab", s3=s3_server, toxiproxy=toxiproxy,
                             exchange=fake_binance, settings=quantlab_settings, name=name,
                             runbook=_runbook_of(request)) as env:
        yield env
        scan_environment_output(request.node, env)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                               call: pytest.CallInfo[None]) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    """Reads each phase's end as one of the five outcomes (harness.outcomes) and carries it on the report as
    `verdict` (xdist ships report attributes to the controller): a failed setup or teardown is the harness's error."""
    result = yield
    report = result.get_result()
    if report.skipped:
        verdict = Verdict(SKIPPED, skip_reason(report))
    elif call.when == "call":
        verdict = _verdict(call.excinfo.value if call.excinfo else None)
    elif report.failed:
        exc = call.excinfo.value if call.excinfo else None
        verdict = Verdict(ERROR, one_sentence(f"[error] the harness failed in {call.when}: "
                                              f"{type(exc).__name__}: {exc}"))
    else:
        return
    report.verdict = {"outcome": verdict.outcome, "message": verdict.message,  # type: ignore[attr-defined]
                      "blocked_by": verdict.blocked_by}


def _verdict(exc: BaseException | None) -> Verdict:
    """classify(), with a plain assert's message as the sentence: pytest appends its explanation of the expression
    (`assert ...`, `+  where ...`), which read flattened like a cut traceback."""
    verdict = classify(exc)
    if type(exc) is AssertionError:
        return replace(verdict, message=one_sentence(assertion_message(exc)))
    return verdict


def assertion_message(exc: AssertionError) -> str:
    """The message a plain assert was given, or the asserted expression when it was given none."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    explained = next((i for i, line in enumerate(lines) if line.startswith("assert ")), len(lines))
    return " ".join(lines[:explained] if explained else lines[:1]) or "an assertion failed"


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> tuple[str, str, str] | None:
    """The terminal shows blocked, drift and error scenarios as such, not as plain failures."""
    verdict = getattr(report, "verdict", None)
    if not report.failed or not isinstance(verdict, dict):
        return None
    letters = {BLOCKED: ("blocked", "B", "BLOCKED"), DRIFT: ("drift", "D", "DRIFT"), ERROR: ("error", "E", "ERROR")}
    return letters.get(str(verdict.get("outcome")))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Blocked and drift scenarios with why, as pytest prints failures (it prints only its own categories)."""
    if terminalreporter.config.option.tbstyle == "no":
        return
    for category, title in (("blocked", "BLOCKED"), ("drift", "DRIFT")):
        reports = [r for r in terminalreporter.stats.get(category, []) if getattr(r, "longrepr", None)]
        if not reports:
            continue
        terminalreporter.write_sep("=", title)
        for report in reports:
            terminalreporter.write_sep("_", report.head_line or report.nodeid)
            terminalreporter.line(report.longreprtext)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """After the test body (passed or not), while its allure result is open: attach the environment's evidence."""
    yield
    item.stash[COST_RSS] = _tree_rss()  # while the environment still runs
    funcargs = getattr(item, "funcargs", {})
    env = funcargs.get("quantlab")
    if isinstance(env, QuantLabEnvironment):
        remember_secrets(item, env.secrets())  # a token rotated during the test is known to the leak scans too
        attach_evidence(env)
    journal = funcargs.get("journal") if isinstance(funcargs.get("journal"), Journal) else None
    waits = [*(env.inherent_waits if isinstance(env, QuantLabEnvironment) else []), *(journal.waits if journal else [])]
    if waits:
        item.user_properties.append(("inherent_waits", json.dumps([[reason, round(s, 3)] for reason, s in waits])))
    secrets = list(env.secrets().values()) if isinstance(env, QuantLabEnvironment) else []
    item.stash[FINDINGS] = findings = _findings_of(item, journal, secrets)
    show_findings(item, journal, findings)


def _findings_of(item: pytest.Item, journal: Journal | None, secrets: list[str]) -> list[Mapping[str, Any]]:
    """The test's findings, secrets redacted: its journal's, or those a security scenario reported in its
    user_properties."""
    if journal is not None:
        found = [asdict(finding) for finding in journal.findings]
    else:
        security = dict(item.user_properties).get(SECURITY_PROPERTY)
        found = list(json.loads(str(security)).get("findings", [])) if security else []
    return [{**f, "title": redact(str(f["title"]), secrets), "detail": redact(str(f["detail"]), secrets)} for f in found]


def show_findings(item: pytest.Item, journal: Journal | None, findings: list[Mapping[str, Any]]) -> None:
    """Every finding on the test's own allure result, while the test is still its current one: a step each, a tag
    per severity, and the description: what the test proves, its docstring, then the findings, the worst first."""
    for finding in findings:
        with allure.step(f"finding [{finding.get('severity', 'warning')}]: {finding['title']}"):
            allure.attach(finding["detail"], name=f"finding: {finding['title']}",
                          attachment_type=allure.attachment_type.TEXT)
    for severity in dict.fromkeys(str(f.get("severity", "warning")) for f in findings):
        allure.dynamic.tag(f"{severity} finding")
    proves = f"Proves {journal.item.source}" if journal is not None else ""
    function = getattr(item, "function", None)
    doc = inspect.cleandoc(function.__doc__) if function is not None and function.__doc__ else ""
    listed = f"**Findings ({len(findings)})**\n\n{findings_markdown(findings)}" if findings else ""
    text = "\n\n".join(part for part in (proves, doc, listed) if part)
    if text:
        allure.dynamic.description(text)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """A test with a defect finding says so first in its allure status details (the call's report has set them by
    now), so the defect is what a reader sees on the failed test, not only deep in its deviations."""
    defects = [f for f in item.stash.get(FINDINGS, []) if f.get("severity") == "defect"]
    result = _allure_result(item.config)
    if not defects or result is None:
        return
    said = "\n".join(f"defect: {f['title']}: {f['detail']}" for f in defects)
    if result.statusDetails is None:
        result.statusDetails = StatusDetails(message=said)
    else:
        result.statusDetails.message = said + (f"\n\n{result.statusDetails.message}" if result.statusDetails.message else "")


def _allure_result(config: pytest.Config) -> TestResult | None:
    """The allure result of the running test, or None without --alluredir (allure has no public call that amends
    a test's status details)."""
    listener = config.pluginmanager.getplugin("allure_listener")
    return listener.allure_logger.get_test(None) if listener is not None else None


def _runbook_of(request: pytest.FixtureRequest) -> Runbook | None:
    try:
        runbook: Runbook = request.getfixturevalue("runbook_model")
        return runbook
    except pytest.UsageError:
        return None


def attach_evidence(env: QuantLabEnvironment) -> None:
    """Service journals, HTTP exchanges, audit lines and archive objects of the test, secrets redacted."""
    secrets = list(env.secrets().values())
    for role in env.services:
        try:
            lines = env.logs(role)
        except HarnessError:
            continue
        if lines:
            allure.attach(redact("\n".join(lines[-400:]), secrets), name=f"journal {role}", attachment_type=allure.attachment_type.TEXT)
    if env.http_log:
        allure.attach(redact(json.dumps(env.http_log[-100:], indent=2), secrets), name="HTTP exchanges",
                      attachment_type=allure.attachment_type.JSON)
    audit = [line for path in sorted(env.audit_dir.rglob("*.jsonl")) for line in path.read_text(errors="replace").splitlines()]
    if audit:
        allure.attach(redact("\n".join(audit[-400:]), secrets), name="audit spool", attachment_type=allure.attachment_type.TEXT)
    try:
        keys = env.bucket.list_keys("replay_runs/")
        manifests = {key: env.bucket.read_json(key) for key in keys if key.endswith("manifest.json")}
    except Exception:  # noqa: BLE001 - evidence is best effort; the bucket may be unreachable by design
        return
    if keys:
        allure.attach(redact(json.dumps({"objects": keys, "manifests": manifests}, indent=2), secrets),
                      name="archive objects", attachment_type=allure.attachment_type.JSON)


@pytest.fixture()
@teardown_named("save the journal into the test report")
def journal(request: pytest.FixtureRequest, runbook_model: Runbook) -> Iterator[Journal]:
    """The journal of the runbook item named by the test's `runbook` marker; saved into the test report."""
    marker = request.node.get_closest_marker("runbook")
    if marker is None or not marker.args:
        raise pytest.UsageError(f"{request.node.nodeid} uses the journal fixture but has no @pytest.mark.runbook('<item>')")
    item_id = marker.args[0]
    try:
        item = runbook_model.item(item_id)
    except KeyError:
        pytest.skip(f"the runbook {runbook_model.path} has no item '{item_id}' (drift: see 'quantlab-chaos runbook check')")
    entry = Journal(item)
    for label, value in allure_group_labels(RUNBOOK_PARENT, *runbook_groups(runbook_model, item)):
        allure.dynamic.label(label, value)
    allure.dynamic.label("runbook_item", item.id)
    allure.dynamic.label("runbook_line", str(item.source.line))
    try:
        yield entry
    finally:
        # user_properties travel from xdist workers to the controller and into the JUnit XML.
        request.node.user_properties.append(("runbook_journal", json.dumps(entry.to_dict(), default=str)))
