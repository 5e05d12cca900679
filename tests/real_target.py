"""The real QuantLab snapshots in ../shared/targets/: preparing one, running the chaos suite on it, and judging the
harness's verdicts against an expectations file.

An expectations file, `tests/expectations/<archive name without .tar.gz>.json`, says what the harness must
conclude about that snapshot, item by item:

    {"archive": "<archive file name>", "notes": "<optional>",
     "items": {"<runbook item id>": {"outcome": "pass|fail|drift|blocked",
                                      "phrase": "<words the item's message contains, any case; \"\": none>",
                                      "why": "<the reason, from runs and from reading the checkout's code>"}}}

`error` is never expected: it means the harness itself failed, so it is always a difference.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
TARGETS = PROJECT.parent / "shared" / "targets"
PREPARE_TOOL = PROJECT / "tools" / "prepare_target.py"
EXPECTATIONS_DIR = PROJECT / "tests" / "expectations"
REPORT_COPIES = PROJECT / "reports" / "real-target"

EXPECTED_OUTCOMES = ("pass", "fail", "drift", "blocked")
ITEM_KEYS = {"outcome", "phrase", "why"}
TOP_KEYS = {"archive", "notes", "items", "remedy"}
REMEDY_KEYS = {"verification", "why"}
VERIFICATIONS = ("verified", "not verified", "not applicable")
PREPARE_TIMEOUT_S = 1800.0  # unpacking plus npm ci in each folder of the checkout (each one has 900 s)
RUN_TIMEOUT_S = 900.0
STOP_GRACE_S = 30.0
MESSAGE_WIDTH = 300


class ExpectationsError(ValueError):
    """The expectations file is malformed; the message says what is wrong in one sentence."""


@dataclass(frozen=True)
class Difference:
    """One runbook item on which the harness's verdict differs from the expectations."""

    item: str
    problem: str
    expected_outcome: str = ""
    expected_phrase: str = ""
    got_outcome: str = ""
    got_message: str = ""


def archives() -> list[Path]:
    return sorted(TARGETS.glob("*.tar.gz")) if TARGETS.is_dir() else []


def archive_name(archive: Path) -> str:
    return archive.name.removesuffix(".tar.gz")


def expectations_path(archive: Path) -> Path:
    return EXPECTATIONS_DIR / f"{archive_name(archive)}.json"


