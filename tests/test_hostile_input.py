"""Hostile input to the harness: malformed or partial runbooks, unknown sections, missing or malformed unit files,
bad TOML, and node, npm, go or toxiproxy missing. Each refusal is exit 2 with one paragraph that says what to do
and no traceback; a partial runbook still parses, and what it lacks is drift (exit 1); unknown sections are shown.
Every case runs the real command line as a subprocess."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.target import PROJECT_ROOT, TWIN_ROOT
from tests.twin_copy import twin_copy

CLI = str(Path(sys.executable).with_name("quantlab-chaos"))
RUNBOOK = TWIN_ROOT / "docs" / "runbook.md"
OBSERVER_UNIT = "core/observer-api/quantlab-observer.service"
# Every refusal tells the user what to do: one of these verbs, as an instruction.
ADVICE = re.compile(r"\b(install|fix|point|pass|add|remove|rename|run|use|set|check|restore|save|write|turn|"
                    r"name|create|put|quote|must be)\b", re.I)
NODE_TOOLS = ("node", "npm", "npx", "corepack")
GO_TOOLS = ("go", "gofmt", "toxiproxy-server", "toxiproxy-cli")


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path = PROJECT_ROOT,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {key: value for key, value in os.environ.items() if key not in ("TOXIPROXY_BIN", "TOXIPROXY_URL")}
    return subprocess.run(argv, cwd=cwd, env={**full_env, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def chaos(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run([CLI, *args], env=env)


def canary(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "canary", *args], env=env)


def assert_refused(done: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit 2, no traceback, and one paragraph on stderr that names `expected` and says what to do."""
    output = done.stdout + done.stderr
    assert done.returncode == 2, f"exit {done.returncode}, not 2:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    message = done.stderr.strip()
    assert message and "\n\n" not in message, f"not one paragraph:\n{message}"
    for text in expected:
        assert text in message, f"{text!r} is not in the message:\n{message}"
    assert ADVICE.search(message), f"the message does not say what to do:\n{message}"
    return message


@pytest.fixture(scope="module")
def shadow_path(tmp_path_factory: pytest.TempPathFactory) -> Callable[[tuple[str, ...]], str]:
    """PATH as it is, minus some programs: one folder of links to every other program on PATH."""
    made: dict[tuple[str, ...], str] = {}

    def without(names: tuple[str, ...]) -> str:
        if names not in made:
            folder = tmp_path_factory.mktemp("path-without-" + "-".join(names[:2]))
            for directory in os.environ.get("PATH", "").split(os.pathsep):
                if not os.path.isdir(directory):
                    continue
                for entry in os.scandir(directory):
                    link = folder / entry.name
                    if entry.name in names or link.exists() or link.is_symlink():
                        continue
                    if entry.is_file() and os.access(entry.path, os.X_OK):
                        link.symlink_to(entry.path)
            made[names] = str(folder)
        return made[names]

    return without


# -- runbooks ------------------------------------------------------------------------------------------------

def _runbook_variant(tmp_path: Path, name: str) -> Path:
    text = RUNBOOK.read_text()
    path = tmp_path / f"{name}.md"
    if name == "not-utf8":
        path.write_bytes(b"\xff\xfe# runbook\n## Start / Stop\n")
    elif name == "no-sections":
        path.write_text("Just prose, no headings a runbook has.\n")
    elif name == "failure-without-fix":
        path.write_text(text.replace("- Fix:", "- Remedy:", 1))
    elif name == "folder":
        path.mkdir()
    elif name == "missing":
        pass
    return path


@pytest.mark.parametrize(("variant", "command", "expected"), [
    ("not-utf8", "show", ("cannot be read", "UTF-8")),
    ("no-sections", "show", ("no runbook sections the harness knows",)),
    ("failure-without-fix", "check", ("line", "has no 'Fix:' bullet")),
    ("folder", "show", ("is a folder", "markdown file")),
    ("folder", "check", ("is a folder", "markdown file")),
    ("missing", "check", ("does not exist",)),
])
def test_a_malformed_runbook_is_refused_with_what_to_do(tmp_path: Path, variant: str, command: str,
                                                       expected: tuple[str, ...]) -> None:
    path = _runbook_variant(tmp_path, variant)
    assert_refused(chaos("runbook", command, "--runbook", str(path)), str(path), *expected)


