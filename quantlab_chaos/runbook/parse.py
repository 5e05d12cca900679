"""Parsing the runbook with markdown-it-py.

Sections are recognised by what their headings say (not by position), failures by their words and the identifiers in
them (not by their number), both through the vocabulary in quantlab_chaos.items, so reordered sections, extra prose and
renumbering parse the same.
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode

from quantlab_chaos import items
from quantlab_chaos.errors import ConfigError
from quantlab_chaos.runbook.model import (
    BreakGlassStep,
    Failure,
    HttpRequest,
    Identifiers,
    Runbook,
    Setting,
    ShellCommand,
    Source,
    SystemctlCommand,
)

ENV_ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*)=(\S*)$")
UPPER_NAME = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+_?\*?$")
HTTP_STATUS = re.compile(r"(?<![\w./:-])([1-5]\d\d)(?![\w/:-]|\.\w)")
UNIT_NAME = re.compile(r"[\w.@-]+\.(?:service|timer|socket|target)")


def load_runbook(path: str | Path) -> Runbook:
    """Parses the runbook at `path`; ConfigError names the file and what is wrong with it."""
    runbook_path = Path(path)
    try:
        text = runbook_path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"The runbook {runbook_path} does not exist; pass --runbook with the runbook's path.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"The runbook {runbook_path} cannot be read ({exc}); it must be a UTF-8 markdown file: "
                          "save it as UTF-8, or pass --runbook with the right file.") from exc
    return parse_runbook(text, runbook_path)


def parse_runbook(text: str, path: Path | str = "<runbook>") -> Runbook:
    lines = text.splitlines()
    tree = SyntaxTreeNode(MarkdownIt("commonmark").parse(text))
    title = ""
    runbook = Runbook(path=Path(path), title="")
    for heading, body in _sections(tree):
        heading_text = _inline_text(heading)
        source = _source(heading, lines)
        if heading.tag == "h1":
            title = title or heading_text
            continue
        kind = _section_kind(heading_text)
        if kind is None:
            runbook.unknown_sections.append((heading_text, source))
            continue
        runbook.sections.append((kind, heading_text, source))
        _PARSERS[kind](runbook, body, lines)
    runbook.title = title
    _require_sections(runbook)
    return runbook


def _require_sections(runbook: Runbook) -> None:
    kinds = {kind for kind, _, _ in runbook.sections}
    if not kinds:
        raise ConfigError(
            f"{runbook.path} has no runbook sections the harness knows (Start / Stop, Health Checks, Kill-Switch, "
            "Canary Validation, Most Common Failures, Break Glass, Safety Defaults) as '## ' headings. Pass --runbook "
            "with QuantLab's runbook (docs/runbook.md in the checkout)."
        )


# --- tree walking -------------------------------------------------------------------------------------------


def _sections(tree: SyntaxTreeNode) -> Iterator[tuple[SyntaxTreeNode, list[SyntaxTreeNode]]]:
    """(heading, blocks until the next heading of the same or higher level) for h1 and h2 headings."""
    current: SyntaxTreeNode | None = None
    body: list[SyntaxTreeNode] = []
    for node in tree.children:
        if node.type == "heading" and node.tag in ("h1", "h2"):
            if current is not None:
                yield current, body
            current, body = node, []
        elif current is not None:
            body.append(node)
    if current is not None:
        yield current, body


def _section_kind(heading: str) -> str | None:
    return items.recognise(items.SECTION_PATTERNS, heading)


def _inline_text(node: SyntaxTreeNode) -> str:
    """The node's text with code spans kept in backticks."""
    parts: list[str] = []
    for child in _walk(node):
        if child.type == "text":
            parts.append(child.content)
        elif child.type == "code_inline":
            parts.append(f"`{child.content}`")
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
    return "".join(parts).strip()


def _walk(node: SyntaxTreeNode) -> Iterator[SyntaxTreeNode]:
    for child in node.children:
        yield child
        if child.type not in ("bullet_list", "ordered_list"):
            yield from _walk(child)


def _code_spans(node: SyntaxTreeNode) -> list[str]:
    return [child.content for child in _walk(node) if child.type == "code_inline"] + [
        line for child in _walk(node) if child.type in ("fence", "code_block") for line in child.content.splitlines() if line.strip()
    ]


def _list_items(blocks: list[SyntaxTreeNode]) -> Iterator[SyntaxTreeNode]:
    """Every list item in the blocks, depth first (nested items after their parent)."""
    for block in blocks:
        if block.type in ("bullet_list", "ordered_list"):
            for item in block.children:
                yield item
                yield from _list_items([c for c in item.children if c.type in ("bullet_list", "ordered_list")])


def _own_text(item: SyntaxTreeNode) -> str:
    """A list item's own paragraph text, without its nested lists."""
    return " ".join(_inline_text(child) for child in item.children if child.type == "paragraph")


