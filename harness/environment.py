"""One QuantLab environment: the target's services booted from their unit files, wired to S3 and the fake
exchange through toxiproxy, with env files, spool, state and a token of its own.

The long-lived parts (S3 server, toxiproxy server) are shared per process and passed in; everything in
`QuantLabEnvironment` belongs to one test (or one `env up`), so parallel tests never share state.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from canary.process import CommandNotFound, CommandResult, run_process
from harness import reaper
from harness.errors import ConfigError, HarnessError, MissingToolError
from harness.fakes.binance import FakeBinance
from harness.fakes.node import BINANCE_FUTURES_WS, node_options_with_preload, url_map_env
from harness.fakes.s3 import Bucket, S3Server, open_s3
from harness.fakes.toxiproxy import ChaosProxy, ToxiproxyServer
from harness.ports import free_port
from harness.services import ServiceStatus, Supervisor
from harness.target import ServiceRole, Target
from harness.units import EnvFile, ServiceSpec, is_secret_name, load_service, write_env_file

reaper.install()  # QuantLab's one-shot commands (canary.process) are reaped with the harness too

STRATEGIES = Path(__file__).with_name("strategies")
SECRET_ENV = ("OBSERVER_TOKEN", "RUN_ARCHIVE_S3_ACCESS_KEY", "RUN_ARCHIVE_S3_SECRET_KEY")
COMMAND_TIMEOUT_S = 120.0


@dataclass
class ServiceWiring:
    """How one unit runs in this environment."""

    role: ServiceRole
    unit_path: Path
    env_file: Path | None
    port: int | None
    spec: ServiceSpec | None = None
    error: HarnessError | None = None


@dataclass
class Settings:
    """The QuantLab settings this environment starts with (CONTRACT section 2)."""

    archive: bool = True
    live_ws: bool = True
    audit: bool = True
    extra: dict[str, str] = field(default_factory=dict)


class QuantLabEnvironment(AbstractContextManager):
    """A target's services with their own token, bucket, proxies, spool, state and env files."""

    def __init__(self, target: Target, workdir: Path, *, s3: S3Server, toxiproxy: ToxiproxyServer,
                 exchange: FakeBinance, settings: Settings | None = None, name: str = "ql") -> None:
        self.target = target
        self.workdir = Path(workdir)
        self.s3_server = s3
        self.toxiproxy = toxiproxy
        self.exchange = exchange
        self.settings = settings or Settings()
        self.name = name
        self.token = secrets.token_urlsafe(24)
        self.audit_dir = self.workdir / "audit-spool"
        self.state_dir = self.workdir / "state"
        self.env_dir = self.workdir / "etc-quantlab"
        self.services: dict[str, ServiceWiring] = {}
        self.http_log: list[dict[str, Any]] = []  # observer exchanges, Authorization never recorded
        self.inherent_waits: list[tuple[str, float]] = []  # waits the scenario needs by nature (run lengths, restart delays)
        self._stack = ExitStack()
        self.bucket: Bucket
        self.s3_proxy: ChaosProxy
        self.exchange_proxy: ChaosProxy
        self.supervisor: Supervisor

    # -- lifecycle ------------------------------------------------------------------------------------

    def __enter__(self) -> QuantLabEnvironment:
        try:
            for folder in (self.audit_dir, self.state_dir, self.env_dir):
                folder.mkdir(parents=True, exist_ok=True)
            self.bucket = self.s3_server.bucket()
            self._stack.callback(self.bucket.delete)
            self.s3_proxy = self.toxiproxy.create_proxy(f"{self.name}_s3", _host_port(self.s3_server.endpoint_url))
            self.exchange_proxy = self.toxiproxy.create_proxy(f"{self.name}_exchange", f"{self.exchange.host}:{self.exchange.port}")
            self.supervisor = self._stack.enter_context(Supervisor(self.workdir / "journal", honour_user=False))
            self._wire_services()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        for proxy_name in (f"{self.name}_s3", f"{self.name}_exchange"):
            try:
                self.toxiproxy.destroy_proxy(proxy_name)
            except Exception:  # noqa: BLE001 - the server may already be gone at shutdown
                pass

    # -- environment ----------------------------------------------------------------------------------

    @property
    def s3_endpoint(self) -> str:
        """What the target is told the S3 endpoint is: the toxiproxy proxy in front of the real server."""
        return self.s3_proxy.url("http")

    @property
    def exchange_url(self) -> str:
        """Where the target's hard-coded exchange URL is sent: the toxiproxy proxy in front of the fake."""
        return self.exchange_proxy.url("ws")

    def quantlab_env(self) -> dict[str, str]:
        """QuantLab's own settings for this environment, as an operator would write them in an env file."""
        creds = self.s3_server.credentials
        env = {
            "OBSERVER_TOKEN": self.token,
            "RUN_ARCHIVE_ENABLED": "1" if self.settings.archive else "0",
            "RUN_ARCHIVE_S3_BUCKET": self.bucket.name,
            "RUN_ARCHIVE_S3_ENDPOINT": self.s3_endpoint,
            "RUN_ARCHIVE_S3_ACCESS_KEY": creds.access_key,
            "RUN_ARCHIVE_S3_SECRET_KEY": creds.secret_key,
            "AUDIT_ENABLED": "1" if self.settings.audit else "0",
            "AUDIT_SPOOL_DIR": str(self.audit_dir),
            "QUANTLAB_STATE_DIR": str(self.state_dir),
            "CORE_LIVE_WS_ENABLED": "1" if self.settings.live_ws else "0",
        }
        env.update(self.settings.extra)
        return env

    def plumbing_env(self) -> dict[str, str]:
        """What the harness adds on top: the preload that sends the hard-coded exchange URL to the proxy."""
        return {
            "NODE_OPTIONS": node_options_with_preload(os.environ.get("NODE_OPTIONS", "")),
            **url_map_env({BINANCE_FUTURES_WS: self.exchange_url}),
        }

    def secrets(self) -> dict[str, str]:
        """Secret name -> value, for redaction and leak scans: the configured ones, and every secret-named value
        an env file holds now (a rotated token too), keyed `<file>:<NAME>` for those."""
        env = self.quantlab_env()
        found = {name: env[name] for name in SECRET_ENV if env.get(name)}
        for path in sorted(self.env_dir.glob("*.env")):
            for name, value in EnvFile.read(path).values.items():
                if value and is_secret_name(name) and value not in found.values():
                    found[f"{path.name}:{name}"] = value
        return found

    def service_env(self, service: str) -> dict[str, str]:
        wiring = self.wiring(service)
        env = self.quantlab_env()
        if wiring.role.port_env and wiring.port:
            env[wiring.role.port_env] = str(wiring.port)
        return env

    def _wire_services(self) -> None:
        for unit, role in self.target.services.items():
            unit_path = self.target.units[unit]
            port = free_port() if role.port_env else None
            wiring = ServiceWiring(role=role, unit_path=unit_path, env_file=None, port=port)
            self.services[role.role] = wiring
            try:
                wiring.spec = load_service(unit_path, checkout=self.target.root, env_file_map=self._env_file_for)
            except HarnessError as exc:
                wiring.error = exc  # reported when the service is started, so one odd unit does not stop the rest
                continue
            refs = [ref.path for ref in wiring.spec.environment_files]
            wiring.env_file = refs[0] if refs else None
            if wiring.env_file is not None:
                write_env_file(wiring.env_file, self.service_env(role.role))
            self.supervisor.add(role.role, wiring.spec, override_env=self.plumbing_env(),
                                readiness=self._readiness(wiring))

    def _env_file_for(self, production_path: Path) -> Path:
        return self.env_dir / Path(production_path).name

    def _readiness(self, wiring: ServiceWiring) -> str | None:
        if wiring.role.port_env and wiring.role.health_path and wiring.port:
            return f"http://127.0.0.1:{wiring.port}{wiring.role.health_path}"
        return None

    # -- services (systemctl-like) --------------------------------------------------------------------

    def wiring(self, service: str) -> ServiceWiring:
        role = self.target.role(service).role
        return self.services[role]

    def _name(self, service: str) -> str:
        wiring = self.wiring(service)
        if wiring.error is not None:
            raise wiring.error
        return wiring.role.role

    def start(self, service: str, timeout: float = 30.0, *, check: bool = True) -> ServiceStatus:
        return self.supervisor.start(self._name(service), timeout=timeout, check=check)

    def stop(self, service: str) -> ServiceStatus:
        return self.supervisor.stop(self._name(service))

    def restart(self, service: str, timeout: float = 30.0) -> ServiceStatus:
        return self.supervisor.restart(self._name(service), timeout=timeout)

    def status(self, service: str) -> ServiceStatus:
        return self.supervisor.status(self._name(service))

    def logs(self, service: str, lines: int | None = None) -> list[str]:
        return self.supervisor.logs(self._name(service), lines=lines)

    def edit_env(self, service: str, set: Mapping[str, str] | None = None, unset: Sequence[str] = ()) -> Path:
        """Changes the service's env file the way an operator edits /etc/quantlab/<name>.env (takes effect on restart)."""
        wiring = self.wiring(service)
        if wiring.env_file is None:
            raise ConfigError(f"The unit {wiring.unit_path} has no EnvironmentFile=; its env cannot be edited.")
        values = dict(EnvFile.read(wiring.env_file).values) if wiring.env_file.exists() else {}
        values.update(set or {})
        for name in unset:
            values.pop(name, None)
        return write_env_file(wiring.env_file, values)

    def port(self, service: str) -> int:
        wiring = self.wiring(service)
        if wiring.port is None:
            raise ConfigError(f"The service {service} listens on no port the harness knows.")
        return wiring.port

    @property
    def observer_url(self) -> str:
        return f"http://127.0.0.1:{self.port('observer')}"

    def observer(self, method: str, path: str, *, token: str | None = None, headers: Mapping[str, str] | None = None,
                 timeout: float = 5.0) -> httpx.Response:
        """One request to the observer; `token=None` sends this environment's token, `token=''` none."""
        sent = dict(headers or {})
        bearer = self.token if token is None else token
        if bearer and "Authorization" not in sent:
            sent["Authorization"] = f"Bearer {bearer}"
        response = httpx.request(method, self.observer_url + path, headers=sent, timeout=timeout)
        self.http_log.append({"method": method, "path": path, "authorization": "sent" if "Authorization" in sent else "none",
                              "status": response.status_code, "body": response.text[:500]})
        return response

    # -- commands -------------------------------------------------------------------------------------

    def run_node(self, script: str | Path, *args: str, env: Mapping[str, str] | None = None,
                 unset: Sequence[str] = (), timeout: float = COMMAND_TIMEOUT_S) -> CommandResult:
        """Runs `node <script> args` in the checkout with this environment's settings (plus `env`, minus `unset`)."""
        return self.run_command(("node", str(script), *args), env=env, unset=unset, timeout=timeout)

    def command_env(self, extra: Mapping[str, str] | None = None, unset: Sequence[str] = ()) -> dict[str, str]:
        """The environment of a target command run on the host: a minimal base, this environment's settings and
        plumbing, then `extra`, minus `unset`."""
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir), "LANG": "C.UTF-8",
                    **self.quantlab_env(), **self.plumbing_env(), **(extra or {})}
        for name in unset:
            full_env.pop(name, None)
        return full_env

    def note_wait(self, reason: str, seconds: float) -> None:
        """Records a wait the scenario needs by nature (benchmarks compare the suite's wall time with their sum)."""
        self.inherent_waits.append((reason, float(seconds)))

    def run_command(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, unset: Sequence[str] = (),
                    timeout: float = COMMAND_TIMEOUT_S) -> CommandResult:
        if "--duration-seconds" in argv[:-1]:
            self.note_wait("live run length", float(argv[list(argv).index("--duration-seconds") + 1]))
        try:
            return run_process(argv, cwd=self.target.root, env=self.command_env(env, unset), timeout=timeout)
        except CommandNotFound as exc:
            raise MissingToolError(str(exc)) from exc

    def strategy(self, name: str = "steady") -> Path:
        """Path of one of the harness's strategy files (steady, chatty, silent, losing)."""
        path = STRATEGIES / f"{name}.js"
        if not path.is_file():
            raise ConfigError(f"No harness strategy {name!r}; choose one of {sorted(p.stem for p in STRATEGIES.glob('*.js'))}.")
        return path

    def endpoints(self) -> dict[str, Any]:
        """What `env up` prints: where everything is (secrets stay in the env files)."""
        return {
            "target": str(self.target.root),
            "workdir": str(self.workdir),
            "s3": {"endpoint": self.s3_server.endpoint_url, "proxy": self.s3_endpoint, "bucket": self.bucket.name},
            "exchange": {"fake": self.exchange.url, "proxy": self.exchange_url},
            "toxiproxy": self.toxiproxy.url,
            "audit_spool": str(self.audit_dir),
            "state_dir": str(self.state_dir),
            "services": {
                role: {"unit": str(w.unit_path), "env_file": str(w.env_file) if w.env_file else None,
                       "url": f"http://127.0.0.1:{w.port}" if w.port else None,
                       "error": str(w.error) if w.error else None}
                for role, w in self.services.items()
            },
        }


