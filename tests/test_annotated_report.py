"""reports/runbook.html (harness.annotated): the runbook annotated with every item's outcome and evidence.

The renderer is proved on a small summary written here; the page a real run writes is opened from disk in headless
Chromium, its DOM read for every item's outcome, one evidence block unfolded through the URL fragment, and a
screenshot kept in the reports.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from harness.annotated import NOT_RUN, RUNBOOK_HTML, git_commit, moments, render, slug, write_annotated
from harness.target import TWIN_ROOT
from quantlab_chaos.runbook import load_runbook
from tests.browser import CHROMIUM_FLAGS

PROJECT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("quantlab-chaos"))
KEPT = PROJECT / "reports" / "runbook-twin"  # where a person finds the twin run's page and screenshot after the tests
RUN_ITEMS = ("kill-switch", "failure:live-ws-disabled")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(BROWSER is None, reason="headless Chromium is not installed")
VERDICT = re.compile(r'<span class="verdict [^"]*" data-item="([^"]*)" data-outcome="([^"]*)"')

RUNBOOK = """# Tiny runbook <b>raw</b>

## Kill-Switch
- `curl -X POST http://127.0.0.1:9150/stop`

## Most Common Failures
1) **Live WS disabled**
   - Symptom: the run refuses with `CODE_<X>`.
   - Fix: set `ENABLED=1`.

2) **Budget stops**
   - Symptom: stop reason `BUDGET`.
   - Fix: read the audit.

