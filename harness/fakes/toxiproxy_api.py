"""A small typed client of toxiproxy's HTTP API (https://github.com/Shopify/toxiproxy#http-api), on httpx.

Each `ToxiproxyAPI` holds its server's address and one `httpx.Client` of its own (httpx clients may be shared
between threads), and every call has a timeout: several clients for several servers can be used from as many
threads as a scenario likes. Every failure, whether toxiproxy answered with an error or did not answer at all,
is a `ToxiproxyError` that names the call, the proxy (and toxic) and carries the HTTP status and toxiproxy's
own error text.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from quantlab_chaos import tls
from quantlab_chaos.errors import EXIT_UNREACHABLE, HarnessError

API_TIMEOUT_S = 5.0
STREAMS = ("upstream", "downstream")
T = TypeVar("T")


class ToxiproxyError(HarnessError):
    """A toxiproxy API call that failed: toxiproxy refused it (`status` is its HTTP status, `message` its own
    error text, e.g. "proxy already exists") or gave no usable answer (`status` None, `message` says why)."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, url: str, method: str, path: str, status: int | None, message: str, *,
                 proxy: str | None = None, toxic: str | None = None) -> None:
        self.url = url
        self.method = method
        self.path = path
        self.status = status
        self.message = message
        self.proxy = proxy
        self.toxic = toxic
        subject = ""
        if proxy is not None:
            subject = f" for toxic {toxic!r} of proxy {proxy!r}" if toxic is not None else f" for proxy {proxy!r}"
        if status is None:
            text = (f"toxiproxy at {url} gave no answer to {method} {path}{subject}: {message}. Check that the "
                    "server still runs (its log says why it stopped).")
        else:
            text = f"toxiproxy at {url} refused {method} {path}{subject}: HTTP {status}: {message}"
        super().__init__(text)


@dataclass(frozen=True)
class ToxicInfo:
    """One toxic as toxiproxy describes it."""

    name: str
    type: str
    stream: str
    toxicity: float
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProxyInfo:
    """One proxy as toxiproxy describes it; `listen` is the address it really listens on (port 0 resolved)."""

    name: str
    listen: str
    upstream: str
    enabled: bool
    toxics: tuple[ToxicInfo, ...] = ()

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def _toxic_info(data: Any) -> ToxicInfo:
    return ToxicInfo(name=str(data["name"]), type=str(data["type"]), stream=str(data["stream"]),
                     toxicity=float(data["toxicity"]), attributes=dict(data.get("attributes") or {}))


def _proxy_info(data: Any) -> ProxyInfo:
    return ProxyInfo(name=str(data["name"]), listen=str(data["listen"]), upstream=str(data["upstream"]),
                     enabled=bool(data["enabled"]), toxics=tuple(_toxic_info(t) for t in data.get("toxics") or ()))


def _path(proxy: str | None = None, toxic: str | None = None, *, toxics: bool = False) -> str:
    path = "/proxies"
    if proxy is not None:
        path += "/" + quote(proxy, safe="")
        if toxics or toxic is not None:
            path += "/toxics"
        if toxic is not None:
            path += "/" + quote(toxic, safe="")
    return path


