"""The shared core of quantlab-chaos: what the harness and the production canary both need, and nothing else.

It imports neither `harness` nor `canary` and has no dependency beyond the canary's own (markdown-it-py for the
runbook), so the canary's install carries it. What lives here: the runbook items' vocabulary (`items`), the runbook
as a typed model (`runbook`), systemd's environment-file rules (`envfile`), the errors a user can cause (`errors`),
redaction of secrets (`redact`), stopping a process group (`procgroup`) and polling with a deadline (`waiting`).
"""
