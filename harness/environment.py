"""One QuantLab environment: the target's services booted from their unit files, wired to S3 and the fake
exchange through toxiproxy, with env files, spool, state and a token of its own.

The long-lived parts (S3 server, toxiproxy server) are shared per process and passed in; everything in
`QuantLabEnvironment` belongs to one test (or one `env up`), so parallel tests never share state.
"""
from __future__ import annotations

import dataclasses
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

from canary.checks import TargetUnreachable
from canary.config import default_strategy
from canary.process import CommandNotFound, CommandResult, run_process
from harness import reaper
from harness.fakes.binance import FakeBinance
from harness.fakes.node import BINANCE_FUTURES_WS, node_options_with_preload, url_map_env
from harness.fakes.s3 import Bucket, S3Server, open_s3
from harness.fakes.toxiproxy import ChaosProxy, ToxiproxyServer
from harness.isolation import PortLocks, current_isolation
from harness.journal import RunbookViolation
from harness.outcomes import SteadyStateNotReached
from harness.ports import free_port
from harness.readiness import ServiceReadiness, listening_ports
from harness.readiness import not_installed as not_installed_line
from harness.sysd.deploy import load_service
from harness.sysd.spec import ServiceSpec
from harness.sysd.status import ServiceFailed, ServiceStatus
from harness.sysd.supervisor import Supervisor
from harness.target import ServiceRole, Target
from quantlab_chaos import tls
from quantlab_chaos.envfile import EnvFile, write_env_file
from quantlab_chaos.errors import ConfigError, HarnessError, MissingToolError
from quantlab_chaos.redact import is_secret_name
from quantlab_chaos.runbook import Runbook

STRATEGIES = default_strategy().parent  # the ES modules handed to QuantLab, shipped with the canary
SECRET_ENV = ("OBSERVER_TOKEN", "RUN_ARCHIVE_S3_ACCESS_KEY", "RUN_ARCHIVE_S3_SECRET_KEY")
COMMAND_TIMEOUT_S = 120.0


@dataclass
class ServiceWiring:
    """How one unit runs in this environment. `port` is the port the unit is configured to listen on and
    `port_source` says who set it: "unit" (its own Environment=), "harness" (written into its env file, as an
    operator would), or None (neither: the harness learns it by watching the process listen)."""

    role: ServiceRole
    unit_path: Path
    env_file: Path | None
    port: int | None
    spec: ServiceSpec | None = None
    error: HarnessError | None = None
    port_source: str | None = None


@dataclass
class Settings:
    """The QuantLab settings this environment starts with (CONTRACT section 2)."""

    archive: bool = True
    live_ws: bool = True
    audit: bool = True
    extra: dict[str, str] = field(default_factory=dict)


