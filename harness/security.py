"""Security probes of a target: its observer's auth and rate limits, and every other port its services open.

CONTRACT section 3 is the yardstick. Every `/observer/*` request without `Authorization: Bearer <token>` gets 401
with the observer's body (a token in the query string, a lowercase scheme or a bare token is not that header), and
each client IP and path may send 120 requests a minute, 30 on stop paths, checked before auth; over it the answer is
429 `{"error":"TOO_MANY_REQUESTS","message":"Limit N/min"}`. Whatever else a service listens on is probed without
credentials and reported: a port that serves data to anyone is a finding for a human, not a failure of the run.

Nothing here records a token: probes name the credentials they sent by description, paths never carry the query
string, and transport errors are reported by type only (their text can quote a URL that holds the token).
"""
from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
import psutil

from canary.stops import TOO_MANY_REQUESTS_STATUS, UNAUTHORIZED_BODY, UNAUTHORIZED_STATUS, too_many_requests_body
from harness.journal import Finding
from harness.secrets_scan import SecretSet
from quantlab_chaos.redact import redact

HEALTH_PATHS = ("/health",)
OPEN_PORT_PATHS = ("/",) + HEALTH_PATHS
PROBE_TIMEOUT_S = 3.0


@dataclass
class Probe:
    """One request and what it got. `path` never holds a query string; `credentials` says what was sent."""

    service: str
    port: int
    method: str
    path: str
    credentials: str
    status: int | None
    expected: str
    ok: bool
    note: str = ""


@dataclass(frozen=True)
class Credentials:
    """A way a client may present (or fail to present) the token."""

    label: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # may hold the token: out of reprs and tracebacks
    query: str = field(default="", repr=False)


def credential_mistakes(token: str) -> list[Credentials]:
    """Every way of asking the observer without the one header the contract accepts."""
    return [
        Credentials("no credentials"),
        Credentials("a wrong bearer token", {"Authorization": f"Bearer {secrets.token_urlsafe(24)}"}),
        Credentials("the token in ?token=", query="?" + urlencode({"token": token})),
        Credentials("the token in ?access_token=", query="?" + urlencode({"access_token": token})),
        Credentials("the token with a lowercase 'bearer' scheme", {"Authorization": f"bearer {token}"}),
        Credentials("the token without a scheme", {"Authorization": token}),
        Credentials("'Bearer' without a token", {"Authorization": "Bearer"}),
    ]


@dataclass
class SecurityReport:
    """Probes, findings and failures of one security scenario; what summary.json's `security` block is made of."""

    secrets: SecretSet = field(default_factory=SecretSet, repr=False)
    probes: list[Probe] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    ports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def fail(self, message: str) -> None:
        self.failures.append(self._clean(message))

    def finding(self, title: str, detail: str, severity: str = "warning") -> None:
        self.findings.append(Finding(self._clean(title), self._clean(detail), severity))

    def _clean(self, text: str) -> str:
        """Answers are quoted in messages; a target that echoes a secret must not get it into the report."""
        return redact(text, [value for _, value in self.secrets.pairs()])

    def to_dict(self) -> dict[str, Any]:
        return {"probes": [asdict(p) for p in self.probes], "findings": [asdict(f) for f in self.findings],
                "failures": list(self.failures), "ports": self.ports}


