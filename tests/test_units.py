"""Unit files and env files are read as systemd reads them, and fitted onto a checkout visibly."""
from __future__ import annotations

import math
import os
import resource
import signal
import stat
import textwrap
from pathlib import Path

import pytest

from harness.sysd.deploy import load_service, rewrite_for_checkout
from harness.sysd.spec import HONOURED, ExecCommand, OutputSpec, ServiceSpec
from harness.sysd.unitfile import parse_unit, parse_unit_text
from harness.sysd.values import (
    ExitStatusSet,
    parse_cpu_quota,
    parse_exit_statuses,
    parse_memory_limit,
    parse_timespan,
    split_words,
)
from quantlab_chaos.envfile import EnvFile, write_env_file
from quantlab_chaos.errors import UnitError
from quantlab_chaos.redact import redact_env


def unit(text: str, name: str = "demo.service") -> ServiceSpec:
    return ServiceSpec.from_unit(parse_unit_text(textwrap.dedent(text), name))


def unit_error(text: str, name: str = "demo.service") -> str:
    with pytest.raises(UnitError) as caught:
        unit(text, name)
    return str(caught.value)


# -- syntax -----------------------------------------------------------------------------------

def test_repeated_keys_keep_their_order_and_an_empty_assignment_resets_the_list() -> None:
    parsed = parse_unit_text(textwrap.dedent("""\
        [Service]
        Environment=A=1
        Environment=B=2
        Environment=
        Environment=C=3
        Environment=D=4
        Restart=always
        Restart=on-failure
        """), "x.service")
    assert [d.value for d in parsed.directives("Service") if d.key == "Environment"] == ["A=1", "B=2", "", "C=3", "D=4"]
    assert parsed.get_all("Service", "Environment") == ["C=3", "D=4"]
    assert parsed.get("Service", "Restart") == "on-failure"
    assert parsed.get("Service", "Missing", "default") == "default"
    assert [d.line for d in parsed.find_all("Service", "Environment")] == [5, 6]


def test_comments_and_continuations_including_comment_lines_inside_a_continuation() -> None:
    spec = unit("""\
        # leading comment
        ; another comment style
        [Service]
        ExecStart=/usr/bin/node \\
            server.js \\
        # a comment inside the continued line is dropped
            --port 9150
        # comment ending in a backslash is not continued \\
        Restart=always
        """)
    assert spec.exec_start[0].argv == ("/usr/bin/node", "server.js", "--port", "9150")
    assert spec.exec_start[0].line == 4
    assert spec.restart == "always"


def test_specifiers_expand_and_unknown_ones_are_reported() -> None:
    spec = unit("""\
        [Service]
        ExecStart=/bin/echo %n %N %p %i 100%% %h
        """, name="worker@blue.service")
    assert spec.exec_start[0].argv == (
        "/bin/echo", "worker@blue.service", "worker@blue", "worker", "blue", "100%", "%h")
    assert spec.unit.unresolved_specifiers == [(2, "%h")]
    assert any("%h" in warning and ":2" in warning for warning in spec.warnings)


@pytest.mark.parametrize(("text", "words"), [
    ('a "b c" \'d e\'', ["a", "b c", "d e"]),
    ('--opt="x y"z', ["--opt=x yz"]),
    (r'"say \"hi\"" tab\tend \x41 \101 sp\ ace', ['say "hi"', "tab\tend", "A", "A", "sp ace"]),
    ('""  x', ["", "x"]),
    ("   ", []),
])
def test_words_split_with_systemd_quoting(text: str, words: list[str]) -> None:
    assert split_words(text) == words


@pytest.mark.parametrize("text", ['"never closed', r"bad \q escape", "ends with \\"])
def test_bad_quoting_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        split_words(text)