class QuantLabEnvironment(AbstractContextManager["QuantLabEnvironment"]):
    """A target's services with their own token, bucket, proxies, spool, state and env files."""

    def __init__(self, target: Target, workdir: Path, *, s3: S3Server, toxiproxy: ToxiproxyServer,
                 exchange: FakeBinance, settings: Settings | None = None, name: str = "ql",
                 runbook: Runbook | None = None) -> None:
        self.target = target
        self.runbook = runbook
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
        reaper.install()  # QuantLab's one-shot commands (canary.process) are reaped with the harness too
        try:
            for folder in (self.audit_dir, self.state_dir, self.env_dir):
                folder.mkdir(parents=True, exist_ok=True)
            self.bucket = self.s3_server.bucket()
            self._stack.callback(self.bucket.delete)
            self.s3_proxy = self.toxiproxy.create_proxy(f"{self.name}_s3", _host_port(self.s3_server.endpoint_url))
            self.exchange_proxy = self.toxiproxy.create_proxy(f"{self.name}_exchange", f"{self.exchange.host}:{self.exchange.port}")
            self._wire_services()
            # Entered before the supervisor, so the locks are released only after every service has stopped.
            self.port_locks = self._stack.enter_context(
                PortLocks(self.fixed_ports(), isolation=current_isolation(), what=f"environment {self.name}"))
            self.supervisor = self._stack.enter_context(Supervisor(self.workdir / "journal", honour_user=False))
            for wiring in self.services.values():
                if wiring.spec is not None and wiring.error is None:
                    self.supervisor.add(wiring.role.role, wiring.spec, override_env=self.plumbing_env(),
                                        readiness=self._readiness(wiring))
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
        """What the harness adds on top: the preload that sends the hard-coded exchange URL to the proxy, and the
        AWS SDK's own switch for its Node-version notice, which says nothing about the runbook and would fill every
        journal (the SDK emits it as a plain Warning, so `--disable-warning=NodeVersionSupportWarning` misses it)."""
        return {
            "NODE_OPTIONS": node_options_with_preload(os.environ.get("NODE_OPTIONS", "")),
            "AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED": "true",
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
        """What the harness writes into the service's env file: QuantLab's settings, and the listen port only
        where the harness chose it (a port the unit sets itself stays the unit's: an env file would override it)."""
        wiring = self.wiring(service)
        env = self.quantlab_env()
        if wiring.role.port_env and wiring.port and wiring.port_source == "harness":
            env[wiring.role.port_env] = str(wiring.port)
        return env

    def fixed_ports(self) -> list[int]:
        """Ports this environment cannot choose: the ones its units set, and the runbook's observer port. Where
        environments share the host's network, these are locked so two environments never use one at once."""
        ports = {w.port for w in self.services.values() if w.port and w.port_source == "unit"}
        runbook_port = self.runbook_observer_port()
        if runbook_port:
            ports.add(runbook_port)
        return sorted(ports)

    def runbook_observer_port(self) -> int | None:
        """The observer port the runbook's health-check requests name (127.0.0.1:9150 in QuantLab's runbook)."""
        checks = self.runbook.health_checks if self.runbook is not None else []
        local = [r for r in checks if r.host in ("127.0.0.1", "localhost")]
        return local[0].port if local else None

    def _wire_services(self) -> None:
        for unit, role in self.target.services.items():
            unit_path = self.target.units[unit]
            wiring = ServiceWiring(role=role, unit_path=unit_path, env_file=None, port=None)
            self.services[role.role] = wiring
            try:
                wiring.spec = load_service(unit_path, checkout=self.target.root, env_file_map=self._env_file_for)
            except HarnessError as exc:
                wiring.error = exc  # reported when the service is started, so one odd unit does not stop the rest
                continue
            wiring.spec = self._outputs_outside_checkout(wiring.spec)
            refs = [ref.path for ref in wiring.spec.environment_files]
            wiring.env_file = refs[0] if refs else None
            self._choose_port(wiring)
            if wiring.env_file is not None:
                write_env_file(wiring.env_file, self.service_env(role.role))

    def _outputs_outside_checkout(self, spec: ServiceSpec) -> ServiceSpec:
        """StandardOutput=append:<root>/x.log would write into the checkout: such files go to this environment's
        logs folder instead, so the checkout is never changed (the supervisor's journal has the lines too)."""
        changes = {}
        for label in ("standard_output", "standard_error"):
            output = getattr(spec, label)
            if output is not None and output.path is not None and output.path.is_relative_to(self.target.root):
                relative = output.path.relative_to(self.target.root)
                (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
                changes[label] = dataclasses.replace(output, path=self.workdir / "logs" / "_".join(relative.parts))
        return dataclasses.replace(spec, **changes) if changes else spec

    def _choose_port(self, wiring: ServiceWiring) -> None:
        port_env = wiring.role.port_env
        assert wiring.spec is not None
        unit_value = wiring.spec.env_dict.get(port_env or "")
        if port_env and unit_value and unit_value.isdigit():
            wiring.port, wiring.port_source = int(unit_value), "unit"
        elif port_env and wiring.env_file is not None:
            # The operator's env file sets the port: the runbook's observer port for the observer, else any free one.
            runbook_port = self.runbook_observer_port() if wiring.role.role == "observer" else None
            wiring.port, wiring.port_source = runbook_port or free_port(), "harness"

    def _env_file_for(self, production_path: Path) -> Path:
        return self.env_dir / Path(production_path).name

    def _readiness(self, wiring: ServiceWiring) -> ServiceReadiness | None:
        if wiring.port is None:
            return None  # no port to judge by: up once its process runs
        return ServiceReadiness(lambda: self._main_pid(wiring.role.role), wiring.port, wiring.role.health_path,
                                sure=wiring.port_source == "unit" or wiring.role.declared)

    def _main_pid(self, name: str) -> int | None:
        return self.supervisor.status(name).main_pid

    def listening_ports(self, service: str) -> list[int]:
        """The TCP ports the service's processes listen on now, seen from outside (the process table)."""
        wiring = self.wiring(service)
        try:
            pid = self.supervisor.status(wiring.role.role).main_pid
        except HarnessError:
            return []
        return sorted(listening_ports(pid)) if pid else []

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
        """Starts a unit like `systemctl start`. A unit that cannot run because the checkout is not completely
        installed or built here makes the scenario blocked (SteadyStateNotReached), never a verdict on the system."""
        name = self._name(service)
        try:
            status = self.supervisor.start(name, timeout=timeout, check=check)
        except ServiceFailed as exc:
            raise (self.not_installed(name) or exc) from exc
        if not status.active and status.result != "success":
            blocked = self.not_installed(name)
            if blocked is not None:
                raise blocked
        return status

    def not_installed(self, name: str) -> SteadyStateNotReached | None:
        """Blocked, when the unit's journal says the checkout lacks an installed dependency or a build, else None."""
        name = self._name(name)
        line = not_installed_line(self.supervisor.logs(name, lines=200))
        if line is None:
            return None
        unit = self.wiring(name).unit_path.relative_to(self.target.root)
        return SteadyStateNotReached(
            f"{unit} cannot run here because the checkout is not completely installed or built: {line!r}. Install "
            f"the checkout as it is deployed (npm ci with its install scripts, its Python requirements, its build "
            f"step) and run again; the harness does not judge a unit it cannot bring up")

    def stop(self, service: str) -> ServiceStatus:
        return self.supervisor.stop(self._name(service))

    def restart(self, service: str, timeout: float = 30.0) -> ServiceStatus:
        return self.supervisor.restart(self._name(service), timeout=timeout)

    def status(self, service: str) -> ServiceStatus:
        return self.supervisor.status(self._name(service))

    def logs(self, service: str, lines: int | None = None) -> list[str]:
        return self.supervisor.logs(self._name(service), lines=lines)

    def edit_env(self, service: str, set: Mapping[str, str] | None = None,  # noqa: A002 - the operator's verbs: set, unset
                 unset: Sequence[str] = ()) -> Path:
        """Changes the service's env file the way an operator edits /etc/quantlab/<name>.env (takes effect on restart)."""
        wiring = self.wiring(service)
        if wiring.env_file is None:
            # The runbook's step cannot be carried out on this unit: a fact about the system, not the harness's trouble.
            raise RunbookViolation(f"{wiring.unit_path.relative_to(self.target.root)} has no EnvironmentFile=, so no "
                                   f"env file reaches it: setting {', '.join([*(set or {}), *unset])} in an env file "
                                   f"cannot change what it runs with")
        values = dict(EnvFile.read(wiring.env_file).values) if wiring.env_file.exists() else {}
        values.update(set or {})
        for name in unset:
            values.pop(name, None)
        return write_env_file(wiring.env_file, values)

    def port(self, service: str) -> int:
        """The port the service is configured to listen on, else the one it is seen listening on."""
        wiring = self.wiring(service)
        if wiring.port is not None:
            return wiring.port
        seen = self.listening_ports(service)
        if not seen:
            raise ConfigError(f"The service {service} is configured with no port the harness knows, and listens on none "
                              f"now. Give it one in .quantlab-chaos.toml (port_env) if it serves HTTP.")
        return seen[0]

    @property
    def observer_url(self) -> str:
        """Where the runbook's observer requests go: the runbook's own host and port (inside this environment's
        network namespace, or under a port lock), else the observer unit's port."""
        port = self.runbook_observer_port()
        return f"http://127.0.0.1:{port}" if port else self.observer_unit_url

    @property
    def observer_unit_url(self) -> str:
        """Where the observer unit is configured to listen (its Environment=, or the env file the harness wrote)."""
        return f"http://127.0.0.1:{self.port('observer')}"

    def observer(self, method: str, path: str, *, token: str | None = None, headers: Mapping[str, str] | None = None,
                 timeout: float = 5.0) -> httpx.Response:
        """One request to the observer; `token=None` sends this environment's token, `token=''` none."""
        __tracebackhide__ = True  # its arguments hold the bearer token: never in a traceback
        sent = dict(headers or {})
        bearer = self.token if token is None else token
        if bearer and "Authorization" not in sent:
            sent["Authorization"] = f"Bearer {bearer}"
        try:
            response = httpx.request(method, self.observer_url + path, headers=sent, timeout=timeout,
                                     verify=tls.context())
        except httpx.TransportError as exc:
            self.http_log.append({"method": method, "path": path, "authorization": "sent" if "Authorization" in sent
                                  else "none", "status": None, "body": f"no answer: {type(exc).__name__}"})
            # Where the runbook says the observer listens, nothing answered: a fact about the system as deployed.
            raise TargetUnreachable(f"nothing answered {method} {self.observer_url}{path} ({type(exc).__name__}: "
                                    f"{exc})") from None
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
    toxiproxy_log = log_dir / "toxiproxy.log" if log_dir else None
    with open_s3(s3_backend, s3_url) as s3, ToxiproxyServer(toxiproxy_bin, log_path=toxiproxy_log) as toxiproxy:
        yield s3, toxiproxy


def serve_environment(*, quantlab_root: str | None, runbook: str | None, s3_backend: str, s3_url: str | None,
                      toxiproxy_bin: str | None, services: Sequence[str] | None) -> int:
    """`quantlab-chaos env up`: boots everything, prints the endpoints as JSON, and tears down on Ctrl-C/SIGTERM.
    Its folder holds env files with the environment's token and S3 keys, so it goes too, however the command ends
    (but SIGKILL: then the reaper ends the processes, and the folder stays)."""
    import shutil
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
        shutil.rmtree(workdir, ignore_errors=True)  # after the with: every service that wrote into it has stopped