def test_a_checkout_given_as_the_runbook_is_pointed_at_quantlab_root() -> None:
    done = chaos("runbook", "check", "--runbook", str(TWIN_ROOT))
    assert_refused(done, "is a folder", f"--quantlab-root {TWIN_ROOT.resolve()}", "docs/runbook.md")


def _without_section(heading: str) -> str:
    text = RUNBOOK.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[:start] + (text[end + 1:] if end >= 0 else "")


@pytest.mark.parametrize("partial", ["no-failures-section", "empty-failures-section", "truncated"])
def test_a_partial_runbook_parses_and_what_it_lacks_is_drift(tmp_path: Path, partial: str) -> None:
    path = tmp_path / "runbook.md"
    if partial == "no-failures-section":
        path.write_text(_without_section("## Most Common Failures"))
    elif partial == "empty-failures-section":
        path.write_text(_without_section("## Most Common Failures") + "\n## Most Common Failures\n\nNone yet.\n")
    else:
        path.write_text(RUNBOOK.read_text()[:1500])  # cut mid-file, as an interrupted copy leaves it
    shown = chaos("runbook", "show", "--runbook", str(path))
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    checked = chaos("runbook", "check", "--runbook", str(path))
    output = checked.stdout + checked.stderr
    assert checked.returncode == 1 and "Traceback" not in output, output
    missing = re.findall(r"\[no-runbook-item\] (failure:[\w-]+)", checked.stdout)
    assert "failure:live-ws-disabled" in missing and "failure:archive-missing" in missing, checked.stdout


