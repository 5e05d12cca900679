"""`quantlab-chaos remedy`: proposals from a run's reports (or the static check alone), written to reports/remedy/,
and with --verify proven by a rerun on copies.

Exit codes: without --verify 0 once written; with it 0 when every proposal is verified, 1 when any is not verified or
not applicable, 3 when the rerun itself failed (the harness's error); 2 on bad input.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.annotated import JOURNALS_JSON, write_annotated
from harness.drift import check_drift, scenario_items
from harness.outcomes import ERROR, EXIT_CODES
from harness.remedy import report
from harness.remedy.model import NOT_RUN, VERIFIED, Remedy
from harness.remedy.propose import propose
from harness.remedy.verify import judge, not_run, rerun
from harness.reporting import SUMMARY_JSON, SUMMARY_MD
from harness.summary_markdown import markdown as summary_markdown
from harness.target import Target
from quantlab_chaos.errors import ConfigError
from quantlab_chaos.runbook import load_runbook

STATIC = "the static check of the runbook against the checkout (no run's reports: pass --from REPORTS for the items' outcomes)"


def remedy(*, quantlab_root: str | None, runbook: str | None, from_dir: Path | None, out_dir: Path | None,
           verify: bool, run_options: Mapping[str, Any], default_reports: Path) -> int:
    target = Target.load(quantlab_root, runbook)
    model = load_runbook(target.runbook)
    summary = _read_summary(from_dir, target) if from_dir else None
    rows = summary["items"] if summary else None
    drift = [entry.to_dict() for entry in check_drift(model, target, scenario_items())]
    source = (f"the run in {from_dir} ({summary.get('started_at', '?')}) and the static check" if summary else STATIC)
    found = propose(model, target, drift, rows, source)
    out = out_dir or (from_dir or default_reports) / report.REMEDY_DIR
    report.write(out, found, rows)
    code = 0
    if verify and found.proposals:
        code = _verify(found, target, out, rows, run_options)
        report.write(out, found, rows, keep_verify=True)
    _render(found, summary, from_dir, out, model.path)
    _print(found, out, verify)
    return code


def _verify(found: Remedy, target: Target, out: Path, rows: list[dict[str, Any]] | None,
            run_options: Mapping[str, Any]) -> int:
    code, after = rerun(found, target, out, run_options)
    found.verified_with = str(out / report.VERIFY_DIR / "reports")
    if after is None:
        not_run(found, f"the rerun wrote no summary (exit {code}): the harness failed; see its output above")
        return EXIT_CODES[ERROR]
    judge(found, rows, after)
    if code == EXIT_CODES[ERROR]:
        return code
    return 0 if all(p.verification.status == VERIFIED for p in found.proposals) else 1


def _read_summary(from_dir: Path, target: Target) -> dict[str, Any]:
    path = from_dir / SUMMARY_JSON if from_dir.is_dir() else from_dir
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--from {from_dir}: {path} cannot be read as a run's summary ({exc}); pass the reports "
                          "folder of a `quantlab-chaos run` (it holds summary.json).") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("items"), list):
        raise ConfigError(f"--from {from_dir}: {path} has no items list; pass the reports folder of a "
                          "`quantlab-chaos run`.")
    ran_on = Path(str(summary.get("target", ""))).resolve()
    if ran_on != target.root:
        raise ConfigError(f"--from {from_dir}: that run was against {ran_on}, not {target.root}; pass "
                          f"--quantlab-root {ran_on}, or run the chaos suite against this checkout first.")
    return summary


def _render(found: Remedy, summary: dict[str, Any] | None, from_dir: Path | None, out: Path, runbook: Path) -> None:
    """The annotated runbook with the proposals on their lines: the run's own page (and summary) brought up to date
    when the remedy was drawn from a run, else a page of the remedy's own."""
    block = found.to_dict()
    if summary is not None and from_dir is not None and from_dir.is_dir():
        summary["remedy"] = block
        journals_path = from_dir / JOURNALS_JSON
        journals = json.loads(journals_path.read_text()) if journals_path.is_file() else {}
        (from_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (from_dir / SUMMARY_MD).write_text(summary_markdown(summary))
        write_annotated(from_dir, summary, journals, runbook)
        return
    page = {"target": found.target, "runbook": found.runbook, "items": [], "drift": [], "remedy": block}
    write_annotated(out, page, {}, runbook)


def _print(found: Remedy, out: Path, verified: bool) -> None:
    print(f"quantlab-chaos remedy: {len(found.proposals)} proposal(s), {len(found.unproposed)} item(s) or mismatch(es) "
          f"with nothing to propose; written to {out}")
    for proposal in found.proposals:
        status = proposal.verification.status if verified else NOT_RUN
        print(f"  {status.upper():<14} {proposal.id}: {proposal.title}")
        if verified:
            print(f"  {'':<14} {proposal.verification.why}")
    print(f"REMEDY.md: {out / report.REMEDY_MD}")