## Canary
- `node canary.js` ![diagram](http://example.invalid/x.png)

## Safety
- `Restart=on-failure`
"""
LINES = {"kill-switch": 3, "failure:live-ws-disabled": 7, "failure:budget-stops": 11, "canary": 15, "safety": 18}


# -- reading the page in Chromium --------------------------------------------------------------------------------


def chromium(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    assert BROWSER, "headless Chromium is not installed"
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([BROWSER, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


def dump_dom(page: Path, fragment: str = "") -> str:
    """The page's DOM after its script ran, opened from disk (file://)."""
    done = chromium("--virtual-time-budget=3000", "--dump-dom", page.resolve().as_uri() + fragment)
    assert done.returncode == 0 and "</html>" in done.stdout, done.stderr[-2000:]
    return done.stdout


def screenshot(page: Path, png: Path) -> None:
    chromium(f"--screenshot={png}", "--window-size=1280,2400", page.resolve().as_uri())
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"Chromium wrote no PNG at {png}"


def verdicts(dom: str) -> dict[str, str]:
    """item id -> the outcome its line shows in the runbook (the rows beyond the runbook excluded)."""
    runbook_part = dom.split('<main class="runbook">', 1)[1].split("</main>", 1)[0]
    return dict(VERDICT.findall(runbook_part))


def assert_page_shows(page: Path, expected: dict[str, str], unfold: str) -> str:
    """Opens the page from disk with `#evidence-<unfold>`: every item shows its expected outcome, and that item's
    evidence, folded in the file, is open in the browser. Returns the unfolded block."""
    element_id = f"evidence-{slug(unfold)}"
    dom = dump_dom(page, f"#{element_id}")
    assert verdicts(dom) == expected, f"{page}: the outcomes shown differ from the expected ones"
    assert 'open=""' not in details(page.read_text(), element_id), f"{page}: the file has {element_id} open already"
    unfolded = details(dom, element_id)
    assert 'open=""' in unfolded, f"{page}: the script did not open the evidence named in the URL fragment"
    return unfolded


def details(dom: str, element_id: str) -> str:
    match = re.search(rf'<details[^>]*id="{re.escape(element_id)}"[^>]*>.*?</details>', dom, re.S)
    assert match, f"no <details id={element_id}> in the page"
    return match.group(0)


# -- the renderer ------------------------------------------------------------------------------------------------


def step(kind: str, description: str, started: float, took: float, ok: bool | None, **evidence: Any) -> dict[str, Any]:
    return {"kind": kind, "description": description, "started_s": started, "duration_s": took, "ok": ok,
            "evidence": evidence}


def row(item_id: str, outcome: str, message: str = "", **extra: Any) -> dict[str, Any]:
    return {"id": item_id, "section": "s", "title": item_id.split(":")[-1], "line": LINES[item_id], "outcome": outcome,
            "message": message, "time_to_detect_s": None, "time_to_recover_s": None, "measurements": {},
            "tests": [{"nodeid": f"t.py::test_{item_id.split(':')[-1]}", "outcome": outcome, "message": message}],
            "findings": [], "deviations": [], "drift": [], **extra}


def small_summary() -> tuple[dict[str, Any], dict[str, Any]]:
    drift = {"kind": "code", "item": "canary", "runbook": "node canary.js", "system": "no such file <canary.js>",
             "line": 16}
    deviation = {"phase": "symptom", "says": "Symptom: the run refuses with `CODE_<X>`.",
                 "seen": "the journal lacks CODE_<X>", "line": 8}
    finding = {"title": "half-written <archive>", "detail": "2 objects of 5", "severity": "defect",
               "source": {"line": 8, "text": "   - Symptom: ..."}}
    items = [row("kill-switch", "pass", time_to_detect_s=0.3),
             row("failure:live-ws-disabled", "fail", "runbook line 8 says <this>; the system: that",
                 time_to_detect_s=None, time_to_recover_s=4.9, deviations=[deviation], findings=[finding]),
             row("failure:budget-stops", "blocked", "[blocked] steady state not reached"),
             row("canary", "drift", drift=[drift]),
             row("safety", "error", "[error] the harness broke")]
    summary = {"target": "/t<arget>", "runbook": "/t/docs/runbook.md", "started_at": "2026-12-04T20:00:00+00:00",
               "duration_s": 12.5, "items": items, "drift": [drift], "exit_code": 3,
               "totals": {"pass": 1, "fail": 1, "drift": 1, "blocked": 1, "error": 1},
               "beyond": [{"id": "beyond:target-secrets", "title": "Secrets", "outcome": "fail", "message": "1 defect",
                           "tests": [], "findings": [{"name": "n", "title": "token in spool", "detail": "d",
                                                      "severity": "defect", "accepted": None}]}]}
    journal = {"deviations": [deviation], "findings": [finding], "steps": [
        step("steady_state", "canary passes", 0.0, 2.0, True, seen="canary PASS"),
        step("fault", "CORE_LIVE_WS_ENABLED=0", 2.0, 0.1, True),
        step("symptom", "refuses with CODE_<X>", 2.1, 20.0, False, seen="the journal lacks CODE_<X>",
             lines=["<script>alert(1)</script>"]),
        step("fix", "ENABLED=1", 22.1, 0.2, True),
        step("recovery", "connects", 22.3, 4.6, True, seen="1 new connection"),
    ]}
    return summary, {"t.py::test_live-ws-disabled": journal}


ALL_ITEMS = [(item_id, item_id, line) for item_id, line in LINES.items()] + [("not-selected", "Not selected", 16)]


def test_every_outcome_marks_its_line_and_an_item_not_run_says_so() -> None:
    summary, journals = small_summary()
    page = render(summary, journals, RUNBOOK, ALL_ITEMS, "abc1234")
    shown = dict(VERDICT.findall(page.split('<main class="runbook">')[1].split("</main>")[0]))
    assert shown == {"kill-switch": "pass", "failure:live-ws-disabled": "fail", "failure:budget-stops": "blocked",
                     "canary": "drift", "safety": "error", "not-selected": NOT_RUN}
    for item_id, line in LINES.items():  # each note sits under the block its line opens, in the runbook's order
        assert page.index(f'id="line-{line}"') < page.index(f'data-item="{item_id}" data-outcome=')
    assert page.index("Kill-Switch</h2>") < page.index("Most Common Failures</h2>") < page.index("Canary</h2>")
    assert "abc1234" in page and "1 pass" in page and "1 not run" in page and "beyond:target-secrets" in page
    assert "detect 0.30 s" in page and "recover 4.90 s" in page


def test_everything_is_escaped_and_nothing_is_fetched() -> None:
    summary, journals = small_summary()
    page = render(summary, journals, RUNBOOK, ALL_ITEMS, None)
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>raw</b>" not in page and "&lt;b&gt;raw&lt;/b&gt;" in page  # the runbook's raw HTML is text
    assert "/t&lt;arget&gt;" in page and "CODE_&lt;X&gt;" in page and "<this>" not in page
    assert not re.search(r"<(img|link|iframe)\b|\bsrc=", page), "the page fetches nothing"
    assert "[image: diagram]" in page and "default-src 'none'" in page
    assert page.count("<script>") == 1  # the page's own, tiny one


def test_a_finding_sits_on_its_line_with_its_severity_and_a_deviation_is_spelled_out() -> None:
    summary, journals = small_summary()
    page = render(summary, journals, RUNBOOK, ALL_ITEMS, None)
    finding = page.index('<div class="finding defect" data-severity="defect">')
    assert page.index("Symptom: the run refuses with") < finding < page.index("Fix: set")  # under line 8, not 7
    assert "half-written &lt;archive&gt;</b>: 2 objects of 5" in page
    assert ("runbook line 8 says Symptom: the run refuses with `CODE_&lt;X&gt;`.; "
            "the system: the journal lacks CODE_&lt;X&gt;") in page


def test_drift_shows_the_runbooks_value_beside_the_systems() -> None:
    summary, journals = small_summary()
    page = render(summary, journals, RUNBOOK, ALL_ITEMS, None)
    assert ("<tr><td>canary</td><td><code>node canary.js</code></td><td>no such file &lt;canary.js&gt;</td></tr>"
            in page)
    assert page.index('id="line-16"') < page.index('<table class="drift"')


def test_the_timeline_has_fault_detection_fix_and_recovery_from_the_journal_steps() -> None:
    summary, journals = small_summary()
    steps = journals["t.py::test_live-ws-disabled"]["steps"]
    found = moments(steps)
    assert found["detected"] is None, "a symptom that did not hold was never detected"
    assert (found["fault"], found["fix"], found["recovered"]) == pytest.approx((2.1, 22.3, 26.9))
    page = render(summary, journals, RUNBOOK, ALL_ITEMS, None)
    timeline = page.split('<table class="timeline">')[1].split("</table>")[0]
    assert "2.10 s" in timeline and "never held" in timeline and "26.90 s" in timeline
    assert 'href="#evidence-failure-live-ws-disabled"' in timeline


def test_an_item_whose_line_is_no_block_is_still_listed(tmp_path: Path) -> None:
    summary, journals = small_summary()
    page = render(summary, journals, RUNBOOK, [*ALL_ITEMS, ("moved", "Moved", 99)], None)
    assert page.index("Items not found at their line") < page.index('data-item="moved"')
    assert "could not be read" in render(summary, journals, None, ALL_ITEMS, None)


def test_the_commit_is_given_only_for_a_git_checkout(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True, timeout=30)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True, timeout=30)
    commit = git_commit(tmp_path)
    assert commit and re.fullmatch(r"[0-9a-f]{7,}", commit)
    (tmp_path / "sub").mkdir()
    assert f"(of the enclosing repository {tmp_path.resolve()})" in str(git_commit(tmp_path / "sub"))