def _nested_items(item: SyntaxTreeNode) -> list[SyntaxTreeNode]:
    return [sub for child in item.children if child.type in ("bullet_list", "ordered_list") for sub in child.children]


def _source(node: SyntaxTreeNode, lines: list[str]) -> Source:
    start = node.map[0] if node.map else 0
    return Source(start + 1, lines[start] if start < len(lines) else "")


# --- identifiers --------------------------------------------------------------------------------------------


def extract_identifiers(text: str) -> Identifiers:
    """Env names and values, codes, HTTP statuses, ports, paths, commands and units in a piece of runbook text."""
    spans = re.findall(r"`([^`]+)`", text)
    prose = re.sub(r"`[^`]+`", " ", text)
    env_names: list[str] = []
    env_values: list[tuple[str, str]] = []
    codes: list[str] = []
    paths: list[str] = []
    commands: list[str] = []
    units: list[str] = []
    ports: list[int] = []
    other: list[str] = []
    for span in spans:
        assignment = ENV_ASSIGNMENT.match(span)
        if assignment:
            env_names.append(assignment.group(1))
            env_values.append((assignment.group(1), assignment.group(2)))
        elif UPPER_NAME.match(span):
            (env_names if _names_env(span, text) else codes).append(span)
        elif span.split()[0] in ("sudo", "curl", "node", "systemctl", "npm", "python3"):
            commands.append(span)
            ports += [p for p in (urlsplit(u).port for u in re.findall(r"https?://\S+", span)) if p]
        elif "/" in span and " " not in span:
            paths.append(span)
        else:
            other.append(span)
        units += UNIT_NAME.findall(span)
    statuses = [int(s) for s in HTTP_STATUS.findall(prose)]
    return Identifiers(
        env_names=tuple(dict.fromkeys(env_names)),
        env_values=tuple(env_values),
        codes=tuple(dict.fromkeys(codes)),
        http_statuses=tuple(dict.fromkeys(statuses)),
        ports=tuple(dict.fromkeys(ports)),
        paths=tuple(paths),
        commands=tuple(commands),
        units=tuple(dict.fromkeys(units)),
        other_literals=tuple(other),
    )


def _names_env(name: str, text: str) -> bool:
    """Whether an UPPER_SNAKE name is used as an environment variable in this text (else it is a code)."""
    if name.endswith("*") or name.endswith("_"):
        return True
    around = re.search(rf"(\w+\s+)?(?:the\s+)?(?:new\s+)?`{re.escape(name)}`(\s+\w+)?", text)
    before = (around.group(1) or "").strip().lower() if around else ""
    after = (around.group(2) or "").strip().lower() if around else ""
    return (before in {"set", "with", "export", "unset", "verify", "check"}
            or after in {"env", "environment", "variable", "value", "values", "in"})


# --- section parsers ----------------------------------------------------------------------------------------


def _parse_start_stop(runbook: Runbook, blocks: list[SyntaxTreeNode], lines: list[str]) -> None:
    for item in _list_items(blocks):
        for span in _code_spans(item):
            command = _systemctl(span, _source(item, lines))
            if command is not None:
                runbook.systemctl.append(command)
            elif re.search(r"\.(service|timer)$", span) and "/" in span:
                runbook.unit_files.append((span, _source(item, lines)))


def _parse_health_checks(runbook: Runbook, blocks: list[SyntaxTreeNode], lines: list[str]) -> None:
    for item in _list_items(blocks):
        for span in _code_spans(item):
            request = _curl(span, _source(item, lines))
            if request is not None:
                runbook.health_checks.append(request)
            elif span.startswith("node "):
                runbook.self_tests.append(ShellCommand(span, tuple(shlex.split(span)), _source(item, lines)))


def _parse_kill_switch(runbook: Runbook, blocks: list[SyntaxTreeNode], lines: list[str]) -> None:
    for item in _list_items(blocks):
        for span in _code_spans(item):
            request = _curl(span, _source(item, lines))
            if request is not None and runbook.kill_switch is None:
                runbook.kill_switch = request


def _parse_canary(runbook: Runbook, blocks: list[SyntaxTreeNode], lines: list[str]) -> None:
    for item in _list_items(blocks):
        spans = [s for s in _code_spans(item) if s.startswith("node ")]
        if spans and runbook.canary is None:
            runbook.canary = ShellCommand(spans[0], tuple(shlex.split(spans[0])), _source(item, lines))
        elif not spans:
            runbook.canary_expected.append((_own_text(item), _source(item, lines)))


def _parse_failures(runbook: Runbook, blocks: list[SyntaxTreeNode], lines: list[str]) -> None:
    for block in blocks:
        if block.type not in ("ordered_list", "bullet_list"):
            continue
        start = int(block.attrs.get("start", 1)) if block.type == "ordered_list" else None
        for index, item in enumerate(block.children):
            runbook.failures.append(_failure(item, None if start is None else start + index, lines, runbook.path))


