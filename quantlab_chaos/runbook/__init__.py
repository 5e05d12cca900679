"""The runbook as a typed model (`model`), parsed from its markdown (`parse`): what every check quotes."""
from quantlab_chaos.runbook.model import (
    BreakGlassStep,
    Failure,
    HttpRequest,
    Identifiers,
    Runbook,
    RunbookItem,
    Setting,
    ShellCommand,
    Source,
    SystemctlCommand,
)
from quantlab_chaos.runbook.parse import extract_identifiers, load_runbook, parse_runbook

__all__ = ["BreakGlassStep", "Failure", "HttpRequest", "Identifiers", "Runbook", "RunbookItem", "Setting",
           "ShellCommand", "Source", "SystemctlCommand", "extract_identifiers", "load_runbook", "parse_runbook"]
