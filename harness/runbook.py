"""The runbook as a typed model, parsed with markdown-it-py.

Sections are recognised by what their headings say (not by position), failures by their words and the
identifiers in them (not by their number), so reordered sections, extra prose and renumbering parse the same.
Every extracted value keeps the runbook line it came from, so a failing check can quote it.
"""
from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode

from quantlab_chaos.errors import ConfigError

# Section kinds, tested in this order against the heading text (first match wins).
SECTION_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("kill_switch", re.compile(r"kill[- ]?switch", re.I)),
    ("safety_defaults", re.compile(r"safety|defaults|limits", re.I)),
    ("failures", re.compile(r"fail", re.I)),
    ("break_glass", re.compile(r"break[- ]?glass|emergency", re.I)),
    ("canary", re.compile(r"canary", re.I)),
    ("health_checks", re.compile(r"health|self[- ]?test", re.I)),
    ("start_stop", re.compile(r"start|stop|systemd|services", re.I)),
)

# The runbook's failures, recognised by title words or the identifiers they name. A failure no recogniser
# matches still parses (its id is a slug of its title) and shows up as drift: an item with no scenario.
FAILURE_RECOGNISERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("s3-archive-unreachable", re.compile(r"s3.*(unreachable|down|unavailable)|RUN_ARCHIVE_S3_", re.I)),
    ("observer-unauthorized", re.compile(r"unauthori[sz]ed|\b401\b", re.I)),
    ("live-ws-disabled", re.compile(r"live\s*ws.*disabled|CORE_LIVE_WS_DISABLED", re.I)),
    ("budget-guard-stops", re.compile(r"budget|guard|BUDGET_EXCEEDED|PROMOTION_GUARD_FAIL", re.I)),
    ("archive-missing", re.compile(r"archive.*missing|missing.*archive|archive check", re.I)),
)
BREAK_GLASS_RECOGNISERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("stop-live-runs", re.compile(r"stop.*run", re.I)),
    ("rotate-observer-token", re.compile(r"rotate|token", re.I)),
    ("disable-live-ws", re.compile(r"disable.*(ws|ingest)|CORE_LIVE_WS_ENABLED=0", re.I)),
)

ENV_ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*)=(\S*)$")
UPPER_NAME = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+_?\*?$")
HTTP_STATUS = re.compile(r"(?<![\w./:-])([1-5]\d\d)(?![\w/:-]|\.\w)")
UNIT_NAME = re.compile(r"[\w.@-]+\.(?:service|timer|socket|target)")
ENV_REFERENCE = re.compile(r"\$\{?([A-Z][A-Z0-9_]*)\}?")


@dataclass(frozen=True)
class Source:
    """Where a value stands in the runbook (1-based line) and that line's text, for messages."""

    line: int
    text: str

    def __str__(self) -> str:
        return f"runbook line {self.line}: {self.text.strip()}"


@dataclass(frozen=True)
class Identifiers:
    """The identifiers inside a piece of runbook text."""

    env_names: tuple[str, ...] = ()
    env_values: tuple[tuple[str, str], ...] = ()
    codes: tuple[str, ...] = ()
    http_statuses: tuple[int, ...] = ()
    ports: tuple[int, ...] = ()
    paths: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    other_literals: tuple[str, ...] = ()

    def env(self) -> dict[str, str]:
        return dict(self.env_values)


@dataclass(frozen=True)
class SystemctlCommand:
    action: str
    unit: str
    sudo: bool
    text: str
    source: Source