# -- what the services listen on ---------------------------------------------------------------------------------


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (npm, sh and node under an `npm run start` unit, for example)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def listening_sockets(pids: Iterable[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by these processes or their descendants."""
    found: dict[tuple[str, int], None] = {}
    for pid in pids:
        for process in process_tree(pid):
            try:
                connections = process.net_connections(kind="tcp")
            except psutil.Error:
                continue
            for conn in connections:
                if conn.status == psutil.CONN_LISTEN and conn.laddr:
                    found.setdefault((str(conn.laddr.ip), int(conn.laddr.port)), None)
    return sorted(found)


def connect_host(address: str) -> str:
    """Where to reach a listener bound to `address` from this host (a wildcard bind is reached on loopback)."""
    if address in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return f"[{ip}]" if ip.version == 6 else str(ip)


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


# -- the observer ----------------------------------------------------------------------------------------------


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:200]


def probe_observer_auth(client: httpx.Client, report: SecurityReport, base_url: str, port: int,
                        paths: Iterable[str], token: str, methods: Iterable[str] = ("GET", "POST")) -> None:
    """Each path, with each method, asked with each credential mistake: 401 with the observer's body, or a failure."""
    expected = f"{UNAUTHORIZED_STATUS} {UNAUTHORIZED_BODY['error']}"
    for path in paths:
        for method in methods:
            for creds in credential_mistakes(token):
                try:
                    response = client.request(method, base_url + path + creds.query, headers=creds.headers)
                except httpx.HTTPError as exc:
                    report.probes.append(Probe("observer", port, method, path, creds.label, None, expected, False,
                                               f"no answer ({type(exc).__name__})"))
                    report.fail(f"{method} {path} with {creds.label}: no answer ({type(exc).__name__})")
                    continue
                body = _body(response)
                ok = response.status_code == UNAUTHORIZED_STATUS and body == UNAUTHORIZED_BODY
                report.probes.append(Probe("observer", port, method, path, creds.label, response.status_code, expected, ok))
                if response.is_success:
                    report.fail(f"{method} {path} with {creds.label} answered {response.status_code}: the observer "
                                "served it without the bearer header (CONTRACT section 3 says 401)")
                elif not ok:
                    report.fail(f"{method} {path} with {creds.label} answered {response.status_code} {str(body)[:120]} "
                                f"(expected {UNAUTHORIZED_STATUS} {UNAUTHORIZED_BODY})")


def probe_rate_limit(client: httpx.Client, report: SecurityReport, base_url: str, port: int, method: str, path: str,
                     limit: int, label: str) -> None:
    """`limit` requests without credentials to a path nobody asked for yet are answered (401), the next one is 429
    with the contract's body: the limit holds, and it is checked before auth."""
    expected = f"{limit} answered, then {TOO_MANY_REQUESTS_STATUS} {too_many_requests_body(limit)}"
    statuses: list[int | None] = []
    response: httpx.Response | None = None
    for _ in range(limit + 1):
        try:
            response = client.request(method, base_url + path)
        except httpx.HTTPError as exc:
            report.fail(f"{label}: request {len(statuses) + 1} to {method} {path} got no answer ({type(exc).__name__})")
            statuses.append(None)
            break
        statuses.append(response.status_code)
        if response.status_code == TOO_MANY_REQUESTS_STATUS:
            break
    limited_at = len(statuses) if statuses and statuses[-1] == TOO_MANY_REQUESTS_STATUS else None
    body = _body(response) if response is not None else None
    ok = limited_at == limit + 1 and body == too_many_requests_body(limit)
    note = (f"first {TOO_MANY_REQUESTS_STATUS} at request {limited_at}" if limited_at
            else f"no {TOO_MANY_REQUESTS_STATUS} in {len(statuses)} requests")
    report.probes.append(Probe("observer", port, method, path, f"{label}: {limit + 1} requests without credentials",
                               statuses[-1] if statuses else None, expected, ok, note))
    if limited_at is None:
        report.fail(f"{label}: {len(statuses)} requests to {method} {path} in a burst, none answered "
                    f"{TOO_MANY_REQUESTS_STATUS} (contract: {limit}/min per client and path)")
    elif limited_at <= limit:
        report.fail(f"{label}: {method} {path} answered {TOO_MANY_REQUESTS_STATUS} already at request {limited_at} "
                    f"(contract: {limit}/min per client and path)")
    elif not ok:
        report.fail(f"{label}: the {TOO_MANY_REQUESTS_STATUS} body is {str(body)[:120]} (expected {too_many_requests_body(limit)})")


def probe_after_limit(client: httpx.Client, report: SecurityReport, base_url: str, port: int, method: str, path: str,
                      token: str, expected_status: int, why: str) -> None:
    """One request with the right token after a flood: the flooded path stays limited, other paths are still served."""
    try:
        response = client.request(method, base_url + path, headers={"Authorization": f"Bearer {token}"})
        status: int | None = response.status_code
    except httpx.HTTPError as exc:
        status = None
        why = f"{why}; no answer ({type(exc).__name__})"
    ok = status == expected_status
    report.probes.append(Probe("observer", port, method, path, "the right bearer token, after the flood", status,
                               str(expected_status), ok, why))
    if not ok:
        report.fail(f"{method} {path} with the right token after the flood answered {status} (expected {expected_status}: {why})")


# -- every other port --------------------------------------------------------------------------------------------


def probe_open_port(client: httpx.Client, report: SecurityReport, service: str, address: str, port: int) -> None:
    """GET / and GET /health without credentials; data served to anyone on a route that is not a health route,
    or any secret in an answer, is a finding. A port that answers no HTTP is reported too."""
    host = connect_host(address)
    for path in OPEN_PORT_PATHS:
        try:
            response = client.get(f"http://{host}:{port}{path}")
        except httpx.HTTPError as exc:
            report.probes.append(Probe(service, port, "GET", path, "no credentials", None, "reported", True,
                                       f"no HTTP answer ({type(exc).__name__}); bound to {address}"))
            report.finding(f"{service} listens on port {port} and answers no HTTP",
                           f"{address}:{port} gave no HTTP answer to GET {path} ({type(exc).__name__}); probe it by hand",
                           "info")
            return
        served = response.is_success and len(response.content) > 0
        leaked = report.secrets.found_in(response.content)
        unguarded = served and path not in HEALTH_PATHS
        note = f"bound to {address}; {len(response.content)} bytes" + ("; served without credentials" if served else "")
        report.probes.append(Probe(service, port, "GET", path, "no credentials", response.status_code, "reported",
                                   not (unguarded or leaked), note))
        if leaked:
            report.finding(f"{service} serves a secret without credentials",
                           f"GET {path} on port {port} answered {response.status_code} with {', '.join(leaked)} in the body",
                           "defect")
        if unguarded:
            report.finding(f"{service} serves data without credentials",
                           f"GET {path} on {address}:{port} answered {response.status_code} with {len(response.content)} "
                           "bytes to a client that sent no credentials", "warning")