def _host_port(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


@contextmanager
def shared_parts(s3_backend: str = "moto", s3_url: str | None = None, toxiproxy_bin: str | None = None,
                 log_dir: Path | None = None) -> Iterator[tuple[S3Server, ToxiproxyServer]]:
    """The per-process parts: one S3 server and one toxiproxy server."""
    with open_s3(s3_backend, s3_url) as s3, ToxiproxyServer(toxiproxy_bin, log_path=log_dir / "toxiproxy.log" if log_dir else None) as toxiproxy:
        yield s3, toxiproxy


def serve_environment(*, quantlab_root: str | None, runbook: str | None, s3_backend: str, s3_url: str | None,
                      toxiproxy_bin: str | None, services: Sequence[str] | None) -> int:
    """`quantlab-chaos env up`: boots everything, prints the endpoints as JSON, and tears down on Ctrl-C/SIGTERM."""
    import tempfile

    target = Target.load(quantlab_root, runbook)
    workdir = Path(tempfile.mkdtemp(prefix="quantlab-chaos-env-"))
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with shared_parts(s3_backend, s3_url, toxiproxy_bin, workdir) as (s3, toxiproxy), \
                FakeBinance() as exchange, \
                QuantLabEnvironment(target, workdir, s3=s3, toxiproxy=toxiproxy, exchange=exchange) as env:
            wanted = services or [w.role.role for w in env.services.values() if w.spec and w.spec.type != "oneshot"]
            for service in wanted:
                env.start(service)
            print(json.dumps({"event": "env_up", **env.endpoints(), "started": list(wanted)}, indent=2), flush=True)
            print("Environment is up; press Ctrl-C to tear it down.", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("Tearing down.", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