@dataclass(frozen=True)
class HttpRequest:
    """A curl command from the runbook as method, URL and headers."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    text: str
    source: Source

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def path(self) -> str:
        parts = urlsplit(self.url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def url_for(self, base_url: str, **placeholders: str) -> str:
        """The URL with host and port replaced by `base_url`, and `<name>` placeholders filled in."""
        path = self.path
        for name, value in placeholders.items():
            path = path.replace(f"<{name}>", value)
        return base_url.rstrip("/") + path

    def header_values(self, env: Mapping[str, str]) -> dict[str, str]:
        """Headers with `$VAR` references expanded from `env` (missing variables expand to empty, as in a shell)."""
        return {name: ENV_REFERENCE.sub(lambda m: env.get(m.group(1), ""), value) for name, value in self.headers}

    def placeholders(self) -> list[str]:
        return re.findall(r"<([a-z_]+)>", self.path)


@dataclass(frozen=True)
class ShellCommand:
    text: str
    argv: tuple[str, ...]
    source: Source


@dataclass(frozen=True)
class Failure:
    id: str
    number: int | None
    title: str
    symptom: str
    fix: str
    symptom_ids: Identifiers
    fix_ids: Identifiers
    source: Source
    symptom_source: Source
    fix_source: Source


@dataclass(frozen=True)
class BreakGlassStep:
    id: str
    title: str
    text: str
    ids: Identifiers
    requests: tuple[HttpRequest, ...]
    systemctl: tuple[SystemctlCommand, ...]
    source: Source


@dataclass(frozen=True)
class Setting:
    """A `NAME=value` the runbook prescribes (a unit directive or an env limit)."""

    name: str
    value: str
    source: Source


@dataclass(frozen=True)
class RunbookItem:
    """One provable thing in the runbook: scenarios are tagged with these ids."""

    id: str
    section: str
    title: str
    source: Source


@dataclass
class Runbook:
    path: Path
    title: str
    sections: list[tuple[str, str, Source]] = field(default_factory=list)  # (kind, heading, source)
    unit_files: list[tuple[str, Source]] = field(default_factory=list)
    systemctl: list[SystemctlCommand] = field(default_factory=list)
    health_checks: list[HttpRequest] = field(default_factory=list)
    self_tests: list[ShellCommand] = field(default_factory=list)
    kill_switch: HttpRequest | None = None
    canary: ShellCommand | None = None
    canary_expected: list[tuple[str, Source]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    break_glass: list[BreakGlassStep] = field(default_factory=list)
    unit_directives: list[Setting] = field(default_factory=list)
    env_limits: list[Setting] = field(default_factory=list)
    unknown_sections: list[tuple[str, Source]] = field(default_factory=list)

    # lookups used by scenarios
    def failure(self, failure_id: str) -> Failure:
        for failure in self.failures:
            if failure.id == failure_id:
                return failure
        raise KeyError(f"the runbook {self.path} has no failure '{failure_id}' (it has: {[f.id for f in self.failures]})")

    def break_glass_step(self, step_id: str) -> BreakGlassStep:
        for step in self.break_glass:
            if step.id == step_id:
                return step
        raise KeyError(f"the runbook {self.path} has no break-glass step '{step_id}'")

    def section_source(self, kind: str) -> Source:
        for section_kind, _, source in self.sections:
            if section_kind == kind:
                return source
        raise KeyError(f"the runbook {self.path} has no {kind} section")

    def unit_directive(self, name: str) -> Setting:
        return _find_setting(self.unit_directives, name, self.path)

    def env_limit(self, name: str) -> Setting:
        return _find_setting(self.env_limits, name, self.path)

    def unit_names(self) -> list[str]:
        return [Path(path).name for path, _ in self.unit_files]

    def items(self) -> list[RunbookItem]:
        """Every item a scenario must prove, in runbook order."""
        items: list[RunbookItem] = []
        for kind, heading, source in self.sections:
            if kind == "failures":
                items += [RunbookItem(f"failure:{f.id}", heading, f.title, f.source) for f in self.failures]
            elif kind == "break_glass":
                items += [RunbookItem(f"break-glass:{s.id}", heading, s.title, s.source) for s in self.break_glass]
            elif kind == "health_checks":
                if self.health_checks:
                    items.append(RunbookItem("health-checks", heading, "Observer API health checks", self.health_checks[0].source))
                if self.self_tests:
                    items.append(RunbookItem("self-test", heading, "Config check and self-test", self.self_tests[0].source))
            else:
                items.append(RunbookItem(kind.replace("_", "-"), heading, heading, source))
        return items

    def item(self, item_id: str) -> RunbookItem:
        for item in self.items():
            if item.id == item_id:
                return item
        raise KeyError(f"the runbook {self.path} has no item '{item_id}'")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["items"] = [asdict(item) for item in self.items()]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def _find_setting(settings: list[Setting], name: str, path: Path) -> Setting:
    for setting in settings:
        if setting.name == name:
            return setting
    raise KeyError(f"the runbook {path} prescribes no {name}")


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
    for kind, pattern in SECTION_PATTERNS:
        if pattern.search(heading):
            return kind
    return None


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
    return before in {"set", "with", "export", "unset", "verify", "check"} or after in {"env", "environment", "variable", "value", "values", "in"}


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
    failure_id = _recognise(FAILURE_RECOGNISERS, f"{title} {symptom}") or _slug(title)
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
            step_id = _recognise(BREAK_GLASS_RECOGNISERS, title) or _slug(title)
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


def _recognise(recognisers: tuple[tuple[str, re.Pattern[str]], ...], text: str) -> str | None:
    for item_id, pattern in recognisers:
        if pattern.search(text):
            return item_id
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "item"