def _failure(item: SyntaxTreeNode, number: int | None, lines: list[str], path: Path) -> Failure:
    title = _own_text(item).replace("**", "").strip()
    symptom = fix = ""
    symptom_source = fix_source = _source(item, lines)
    for sub in _nested_items(item):
        text = _own_text(sub)
        label, _, rest = text.partition(":")
        if label.strip().lower() == "symptom":
            symptom, symptom_source = rest.strip(), _source(sub, lines)
        elif label.strip().lower() == "fix":
            fix, fix_source = rest.strip(), _source(sub, lines)
    if not symptom or not fix:
        missing = "Symptom:" if not symptom else "Fix:"
        raise ConfigError(
            f"{path} line {_source(item, lines).line}: the failure '{title}' has no '{missing}' bullet. Each failure in "
            "'Most Common Failures' needs a '- Symptom: ...' and a '- Fix: ...' sub-bullet."
        )
    failure_id = items.recognise_failure(f"{title} {symptom}") or _slug(title)
    return Failure(
        id=failure_id, number=number, title=title, symptom=symptom, fix=fix,
        symptom_ids=_symptom_identifiers(symptom), fix_ids=extract_identifiers(fix),
        source=_source(item, lines), symptom_source=symptom_source, fix_source=fix_source,
    )


def _symptom_identifiers(text: str) -> Identifiers:
    """In a symptom, every UPPER_SNAKE name in backticks is what the system reports: a code, not an env name."""
    ids = extract_identifiers(text)
    named = set(ids.codes + ids.env_names)
    in_order = [span for span in re.findall(r"`([^`]+)`", text) if span in named]
    return Identifiers(**{**asdict(ids), "env_names": (), "codes": tuple(dict.fromkeys(in_order))})


def _parse_break_glass(runbook: Runbook, blocks: list[SyntaxTreeNode], lines: list[str]) -> None:
    for block in blocks:
        if block.type not in ("bullet_list", "ordered_list"):
            continue
        for item in block.children:
            own = _own_text(item)
            title = own.split(":", 1)[0].strip().rstrip(".")
            whole = " ".join([own] + [_own_text(sub) for sub in _nested_items(item)])
            spans = _code_spans(item) + [s for sub in _nested_items(item) for s in _code_spans(sub)]
            source = _source(item, lines)
            requests = tuple(r for r in (_curl(s, source) for s in spans) if r is not None)
            systemctl = tuple(c for c in (_systemctl(s, source) for s in spans) if c is not None)
            step_id = items.recognise(items.BREAK_GLASS_RECOGNISERS, title) or _slug(title)
            runbook.break_glass.append(BreakGlassStep(step_id, title, whole, extract_identifiers(whole), requests, systemctl, source))


def _parse_safety_defaults(runbook: Runbook, blocks: list[SyntaxTreeNode], lines: list[str]) -> None:
    for item in _list_items(blocks):
        if _nested_items(item):
            continue
        for span in _code_spans(item):
            assignment = ENV_ASSIGNMENT.match(span) or re.match(r"^([A-Z][A-Za-z]+)=(\S+)$", span)
            if not assignment:
                continue
            setting = Setting(assignment.group(1), assignment.group(2), _source(item, lines))
            # Env limits are UPPER_SNAKE; systemd directives are CamelCase.
            (runbook.env_limits if "_" in setting.name and setting.name.isupper() else runbook.unit_directives).append(setting)


_PARSERS = {
    "start_stop": _parse_start_stop,
    "health_checks": _parse_health_checks,
    "kill_switch": _parse_kill_switch,
    "canary": _parse_canary,
    "failures": _parse_failures,
    "break_glass": _parse_break_glass,
    "safety_defaults": _parse_safety_defaults,
}


# --- commands -----------------------------------------------------------------------------------------------


def _systemctl(text: str, source: Source) -> SystemctlCommand | None:
    try:
        argv = shlex.split(text)
    except ValueError:
        return None
    sudo = bool(argv) and argv[0] == "sudo"
    argv = argv[1:] if sudo else argv
    if len(argv) >= 3 and argv[0] == "systemctl":
        return SystemctlCommand(action=argv[1], unit=argv[2], sudo=sudo, text=text, source=source)
    return None


def _curl(text: str, source: Source) -> HttpRequest | None:
    try:
        argv = shlex.split(text, posix=True)
    except ValueError:
        return None
    if not argv or argv[0] != "curl":
        return None
    method, url, headers = "GET", "", []
    args = iter(argv[1:])
    for arg in args:
        if arg in ("-X", "--request"):
            method = next(args, method).upper()
        elif arg in ("-H", "--header"):
            name, _, value = next(args, "").partition(":")
            headers.append((name.strip(), value.strip()))
        elif arg in ("-d", "--data", "--data-raw"):
            next(args, None)
            method = "POST" if method == "GET" else method
        elif not arg.startswith("-"):
            url = arg
    if not url:
        return None
    return HttpRequest(method=method, url=url, headers=tuple(headers), text=text, source=source)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "item"