def load_expectations(path: Path, archive_file: str | None = None) -> dict[str, Any]:
    """The expectations file, validated; ExpectationsError (one sentence) when it is malformed."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ExpectationsError(f"{path} cannot be read ({exc.strerror or exc}).") from None
    except ValueError as exc:
        raise ExpectationsError(f"{path} is not valid JSON ({exc}).") from None
    validate_expectations(data, str(path), archive_file)
    assert isinstance(data, dict)  # validate_expectations refuses anything but an object
    return data


def validate_expectations(data: Any, where: str, archive_file: str | None = None) -> None:
    def bad(what: str) -> ExpectationsError:
        return ExpectationsError(f"{where}: {what}.")

    if not isinstance(data, dict):
        raise bad(f"the top level must be an object with {sorted(TOP_KEYS)}, not {type(data).__name__}")
    if unknown := sorted(set(data) - TOP_KEYS):
        raise bad(f"unknown top-level key(s) {unknown}; the keys are {sorted(TOP_KEYS)}")
    if not isinstance(data.get("archive"), str) or not data["archive"]:
        raise bad('"archive" must be the archive\'s file name, as a string')
    if archive_file is not None and data["archive"] != archive_file:
        raise bad(f'"archive" says {data["archive"]!r} but this file is for {archive_file!r}')
    if not isinstance(data.get("notes", ""), str):
        raise bad('"notes" must be a string')
    items = data.get("items")
    if not isinstance(items, dict) or not items:
        raise bad('"items" must be a non-empty object mapping each runbook item id to its expectation')
    for item, expected in items.items():
        if not isinstance(expected, dict):
            raise bad(f'item {item!r} must be an object with "outcome", "phrase" and "why"')
        if missing := sorted(ITEM_KEYS - set(expected)):
            raise bad(f"item {item!r} lacks {missing}")
        if unknown := sorted(set(expected) - ITEM_KEYS):
            raise bad(f"item {item!r} has unknown key(s) {unknown}; an item has only {sorted(ITEM_KEYS)}")
        if expected["outcome"] not in EXPECTED_OUTCOMES:
            raise bad(f"item {item!r} expects the outcome {expected['outcome']!r}, which is not one of "
                      f"{', '.join(EXPECTED_OUTCOMES)} (error is never expected)")
        if not isinstance(expected["phrase"], str) or (expected["phrase"] and not expected["phrase"].strip()):
            raise bad(f"item {item!r} needs a string of words as 'phrase' (\"\" when its message may be empty)")
        if not isinstance(expected["why"], str) or not expected["why"].strip():
            raise bad(f"item {item!r} needs a non-empty string as 'why'")
    remedy = data.get("remedy", {})
    if not isinstance(remedy, dict):
        raise bad('"remedy" must be an object mapping each proposal id to {"verification", "why"}')
    for proposal, expected in remedy.items():
        if not isinstance(expected, dict) or set(expected) != REMEDY_KEYS:
            raise bad(f"remedy proposal {proposal!r} must be an object with exactly {sorted(REMEDY_KEYS)}")
        if expected["verification"] not in VERIFICATIONS:
            raise bad(f"remedy proposal {proposal!r} expects {expected['verification']!r}, which is not one of "
                      f"{', '.join(VERIFICATIONS)}")
        if not isinstance(expected["why"], str) or not expected["why"].strip():
            raise bad(f"remedy proposal {proposal!r} needs a non-empty string as 'why'")


def compare_remedy(expected: dict[str, Any], remedy: dict[str, Any]) -> list[Difference]:
    """Every difference between the expected proposals and their verifications and `remedy --verify`'s remedy.json:
    a proposal missing, one not expected, another verification, or one without its reason."""
    want = expected.get("remedy", {})
    got = {p["id"]: p for p in remedy.get("proposals", [])}
    differences = []
    for proposal, expectation in want.items():
        found = got.get(proposal)
        if found is None:
            differences.append(Difference(proposal, "proposal missing from remedy.json", expectation["verification"]))
            continue
        status, why = found["verification"]["status"], found["verification"]["why"]
        if status != expectation["verification"] or not why.strip():
            differences.append(Difference(proposal, "verification differs" if why.strip() else "no reason given",
                                          expectation["verification"], "", status, why))
    differences += [Difference(proposal, "proposal not in the expectations file", "", "",
                               got[proposal]["verification"]["status"], got[proposal]["title"])
                    for proposal in got if proposal not in want]
    return differences


def compare(expected: dict[str, Any], summary: dict[str, Any]) -> list[Difference]:
    """Every difference between the expectations and a run's summary.json, summary items first, in their order."""
    rows = summary.get("items") if isinstance(summary, dict) else None
    if not isinstance(rows, list):
        return [Difference("(summary)", 'summary.json has no "items" list')]
    wanted: dict[str, dict[str, str]] = expected["items"]
    differences, seen = [], set()
    for row in rows:
        item = str(row.get("id")) if isinstance(row, dict) else "(summary)"
        if not isinstance(row, dict) or "id" not in row:
            differences.append(Difference(item, f"a row of summary.json has no id: {row!r}"[:MESSAGE_WIDTH]))
            continue
        if item in seen:
            differences.append(Difference(item, "listed more than once in summary.json"))
            continue
        seen.add(item)
        if problem := judge(wanted.get(item), row):
            want = wanted.get(item, {})
            differences.append(Difference(item, problem, want.get("outcome", ""), want.get("phrase", ""),
                                          got_outcome(row), str(row.get("message") or "")))
    for item, want in wanted.items():
        if item not in seen:
            differences.append(Difference(item, "missing from summary.json", want["outcome"], want["phrase"]))
    return differences


def judge(want: dict[str, str] | None, row: dict[str, Any]) -> str:
    """Why this summary row does not meet its expectation ("" when it does)."""
    outcome, message = row.get("outcome"), str(row.get("message") or "")
    if outcome == "error":
        return "the harness itself failed on this item (outcome error)"
    if want is None:
        return "not in the expectations file"
    problems = []
    if outcome != want["outcome"]:
        problems.append("outcome differs" if "outcome" in row else 'the row has no "outcome"')
    if want["phrase"].casefold() not in message.casefold():
        problems.append("message lacks the phrase")
    return "; ".join(problems)


def got_outcome(row: dict[str, Any]) -> str:
    if "outcome" in row:
        return str(row["outcome"])
    return f"(none; status={row['status']})" if "status" in row else "(none)"