def test_exec_prefixes_are_recorded_and_applied() -> None:
    spec = unit("""\
        [Service]
        Type=oneshot
        ExecStart=-/bin/false
        ExecStart=@/bin/sh fancy-name -c "echo $HOME"
        ExecStart=:/bin/echo $HOME ${HOME}
        ExecStart=+!!/bin/true
        ExecStartPre=-/bin/true
        ExecStop=/bin/kill $MAINPID
        """)
    false, fancy, literal, privileged = spec.exec_start
    assert false.ignore_failure and false.argv == ("/bin/false",)
    assert fancy.path == "/bin/sh" and fancy.argv == ("fancy-name", "-c", "echo $HOME") and not fancy.ignore_failure
    assert literal.expand({"HOME": "/root"}) == ["/bin/echo", "$HOME", "${HOME}"]
    assert privileged.prefixes == "+!!" and privileged.path == "/bin/true"
    assert spec.exec_start_pre[0].ignore_failure
    assert spec.exec_stop[0].expand({"MAINPID": "42"}) == ["/bin/kill", "42"]


def test_variable_substitution_follows_systemd() -> None:
    command = ExecCommand(path="/bin/echo", argv=("/bin/echo", "$ARGS", "${ARGS}", "x${ONE}y", "$$HOME", "$UNSET"))
    assert command.expand({"ARGS": "a  b", "ONE": "1"}) == ["/bin/echo", "a", "b", "a  b", "x1y", "$HOME"]


def test_environment_quoting_several_per_line_and_repeated_lines() -> None:
    spec = unit("""\
        [Service]
        ExecStart=/bin/true
        Environment="A=b c" D=e
        Environment=F=g\\ h 'I=j k'
        Environment=D=override not-an-assignment
        """)
    assert spec.env_dict == {"A": "b c", "D": "override", "F": "g h", "I": "j k"}
    assert any("not-an-assignment" in warning for warning in spec.warnings)


def test_environment_files_keep_order_and_optional_marker() -> None:
    spec = unit("""\
        [Service]
        ExecStart=/bin/true
        EnvironmentFile=/etc/quantlab/old.env
        EnvironmentFile=
        EnvironmentFile=/etc/quantlab/replayd.env
        EnvironmentFile=-/etc/quantlab/local.env
        """)
    assert [(str(ref.path), ref.optional) for ref in spec.environment_files] == [
        ("/etc/quantlab/replayd.env", False), ("/etc/quantlab/local.env", True)]


# -- service semantics ------------------------------------------------------------------------

def test_defaults_match_systemd() -> None:
    spec = unit("[Service]\nExecStart=/bin/true\n")
    assert (spec.type, spec.restart, spec.restart_sec) == ("simple", "no", 0.1)
    assert (spec.start_limit_interval, spec.start_limit_burst) == (10.0, 5)
    assert (spec.timeout_start, spec.timeout_stop, spec.kill_mode) == (90.0, 90.0, "control-group")
    assert unit("[Service]\nType=oneshot\nExecStart=/bin/true\n").timeout_start == math.inf


