"""What the canary needs on the host: a deadline, the target's node commands, and read access to the archive.

`LocalRunner` runs QuantLab's commands in the checkout with the environment its services get (their env files,
like systemd's EnvironmentFile=) plus the token and S3 settings from the canary's own sources, each in its own
process group so a deadline can end the whole group. `S3ArchiveProbe` reads the archive bucket with boto3 and
explicit timeouts: QuantLab sets none of its own, and a canary must never hang on S3.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from canary import process as process_module
from canary.config import CanaryConfig
from canary.process import CommandNotFound, CommandResult, json_objects, run_process
from quantlab_chaos import procgroup
from quantlab_chaos.envfile import EnvFile

STOP_GRACE_S = 3.0


class Deadline:
    """The hard deadline of one canary run: every wait and every timeout is bounded by what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0

    def bound(self, seconds: float, floor: float = 0.1) -> float:
        """`seconds`, cut to what is left of the deadline (never below `floor`, so a call still fails fast)."""
        return max(floor, min(seconds, self.remaining()))


def command_env(config: CanaryConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """PATH and HOME, then the service env files in order, then the canary's own settings where those are silent."""
    base = os.environ if base is None else base
    env = {"PATH": base.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "HOME": base.get("HOME", "/"), "LANG": "C.UTF-8"}
    for path in config.live.env_files:
        env.update(EnvFile.read(path).values)
    own = {"OBSERVER_TOKEN": config.token, "AUDIT_SPOOL_DIR": str(config.spool_dir)}
    if config.s3 is not None:
        own.update({"RUN_ARCHIVE_S3_ENDPOINT": config.s3.endpoint, "RUN_ARCHIVE_S3_BUCKET": config.s3.bucket,
                    "RUN_ARCHIVE_S3_ACCESS_KEY": config.s3.access_key, "RUN_ARCHIVE_S3_SECRET_KEY": config.s3.secret_key})
    for name, value in own.items():
        if value:
            env.setdefault(name, value)
    return env


OnDeadline = Callable[[subprocess.Popen[str]], None]


class LocalRunner:
    """Runs the target's commands in `root` with `env`, never past the deadline. Callable as a checks `Runner`."""

    def __init__(self, root: Path, env: Mapping[str, str], deadline: Deadline) -> None:
        self.root = root
        self._env = dict(env)
        self.deadline = deadline

    def __repr__(self) -> str:  # the env holds secrets
        return f"LocalRunner({str(self.root)!r}, env=<{len(self._env)} variables>)"

    def __call__(self, argv: Sequence[str], extra_env: Mapping[str, str] | None, timeout: float) -> CommandResult:
        return run_process(argv, cwd=self.root, env={**self._env, **(extra_env or {})}, timeout=self.deadline.bound(timeout))

    def run_watched(self, argv: Sequence[str], extra_env: Mapping[str, str] | None, timeout: float, *,
                    on_stdout_line: Callable[[str], None], on_deadline: OnDeadline) -> CommandResult:
        """Like calling the runner, but hands each stdout line over as it comes, and on the deadline lets
        `on_deadline` stop the command gracefully before the process group is killed."""
        started = time.monotonic()
        env = {**self._env, **(extra_env or {})}
        keeper = process_module.owner
        try:
            process = subprocess.Popen(list(argv), cwd=self.root, env=keeper.child_env(env) if keeper else env,
                                       text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       start_new_session=True)
        except FileNotFoundError as exc:
            raise CommandNotFound(f"Cannot run {argv[0]!r}: not found on PATH. Install it (Node.js 20 for node) and retry.") from exc
        if keeper:
            keeper.watch(process.pid)
        out: list[str] = []
        err: list[str] = []
        pumps = [threading.Thread(target=_pump, args=(process.stdout, out, on_stdout_line), daemon=True),
                 threading.Thread(target=_pump, args=(process.stderr, err, None), daemon=True)]
        for pump in pumps:
            pump.start()
        timed_out = False
        try:
            try:
                process.wait(timeout=self.deadline.bound(timeout))
            except subprocess.TimeoutExpired:
                timed_out = True
                on_deadline(process)
                if process.poll() is None:
                    procgroup.stop(process, STOP_GRACE_S)  # QuantLab ends its run as MANUAL_STOP on SIGTERM
        finally:
            if process.poll() is None:  # an exception (the hard-deadline alarm) on the way: nothing may outlive us
                procgroup.kill(process)
            if keeper:
                keeper.forget(process.pid)
            for pump in pumps:
                pump.join(timeout=5)
        return CommandResult(tuple(argv), None if timed_out else process.returncode, "".join(out), "".join(err),
                             time.monotonic() - started, timed_out)


def _pump(stream: IO[str] | None, sink: list[str], on_line: Callable[[str], None] | None) -> None:
    if stream is None:
        return
    for line in stream:
        sink.append(line)
        if on_line is not None:
            try:
                on_line(line)
            except Exception:  # noqa: BLE001 - a watcher's bug must not lose the command's output
                pass
    stream.close()


class S3ArchiveProbe:
    """HeadObject and GetObject on the archive bucket, with connect/read timeouts and at most two attempts."""

    def __init__(self, endpoint: str, bucket: str, region: str, access_key: str, secret_key: str, *,
                 timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self._region = region
        self._keys = (access_key, secret_key)
        self.timeout = timeout
        self._client: Any = None
        self._bucket_seen = False

    def __repr__(self) -> str:
        return f"S3ArchiveProbe({self.endpoint!r}, bucket={self.bucket!r}, keys=***)"

    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint, region_name=self._region,
                aws_access_key_id=self._keys[0], aws_secret_access_key=self._keys[1],
                config=Config(connect_timeout=self.timeout, read_timeout=self.timeout,
                              retries={"max_attempts": 2, "mode": "standard"}, s3={"addressing_style": "path"}),
            )
        return self._client

    def head(self, key: str) -> dict[str, Any] | None:
        """The object's metadata, or None when it does not exist; any other S3 error is raised."""
        from botocore.exceptions import ClientError

        try:
            found: dict[str, Any] = self.client().head_object(Bucket=self.bucket, Key=key)
            return found
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in {"404", "NoSuchKey", "NotFound"}:
                raise
        # HeadObject answers a bare 404 for a missing bucket too: a wrong bucket is an S3 problem, not a lost archive.
        if not self._bucket_seen:
            self.client().head_bucket(Bucket=self.bucket)
            self._bucket_seen = True
        return None

    def read_json_lines(self, key: str) -> list[dict[str, Any]] | None:
        """The JSON-lines object as dicts, or None when it cannot be read."""
        try:
            body = self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception:  # noqa: BLE001 - the archive check reports S3 errors; here it only means "unknown"
            return None
        return json_objects(body.decode("utf-8", errors="replace"))


def archive_probe(config: CanaryConfig, deadline: Deadline) -> S3ArchiveProbe | None:
    if config.s3 is None:
        return None
    s3 = config.s3
    return S3ArchiveProbe(s3.endpoint, s3.bucket, s3.region, s3.access_key, s3.secret_key,
                          timeout=deadline.bound(config.http_timeout_s, floor=1.0))