def format_differences(differences: list[Difference], title: str) -> str:
    """A readable table of every difference, for one assertion message."""
    header = ("item", "problem", "expected", "got", "got message")
    rows = [(d.item, d.problem, f"{d.expected_outcome}: {d.expected_phrase!r}" if d.expected_outcome else "-",
             d.got_outcome or "-", clip(d.got_message) or "-") for d in differences]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]

    def line(cells: tuple[str, ...]) -> str:
        return " | ".join([*(cell.ljust(width) for cell, width in zip(cells, widths, strict=False)), cells[-1]])

    rule = "-+-".join(["-" * width for width in widths] + ["-" * len(header[-1])])
    return "\n".join([f"{title}: {len(differences)} difference(s)", line(header), rule, *map(line, rows)])


def clip(text: str, width: int = MESSAGE_WIDTH) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def summary_table(summary: dict[str, Any]) -> str:
    """What the run concluded, item by item (for writing an expectations file from a run)."""
    rows = [row for row in summary.get("items", []) if isinstance(row, dict)]
    return "\n".join(f"{row.get('id')}: {got_outcome(row)}: {clip(str(row.get('message') or ''))}" for row in rows)


# -- preparing and running ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finished:
    """A command that ran to its end (or to its deadline), with its output."""

    argv: list[str]
    code: int | None  # None: stopped at the deadline
    stdout: str
    stderr: str

    def tail(self, chars: int = 4000) -> str:
        return (f"$ {' '.join(self.argv)}\nexit: {'timed out' if self.code is None else self.code}\n"
                f"--- stdout (tail)\n{self.stdout[-chars:]}\n--- stderr (tail)\n{self.stderr[-chars:]}")


def run_with_deadline(argv: list[str], timeout_s: float, log_dir: Path, cwd: Path = PROJECT) -> Finished:
    """Runs argv in its own session with output in files (a long run's output would fill a pipe); at the deadline
    SIGTERM lets it clean up (the harness stops its services on it), then SIGKILL ends the group."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    with out_path.open("w") as out, err_path.open("w") as err:
        process = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            code: int | None = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
            _stop(process)
        except BaseException:  # this test interrupted: never leave the run behind
            _stop(process)
            raise
    return Finished(argv, code, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"))


def _stop(process: subprocess.Popen[str]) -> None:
    try:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=STOP_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def prepare(archive: Path, log_dir: Path) -> tuple[Path | None, Finished]:
    """The prepared checkout of `archive` (tools/prepare_target.py --print-root), or None with the tool's output."""
    done = run_with_deadline([sys.executable, str(PREPARE_TOOL), "--print-root", "--archive", str(archive)],
                             PREPARE_TIMEOUT_S, log_dir)
    root = done.stdout.strip()
    return (Path(root) if done.code == 0 and root else None), done


def chaos_run(root: Path, reports: Path, log_dir: Path) -> Finished:
    """The whole chaos suite against the checkout, as `quantlab-chaos run` (harness.cli) runs it."""
    argv = [sys.executable, "-m", "harness.cli", "run", "--quantlab-root", str(root), "--reports", str(reports),
            "-n", "2"]
    return run_with_deadline(argv, RUN_TIMEOUT_S, log_dir)


def remedy_verify(root: Path, reports: Path, log_dir: Path) -> Finished:
    """`quantlab-chaos remedy --from REPORTS --verify` on the checkout the run was against."""
    argv = [sys.executable, "-m", "harness.cli", "remedy", "--quantlab-root", str(root), "--from", str(reports),
            "--verify", "-n", "2"]
    return run_with_deadline(argv, RUN_TIMEOUT_S, log_dir)


def report_copy_dir(archive: Path) -> Path:
    """reports/real-target/, or a folder per archive there when ../shared/targets/ holds several."""
    return REPORT_COPIES if len(archives()) <= 1 else REPORT_COPIES / archive_name(archive)


def keep_reports(reports: Path, archive: Path) -> Path:
    """Copies the run's summary.json and summary.md where a person finds them after `make test`."""
    dest = report_copy_dir(archive)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "summary.md", "remedy/REMEDY.md", "remedy/remedy.json", "remedy/runbook.patch"):
        (dest / name).unlink(missing_ok=True)
        if (reports / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(reports / name, dest / name)
    return dest