@pytest.mark.parametrize(("text", "seconds"), [
    ("5", 5.0), ("5s", 5.0), ("500ms", 0.5), ("1min 30s", 90.0), ("2h", 7200.0), ("1h30min", 5400.0),
    ("1.5s", 1.5), ("100 ms", 0.1), ("2 weeks", 1209600.0), ("infinity", math.inf), ("0", 0.0),
])
def test_time_spans(text: str, seconds: float) -> None:
    assert parse_timespan(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5x", "-1", "s", "1 2x", "five"])
def test_bad_time_spans(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timespan(text)


def test_restart_and_limits_directives() -> None:
    spec = unit("""\
        [Unit]
        StartLimitIntervalSec=60s
        StartLimitBurst=5
        [Service]
        ExecStart=/bin/true
        Restart=on-failure
        RestartSec=5s
        TimeoutStopSec=1min 30s
        TimeoutStartSec=500ms
        MemoryMax=2G
        CPUQuota=80%
        LimitNOFILE=104857
        StandardOutput=append:/home/deploy/quantlab-backend/server.log
        StandardError=inherit
        """)
    assert (spec.restart, spec.restart_sec, spec.start_limit_interval, spec.start_limit_burst) == (
        "on-failure", 5.0, 60.0, 5)
    assert (spec.timeout_stop, spec.timeout_start) == (90.0, 0.5)
    assert (spec.memory_max, spec.cpu_quota, spec.limit_nofile) == (2 * 1024**3, 80.0, (104857, 104857))
    assert spec.standard_output == OutputSpec("append", Path("/home/deploy/quantlab-backend/server.log"))
    assert spec.standard_error == OutputSpec("inherit")


def test_restart_prevent_exit_status_lists_add_up_and_an_empty_assignment_resets_them() -> None:
    spec = unit("""\
        [Service]
        ExecStart=/bin/true
        Restart=on-failure
        RestartPreventExitStatus=1 6
        RestartPreventExitStatus=
        RestartPreventExitStatus=3 SIGABRT
        RestartPreventExitStatus=EXEC TERM
        """)
    prevent = spec.restart_prevent_exit_status
    assert prevent == ExitStatusSet(frozenset({3, 203}), frozenset({signal.SIGABRT, signal.SIGTERM}))
    assert prevent.matches(3) and prevent.matches(203) and prevent.matches(-signal.SIGABRT)
    assert not prevent.matches(1) and not prevent.matches(6) and not prevent.matches(-signal.SIGKILL)
    assert str(prevent) == "3 203 SIGABRT SIGTERM"
    assert unit("[Service]\nExecStart=/bin/true\n").restart_prevent_exit_status == ExitStatusSet()
    assert "RestartPreventExitStatus" in HONOURED["Service"]
    assert not spec.unhonoured_directives()


@pytest.mark.parametrize(("text", "statuses", "signals"), [
    ("2", {2}, set()), ("0 255", {0, 255}, set()), ("SIGKILL", set(), {signal.SIGKILL}),
    ("HUP", set(), {signal.SIGHUP}), ("SUCCESS INVALIDARGUMENT CHDIR", {0, 2, 200}, set()), ("", set(), set()),
])
def test_exit_status_words(text: str, statuses: set[int], signals: set[signal.Signals]) -> None:
    assert parse_exit_statuses(text) == ExitStatusSet(frozenset(statuses), frozenset(signals))


@pytest.mark.parametrize("text", ["256", "SIGNOPE", "-1", "exec"])
def test_bad_exit_status_words_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_exit_statuses(text)


def test_legacy_start_limit_interval_in_service_section_and_last_assignment_wins() -> None:
    legacy = unit("[Service]\nExecStart=/bin/true\nStartLimitInterval=30\nStartLimitBurst=2\n")
    assert (legacy.start_limit_interval, legacy.start_limit_burst) == (30.0, 2)
    both = unit("[Unit]\nStartLimitIntervalSec=60s\n[Service]\nExecStart=/bin/true\nStartLimitInterval=5s\n")
    assert both.start_limit_interval == 5.0


@pytest.mark.parametrize(("text", "expected"), [
    ("1024", 1024), ("512M", 512 * 1024**2), ("1.5K", 1536), ("2G", 2 * 1024**3), ("1T", 1024**4),
    ("infinity", None),
])
def test_memory_limits(text: str, expected: int | None) -> None:
    assert parse_memory_limit(text) == expected


def test_memory_percent_is_of_physical_memory_and_cpu_quota_is_percent() -> None:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert parse_memory_limit("50%") == total // 2
    assert parse_cpu_quota("80%") == 80.0 and parse_cpu_quota("200%") == 200.0
    with pytest.raises(ValueError):
        parse_cpu_quota("80")


def test_limit_nofile_forms() -> None:
    assert unit("[Service]\nExecStart=/bin/true\nLimitNOFILE=1024:4096\n").limit_nofile == (1024, 4096)
    assert unit("[Service]\nExecStart=/bin/true\nLimitNOFILE=infinity\n").limit_nofile == (
        resource.RLIM_INFINITY, resource.RLIM_INFINITY)


def test_working_directory_dash_and_tilde() -> None:
    optional = unit("[Service]\nExecStart=/bin/true\nWorkingDirectory=-/srv/missing\n")
    assert (optional.working_directory, optional.working_directory_optional) == (Path("/srv/missing"), True)
    home = unit("[Service]\nExecStart=/bin/true\nWorkingDirectory=~\n")
    assert home.working_directory is None and home.working_directory_home


@pytest.mark.parametrize(("body", "needle"), [
    ("Type=forking\nExecStart=/bin/true", "Type=forking is not supported"),
    ("Type=notify\nExecStart=/bin/true", "Type=notify is not supported"),
    ("Type=bogus\nExecStart=/bin/true", "Type=bogus is not a systemd service type"),
    ("ExecStart=/bin/true\nExecStart=/bin/false", "allows one ExecStart="),
    ("Restart=sometimes\nExecStart=/bin/true", "Restart=sometimes is invalid"),
    ("Type=oneshot\nRestart=always\nExecStart=/bin/true", "not allowed for Type=oneshot"),
    ("ExecStart=bin/node x", "relative path"),
    ('ExecStart=/bin/echo "unclosed', "cannot be split"),
    ("ExecStart=/bin/true\nRestartSec=soon", "RestartSec=soon is invalid"),
    ("ExecStart=/bin/true\nMemoryMax=2g", "MemoryMax=2g is invalid"),
    ("ExecStart=/bin/true\nCPUQuota=80", "CPUQuota=80 is invalid"),
    ("ExecStart=/bin/true\nWorkingDirectory=relative", "not an absolute path"),
    ("ExecStart=/bin/true\nStandardOutput=append:server.log", "needs an absolute path"),
    ("ExecStart=/bin/true\nStartLimitBurst=many", "not a whole number"),
    ("ExecStart=/bin/true\nRestartPreventExitStatus=2 SIGNOPE", "RestartPreventExitStatus=2 SIGNOPE is invalid"),
    ("Type=simple", "no ExecStart="),
])
def test_invalid_services_name_file_line_and_fix(body: str, needle: str) -> None:
    message = unit_error("[Unit]\nDescription=x\n[Service]\n" + body + "\n")
    assert needle in message
    assert message.startswith("demo.service:") and "\n" not in message
    assert message.rstrip().endswith(".")


@pytest.mark.parametrize(("text", "line", "needle"), [
    ("[Service]\nExecStart /bin/true\n", 2, "neither a [Section] header"),
    ("ExecStart=/bin/true\n[Service]\n", 1, "before any [Section]"),
    ("[Unit]\nDescription=x\n[Service\n", 3, "section header"),
    ("[Service]\nExec Start=/bin/true\n", 2, "not a valid directive name"),
])
def test_malformed_syntax_names_the_line(text: str, line: int, needle: str) -> None:
    with pytest.raises(UnitError) as caught:
        parse_unit_text(text, "bad.service", Path("/units/bad.service"))
    assert f"/units/bad.service:{line}:" in str(caught.value)
    assert needle in str(caught.value)


def test_missing_unit_file_and_non_service_unit(tmp_path: Path) -> None:
    with pytest.raises(UnitError, match="does not exist"):
        parse_unit(tmp_path / "nope.service")
    timer = tmp_path / "quantlab-compact.timer"
    timer.write_text("[Timer]\nOnCalendar=*-*-* 02:30:00\nPersistent=true\n")
    with pytest.raises(UnitError, match=r"no \[Service\] section"):
        ServiceSpec.from_unit(parse_unit(timer))


def test_unhonoured_directives_are_listed_for_the_report() -> None:
    spec = unit("[Unit]\nAfter=network.target\n[Service]\nExecStart=/bin/true\nProtectSystem=full\n"
                "[Install]\nWantedBy=multi-user.target\n")
    assert [(d.section, d.key) for d in spec.unhonoured_directives()] == [
        ("Unit", "After"), ("Service", "ProtectSystem")]


# -- env files ---------------------------------------------------------------------------------

def test_env_file_rules(tmp_path: Path) -> None:
    path = tmp_path / "replayd.env"
    path.write_text(textwrap.dedent("""\
        # comment
        ; also a comment
        PLAIN=value
        SPACED = padded value\x20\x20\x20
        DOUBLE="a \\"quoted\\" $$ \\$HOME \\q"
        SINGLE='no $escapes \\n here'
        INLINE=keeps # this
        CONT=first\\
        second
        MULTI="line one
        line two"
        EMPTY=
        export OBSERVER_TOKEN=abc
        1BAD=x
        """))
    env = EnvFile.read(path)
    assert env.values == {
        "PLAIN": "value", "SPACED": "padded value", "DOUBLE": 'a "quoted" $$ $HOME \\q',
        "SINGLE": "no $escapes \\n here", "INLINE": "keeps # this", "CONT": "firstsecond",
        "MULTI": "line one\nline two", "EMPTY": "",
    }
    assert len(env.warnings) == 2 and "export" in env.warnings[0] and "1BAD" in env.warnings[1]
    with pytest.raises(UnitError, match="does not exist"):
        EnvFile.read(tmp_path / "missing.env")


def test_write_env_file_round_trips_with_mode_0600(tmp_path: Path) -> None:
    values = {"OBSERVER_TOKEN": "t0k$en\"with'quotes`and\\slash", "SPACES": "  a b  ", "HASH": "#not-comment",
              "MULTI": "x\ny", "EMPTY": ""}
    path = write_env_file(tmp_path / "sub" / "observer.env", values)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert EnvFile.read(path).values == values
    with pytest.raises(UnitError, match="cannot be written"):
        write_env_file(tmp_path / "bad.env", {"NOT VALID": "x"})


def test_redact_env_hides_secret_looking_names_only() -> None:
    assert redact_env({"OBSERVER_TOKEN": "x", "RUN_ARCHIVE_S3_SECRET_KEY": "y", "DB_PASSWORD": "z",
                       "OBSERVER_PORT": "9150", "EMPTY_TOKEN": ""}) == {
        "OBSERVER_TOKEN": "***", "RUN_ARCHIVE_S3_SECRET_KEY": "***", "DB_PASSWORD": "***",
        "OBSERVER_PORT": "9150", "EMPTY_TOKEN": ""}


# -- fitting production units onto a checkout -------------------------------------------------

OBSERVER_UNIT = """\
[Unit]
Description=QuantLab observer
[Service]
Type=simple
User=deploy
WorkingDirectory=/home/deploy/quantlab-backend/core/observer-api
Environment=OBSERVER_MODE=1
Environment=OBSERVER_PORT=3000 DATA=/home/deploy/quantlab-backend/data
EnvironmentFile=/etc/quantlab/observer.env
EnvironmentFile=-/etc/quantlab/local.env
EnvironmentFile=-/home/deploy/quantlab-backend/.env
ExecStart=/usr/bin/node /home/deploy/quantlab-backend/core/observer-api/node_modules/.bin/tsx index.ts \
  --root=/home/deploy/quantlab-backend --other=/home/deploy/quantlab-backend-old
Restart=always
RestartSec=5
StandardOutput=append:/home/deploy/quantlab-backend/core/observer-api/server.log
"""


def test_rewrite_for_checkout_rebases_root_env_files_and_records_every_change(tmp_path: Path) -> None:
    unit_path = tmp_path / "quantlab-observer.service"
    unit_path.write_text(OBSERVER_UNIT)
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    spec = ServiceSpec.from_unit(parse_unit(unit_path))
    harness_env = tmp_path / "env" / "observer.env"
    rewritten = rewrite_for_checkout(spec, checkout=checkout, env_file_map={
        "observer.env": harness_env, "/etc/quantlab/local.env": tmp_path / "env" / "local.env"})
    root = str(checkout.resolve())
    assert rewritten.working_directory == Path(root, "core/observer-api")
    assert rewritten.exec_start[0].argv[1:] == (
        f"{root}/core/observer-api/node_modules/.bin/tsx", "index.ts", f"--root={root}",
        "--other=/home/deploy/quantlab-backend-old")
    assert [ref.path for ref in rewritten.environment_files] == [
        harness_env, tmp_path / "env" / "local.env", Path(root, ".env")]
    assert [ref.optional for ref in rewritten.environment_files] == [False, True, True]
    assert rewritten.env_dict["DATA"] == f"{root}/data"
    assert rewritten.standard_output == OutputSpec("append", Path(root, "core/observer-api/server.log"))
    fields = [change.field for change in rewritten.rewrites]
    assert "WorkingDirectory" in fields and "standard_output" in fields and fields.count("EnvironmentFile") == 3
    assert spec.working_directory == Path("/home/deploy/quantlab-backend/core/observer-api")  # original untouched


def test_rewrite_env_file_map_may_be_callable_and_unmapped_files_are_refused(tmp_path: Path) -> None:
    spec = ServiceSpec.from_unit(parse_unit_text(OBSERVER_UNIT, "quantlab-observer.service"))
    rewritten = rewrite_for_checkout(spec, checkout=tmp_path, env_file_map=lambda path: tmp_path / path.name)
    assert [ref.path for ref in rewritten.environment_files][:2] == [tmp_path / "observer.env", tmp_path / "local.env"]
    with pytest.raises(UnitError, match="observer.env"):
        rewrite_for_checkout(spec, checkout=tmp_path, env_file_map={})


def test_missing_binaries_are_resolved_from_path_and_reported(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_node = bin_dir / "quantlab-test-node"
    fake_node.write_text("#!/bin/sh\n")
    fake_node.chmod(0o755)
    spec = unit("[Service]\nExecStart=/usr/bin/quantlab-test-node server.js\nExecStop=/usr/bin/env true\n")
    rewritten = rewrite_for_checkout(spec, checkout=tmp_path, search_path=str(bin_dir),
                                     resolve_binaries=("/usr/bin/quantlab-test-node", "/usr/bin/env"))
    assert rewritten.exec_start[0].path == str(fake_node)
    assert rewritten.exec_start[0].argv == (str(fake_node), "server.js")
    assert rewritten.exec_stop[0].path == "/usr/bin/env"  # exists here, so it stays
    [change] = [c for c in rewritten.rewrites if c.field.startswith("exec_start")]
    assert change.before == "/usr/bin/quantlab-test-node" and change.after == str(fake_node)
    assert "does not exist" in change.reason


def test_load_service_is_parse_interpret_rewrite(tmp_path: Path) -> None:
    unit_path = tmp_path / "quantlab-replayd.service"
    unit_path.write_text("[Service]\nWorkingDirectory=/home/deploy/quantlab-backend/services/replayd\n"
                         "EnvironmentFile=/etc/quantlab/replayd.env\n"
                         "ExecStart=/usr/bin/node /home/deploy/quantlab-backend/services/replayd/server.js\n"
                         "Restart=always\nRestartSec=5\n")
    spec = load_service(unit_path, checkout=tmp_path, env_file_map={"replayd.env": tmp_path / "r.env"})
    assert spec.name == "quantlab-replayd.service"
    assert spec.exec_start[0].argv[-1] == f"{tmp_path.resolve()}/services/replayd/server.js"
    assert spec.environment_files[0].path == tmp_path / "r.env"
    assert (spec.restart, spec.restart_sec) == ("always", 5.0)