def test_unknown_sections_are_shown_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "runbook.md"
    path.write_text(RUNBOOK.read_text() + "\n## On-Call Rota\n\nAsk Dana.\n\n## Glossary\n\nSome words.\n")
    shown = chaos("runbook", "show", "--runbook", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "Sections the harness does not know: On-Call Rota, Glossary" in shown.stdout
    checked = chaos("runbook", "check", "--runbook", str(path))
    assert checked.returncode == 0 and "0 mismatch(es)" in checked.stdout, checked.stdout + checked.stderr


# -- targets and their unit files ------------------------------------------------------------------------------

def test_a_folder_that_is_no_checkout_is_refused(tmp_path: Path) -> None:
    assert_refused(chaos("runbook", "check", "--quantlab-root", str(tmp_path / "nope")), "is not a folder")
    assert_refused(chaos("runbook", "show", "--quantlab-root", str(tmp_path)), "does not look like a QuantLab checkout")


@pytest.mark.parametrize(("profile", "expected"), [
    ("[services\nport_env = 1\n", ("is not valid TOML", "line 1")),
    ('[services."quantlab-observer.service"]\nportenv = "OBSERVER_PORT"\n', ("unknown keys", "portenv")),
])
def test_a_bad_target_profile_toml_is_refused(tmp_path: Path, profile: str, expected: tuple[str, ...]) -> None:
    copy = twin_copy(tmp_path / "ql")
    (copy / ".quantlab-chaos.toml").write_text(profile)
    for args in (("runbook", "check"), ("run", "--reports", str(tmp_path / "reports"))):
        assert_refused(chaos(*args, "--quantlab-root", str(copy)), ".quantlab-chaos.toml", *expected)


@pytest.mark.parametrize(("edit", "expected"), [
    (("[Service]", "[Service]\nthis line is not a directive"), (f"{OBSERVER_UNIT}:10:", "Add the missing '='")),
    (("RestartSec=5s", "RestartSec=soon"), (f"{OBSERVER_UNIT}:17:", "RestartSec=soon is invalid", "Set RestartSec=")),
    (("ExecStart=/usr/bin/node", "ExecStart=\"/usr/bin/node"), (f"{OBSERVER_UNIT}:15:", "never closed", "Quote")),
    (("ExecStart=", "#ExecStart="), (OBSERVER_UNIT, "there is no ExecStart= line", "Add ExecStart=")),
], ids=["not-a-directive", "bad-value", "unclosed-quote", "no-exec-start"])
def test_a_malformed_unit_file_stops_run_and_env_up_naming_file_and_line(tmp_path: Path, edit: tuple[str, str],
                                                                        expected: tuple[str, ...]) -> None:
    copy = twin_copy(tmp_path / "ql", {OBSERVER_UNIT: edit})
    assert_refused(chaos("run", "--quantlab-root", str(copy), "--reports", str(tmp_path / "reports")), *expected)
    assert not (tmp_path / "reports" / "summary.json").exists()
    assert_refused(chaos("env", "up", "--quantlab-root", str(copy), "--service", "observer"), *expected)


def test_a_checkout_without_unit_files_is_refused(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql")
    for unit in [*copy.glob("ops/systemd/*.service"), *copy.glob("core/*/*.service")]:
        unit.unlink()
    assert_refused(chaos("run", "--quantlab-root", str(copy), "--reports", str(tmp_path / "reports")),
                   "has no unit files", "--quantlab-root")


def test_a_unit_file_the_runbook_names_but_the_checkout_lacks_is_drift(tmp_path: Path) -> None:
    copy = twin_copy(tmp_path / "ql")
    (copy / "ops" / "systemd" / "quantlab-live.service").unlink()
    done = chaos("runbook", "check", "--quantlab-root", str(copy))
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert any(line.strip().startswith("[unit-file] start-stop") and "ops/systemd/quantlab-live.service" in line
               and "no such unit file" in line for line in done.stdout.splitlines()), done.stdout


def test_env_up_refuses_a_service_the_target_does_not_have() -> None:
    assert_refused(chaos("env", "up", "--service", "nosuch"), "No service 'nosuch'", "observer")


def test_an_unwritable_reports_folder_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_refused(chaos("run", "--only", "failure:live-ws-disabled", "--reports", str(blocker / "reports")),
                   str(blocker))


# -- missing tools ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [("run",), ("env", "up")], ids=["run", "env-up"])
def test_missing_node_is_refused_before_anything_boots(tmp_path: Path, shadow_path: Callable[[tuple[str, ...]], str],
                                                       command: tuple[str, ...]) -> None:
    path = shadow_path(NODE_TOOLS)
    args = [*command, "--reports", str(tmp_path / "reports")] if command == ("run",) else list(command)
    assert_refused(chaos(*args, env={"PATH": path}), "node is not on PATH", "Install Node.js 20")


def test_missing_npm_is_refused_when_a_unit_runs_it(shadow_path: Callable[[tuple[str, ...]], str]) -> None:
    path = shadow_path(("npm", "npx"))
    assert_refused(chaos("env", "up", env={"PATH": path}), "npm is not on PATH", "quantlab-console-ui.service")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_named_toxiproxy_that_is_missing_is_refused(tmp_path: Path, how: str) -> None:
    missing = str(tmp_path / "toxiproxy-server")
    args = ["run", "--only", "failure:live-ws-disabled", "--reports", str(tmp_path / "reports")]
    done = chaos(*args, "--toxiproxy-bin", missing) if how == "flag" else chaos(*args, env={"TOXIPROXY_BIN": missing})
    assert_refused(done, missing, "not an executable file", "make bootstrap")


def _scratch_project(root: Path, *, twin_installed: bool) -> Path:
    """What `make bootstrap` reads, with every other step already done, so only the step under test runs."""
    for relative in ("Makefile", "pyproject.toml", "tools/install-toxiproxy.sh", "tools/allure/package-lock.json",
                     "reference/quantlab/package-lock.json"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / relative, root / relative)
    stamps = [".venv/.installed", "tools/allure/node_modules/.installed"]
    stamps += ["reference/quantlab/node_modules/.installed"] if twin_installed else []
    for stamp in stamps:
        (root / stamp).parent.mkdir(parents=True, exist_ok=True)
        (root / stamp).touch()
    return root


def test_install_toxiproxy_without_go_says_how_to_get_it(tmp_path: Path,
                                                         shadow_path: Callable[[tuple[str, ...]], str]) -> None:
    root = _scratch_project(tmp_path, twin_installed=True)
    done = run([str(root / "tools" / "install-toxiproxy.sh")], env={"PATH": shadow_path(GO_TOOLS)}, cwd=root)
    assert_refused(done, "Go is missing", "Install Go", "toxiproxy-server")
    assert not (root / ".tools" / "bin" / "toxiproxy-server").exists()


def test_run_without_toxiproxy_or_go_says_how_to_get_it(tmp_path: Path,
                                                        shadow_path: Callable[[tuple[str, ...]], str]) -> None:
    """A fresh checkout: no .tools/bin, no toxiproxy on PATH, and no Go to build it with."""
    root = tmp_path / "project"
    for package in ("harness", "canary"):
        shutil.copytree(PROJECT_ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "tools").mkdir()
    shutil.copy2(PROJECT_ROOT / "tools" / "install-toxiproxy.sh", root / "tools")
    twin_copy(root / "reference" / "quantlab")
    done = run([sys.executable, "-m", "harness.cli", "run", "--reports", str(tmp_path / "reports")], cwd=root,
               env={"PATH": shadow_path(GO_TOOLS), "PYTHONPATH": str(root)})
    assert_refused(done, "installing toxiproxy failed", "Go is missing", "Install Go", "make bootstrap")
    assert not (tmp_path / "reports" / "summary.json").exists()


@pytest.mark.parametrize(("missing", "expected"), [
    (GO_TOOLS, ("Go is missing", "Install Go")),
    (NODE_TOOLS, ("node not found", "install Node.js 20")),
], ids=["go", "node"])
def test_make_bootstrap_without_a_tool_exits_2_saying_what_to_install(
        tmp_path: Path, shadow_path: Callable[[tuple[str, ...]], str], missing: tuple[str, ...],
        expected: tuple[str, ...]) -> None:
    root = _scratch_project(tmp_path, twin_installed=missing == GO_TOOLS)
    done = run(["make", "--no-print-directory", "-C", str(root), "bootstrap"], env={"PATH": shadow_path(missing)},
               cwd=root)
    # make adds its own "make: *** [...] Error 2" line under the recipe's message.
    recipe_lines = [line for line in done.stderr.splitlines() if not line.startswith("make: ***")]
    assert_refused(subprocess.CompletedProcess(done.args, done.returncode, done.stdout, "\n".join(recipe_lines)),
                   *expected)
    assert not (root / ".tools" / "bin" / ".ready").exists()


# -- the canary ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "expected"), [
    ("[target\nobserver_url = ", ("is not valid TOML", "line 1")),
    ('[target]\nobserver_url = "http://127.0.0.1:9"\n[auth]\ntoken = "abc"\n', ("refused", "token_env")),
    ('[target]\nobserver_url = "http://127.0.0.1:9"\n[bogus]\nx = 1\n', ("unknown section [bogus]",)),
    ('[target]\nobserver_url = 5\n', ("observer_url",)),
    (None, ("does not exist",)),
], ids=["bad-toml", "secret-in-file", "unknown-section", "wrong-type", "missing"])
def test_a_bad_canary_config_is_refused(tmp_path: Path, config: str | None, expected: tuple[str, ...]) -> None:
    path = tmp_path / "canary.toml"
    if config is not None:
        path.write_text(config)
    message = assert_refused(canary("--config", str(path)), str(path), *expected)
    assert "abc" not in message