def _error_text(response: httpx.Response) -> str:
    """toxiproxy's own words: its JSON body is {"error": "...", "status": N}; anything else is shown as it came."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    return response.text.strip()[:300] or response.reason_phrase or "no error text"


class ToxiproxyAPI:
    """The HTTP API of one toxiproxy server at `url` (http://host:port). Safe to share between threads."""

    def __init__(self, url: str, *, timeout: float = API_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None) -> None:
        """timeout: seconds for each call (connect, read, write, pool); transport: for tests."""
        self.url = url.rstrip("/")
        self.timeout = timeout
        # trust_env=False: HTTP(S)_PROXY meant for the internet must not sit between the harness and its toxiproxy.
        self._client = httpx.Client(base_url=self.url, timeout=timeout, trust_env=False, transport=transport,
                                    verify=tls.context())

    def __repr__(self) -> str:
        return f"ToxiproxyAPI({self.url!r})"

    def __enter__(self) -> ToxiproxyAPI:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    # -- the server -------------------------------------------------------------------------------------

    def answers(self, timeout: float = 1.0) -> bool:
        """Whether a toxiproxy answers at this address within `timeout` s (never raises)."""
        try:
            self._send("GET", "/version", timeout=timeout)
            return True
        except ToxiproxyError:
            return False

    def version(self) -> str:
        """The server's version ("2.12.0"; "git" for a build from source)."""
        response = self._send("GET", "/version")
        try:
            body = response.json()
        except ValueError:
            return response.text.strip()  # toxiproxy before 2.6 answered with the bare version
        return str(body.get("version", "")) if isinstance(body, dict) else str(body)

    def reset(self) -> None:
        """Enables every proxy and removes every toxic."""
        self._send("POST", "/reset")

    # -- proxies ----------------------------------------------------------------------------------------

    def proxies(self) -> dict[str, ProxyInfo]:
        return self._fetch("GET", _path(), lambda data: {str(name): _proxy_info(info) for name, info in data.items()})

    def get_proxy(self, name: str) -> ProxyInfo | None:
        """The proxy, or None when the server has none by that name."""
        try:
            return self.proxy(name)
        except ToxiproxyError as exc:
            if exc.status == 404:
                return None
            raise

    def proxy(self, name: str) -> ProxyInfo:
        """The proxy; ToxiproxyError (status 404) when there is none by that name."""
        return self._fetch("GET", _path(name), _proxy_info, proxy=name)

    def create_proxy(self, name: str, upstream: str, listen: str = "127.0.0.1:0", *, enabled: bool = True) -> ProxyInfo:
        """A new proxy; ToxiproxyError (status 409) when one by that name exists."""
        body = {"name": name, "upstream": upstream, "listen": listen, "enabled": enabled}
        return self._fetch("POST", _path(), _proxy_info, json=body, proxy=name)

    def update_proxy(self, name: str, *, enabled: bool | None = None, listen: str | None = None,
                     upstream: str | None = None) -> ProxyInfo:
        """Changes what is given; toxiproxy keeps the rest."""
        given = {"enabled": enabled, "listen": listen, "upstream": upstream}
        body = {key: value for key, value in given.items() if value is not None}
        return self._fetch("POST", _path(name), _proxy_info, json=body, proxy=name)

    def enable(self, name: str) -> ProxyInfo:
        return self.update_proxy(name, enabled=True)

    def disable(self, name: str) -> ProxyInfo:
        """Stops listening and drops every open connection."""
        return self.update_proxy(name, enabled=False)

    def delete_proxy(self, name: str, *, missing_ok: bool = False) -> bool:
        """Removes the proxy; False when it did not exist and missing_ok (else ToxiproxyError, status 404)."""
        try:
            self._send("DELETE", _path(name), proxy=name)
            return True
        except ToxiproxyError as exc:
            if missing_ok and exc.status == 404:
                return False
            raise

    def destroy_all(self) -> None:
        """Removes every proxy of this server."""
        for name in self.proxies():
            self.delete_proxy(name, missing_ok=True)

    # -- toxics -----------------------------------------------------------------------------------------

    def toxics(self, proxy: str) -> list[ToxicInfo]:
        return self._fetch("GET", _path(proxy, toxics=True), lambda data: [_toxic_info(t) for t in data or ()],
                           proxy=proxy)

    def get_toxic(self, proxy: str, toxic: str) -> ToxicInfo:
        return self._fetch("GET", _path(proxy, toxic), _toxic_info, proxy=proxy, toxic=toxic)

    def add_toxic(self, proxy: str, kind: str, *, name: str | None = None, stream: str = "downstream",
                  toxicity: float = 1.0, attributes: Mapping[str, int] | None = None) -> ToxicInfo:
        """A toxic of type `kind` (latency, timeout, reset_peer, bandwidth, slicer, limit_data, slow_close) on
        `stream`; toxiproxy names it `{kind}_{stream}` unless `name` is given."""
        if stream not in STREAMS:
            raise ValueError(f"toxic stream {stream!r}: choose one of {', '.join(STREAMS)}")
        body: dict[str, object] = {"type": kind, "stream": stream, "toxicity": toxicity,
                                   "attributes": dict(attributes or {})}
        if name is not None:
            body["name"] = name
        return self._fetch("POST", _path(proxy, toxics=True), _toxic_info, json=body, proxy=proxy,
                           toxic=name or f"{kind}_{stream}")

    def update_toxic(self, proxy: str, toxic: str, *, toxicity: float | None = None,
                     attributes: Mapping[str, int] | None = None) -> ToxicInfo:
        body: dict[str, object] = {}
        if toxicity is not None:
            body["toxicity"] = toxicity
        if attributes is not None:
            body["attributes"] = dict(attributes)
        return self._fetch("POST", _path(proxy, toxic), _toxic_info, json=body, proxy=proxy, toxic=toxic)

    def remove_toxic(self, proxy: str, toxic: str) -> None:
        self._send("DELETE", _path(proxy, toxic), proxy=proxy, toxic=toxic)

    # -- the wire ---------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, *, json: object = None, proxy: str | None = None,
              toxic: str | None = None, timeout: float | None = None) -> httpx.Response:
        """The response to one call, which succeeded (2xx); anything else is a ToxiproxyError."""
        if self._client.is_closed:
            raise ToxiproxyError(self.url, method, path, None, "this client was closed", proxy=proxy, toxic=toxic)
        try:
            response = self._client.request(method, path, json=json,
                                            timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout)
        except httpx.TimeoutException as exc:
            seconds = self.timeout if timeout is None else timeout
            raise ToxiproxyError(self.url, method, path, None, f"no answer within {seconds:g} s ({type(exc).__name__})",
                                 proxy=proxy, toxic=toxic) from exc
        except httpx.HTTPError as exc:
            raise ToxiproxyError(self.url, method, path, None, f"{type(exc).__name__}: {exc}",
                                 proxy=proxy, toxic=toxic) from exc
        if not response.is_success:
            raise ToxiproxyError(self.url, method, path, response.status_code, _error_text(response),
                                 proxy=proxy, toxic=toxic)
        return response

    def _fetch(self, method: str, path: str, build: Callable[[Any], T], *, json: object = None,
               proxy: str | None = None, toxic: str | None = None) -> T:
        """What `build` makes of a successful call's JSON; an answer of another shape is a ToxiproxyError too."""
        response = self._send(method, path, json=json, proxy=proxy, toxic=toxic)
        try:
            return build(response.json())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ToxiproxyError(self.url, method, path, response.status_code,
                                 f"an answer toxiproxy does not give ({type(exc).__name__}: {exc}): "
                                 f"{response.text.strip()[:200]!r}", proxy=proxy, toxic=toxic) from exc