def test_write_lists_every_item_of_the_real_runbook(tmp_path: Path) -> None:
    runbook = TWIN_ROOT / "docs" / "runbook.md"
    summary, _ = small_summary()
    summary.update(runbook=str(runbook), target=str(tmp_path), items=[], drift=[], beyond=[])
    page = write_annotated(tmp_path, summary, {}, runbook).read_text()
    ids = [item.id for item in load_runbook(runbook).items()]
    shown = dict(VERDICT.findall(page))
    assert list(shown) == ids and set(shown.values()) == {NOT_RUN}  # in the runbook's order
    assert "<dt>commit</dt>" not in page  # tmp_path is no git checkout


# -- the Done when: a real run against the twin, opened from disk ------------------------------------------------


@needs_chromium
def test_a_run_against_the_twin_writes_a_page_chromium_opens_from_disk(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    only = [arg for item in RUN_ITEMS for arg in ("--only", item)]
    done = subprocess.run([CLI, "run", *only, "-n", "1", "--reports", str(reports)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    page = reports / RUNBOOK_HTML
    summary = json.loads((reports / "summary.json").read_text())
    expected = {item.id: NOT_RUN for item in load_runbook(summary["runbook"]).items()}
    expected.update({row["id"]: row["outcome"] for row in summary["items"]})
    assert set(RUN_ITEMS) <= {row["id"] for row in summary["items"]}

    unfolded = assert_page_shows(page, expected, "failure:live-ws-disabled")
    assert "test_live_ws_disabled" in unfolded and "CORE_LIVE_WS_DISABLED" in unfolded
    assert "<td>symptom</td>" in unfolded and "<td>recovery</td>" in unfolded

    screenshot(page, reports / "runbook.png")
    KEPT.mkdir(parents=True, exist_ok=True)
    for name in (RUNBOOK_HTML, "runbook.png"):
        shutil.copy2(reports / name, KEPT / name)