def test_the_canary_without_node_is_refused(tmp_path: Path, shadow_path: Callable[[tuple[str, ...]], str]) -> None:
    path = tmp_path / "canary.toml"
    path.write_text(f'[target]\nobserver_url = "http://127.0.0.1:9"\nquantlab_root = "{TWIN_ROOT}"\n'
                    '[auth]\ntoken_env = "HOSTILE_TOKEN"\n')
    done = canary("--config", str(path), "--check", "config_check",
                  env={"PATH": shadow_path(NODE_TOOLS), "HOSTILE_TOKEN": "t0ken-value"})
    assert_refused(done, "node is not on PATH", "install Node.js 20")


# -- the front door -----------------------------------------------------------------------------------------------

def test_the_canary_outside_its_environment_says_how_to_run_it(tmp_path: Path) -> None:
    """`python -m canary` by a Python without the canary's packages (-S: no site-packages, like a system Python)."""
    done = run([sys.executable, "-S", "-m", "canary", "--config", str(tmp_path / "canary.toml")])
    assert_refused(done, "does not have the package", f"{PROJECT_ROOT}/bin/quantlab-canary",
                   ".venv/bin/python -m canary")


@pytest.mark.parametrize("command", ["quantlab-chaos", "quantlab-canary"])
def test_the_bin_commands_run_from_any_folder(tmp_path: Path, command: str) -> None:
    done = run([str(PROJECT_ROOT / "bin" / command), "--help"], cwd=tmp_path, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: "), done.stdout + done.stderr
