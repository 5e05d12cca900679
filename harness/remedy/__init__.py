"""Verified remedies: for each mismatch, a change to the runbook's text or a unit drop-in, proven by a rerun.

`propose` draws the proposals, `report.write` writes reports/remedy/, `verify` reruns the affected items on copies,
`command.remedy` is `quantlab-chaos remedy`.
"""
