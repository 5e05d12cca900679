"""S3 for the target: moto's threaded server (default), an S3 server in a container, or any endpoint by URL.

The container backend (`--s3-backend minio`) runs MinIO when its image is here (or QUANTLAB_CHAOS_MINIO_IMAGE names
one), else gofakes3, a small S3 server built into an image here (harness.fakes.images). It sits on the caller's
network as toxiproxy's container does (harness.fakes.containers), on a port from the OS.

Each backend is a context manager that starts, waits until ready, exposes `endpoint_url` and credentials,
and always cleans up. `Bucket` gives a test its own bucket with helpers to list, head and read objects.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import ClientError

from harness.fakes import containers
from harness.fakes.docker import docker_status
from harness.fakes.images import s3_image
from harness.ports import free_port
from quantlab_chaos import tls
from quantlab_chaos.errors import ConfigError, UnreachableError
from quantlab_chaos.waiting import wait_until

BACKENDS = ("moto", "minio", "url")
SHUTDOWN_POLL_S = 0.1  # how often moto's server loop looks whether it is asked to stop (socketserver's default: 0.5)
START_TIMEOUT_S = 60.0  # the container backend's: an engine on vfs storage starts a container in about a second
_CLIENT_CONFIG = Config(
    connect_timeout=5,
    read_timeout=15,
    retries={"max_attempts": 2, "mode": "standard"},
    s3={"addressing_style": "path"},
)


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"

    @classmethod
    def random(cls) -> S3Credentials:
        """Fresh keys per environment, so a leak scan can look for exactly these values."""
        return cls(access_key="AKQL" + secrets.token_hex(8).upper(), secret_key=secrets.token_urlsafe(30))


class S3Server(AbstractContextManager["S3Server"]):
    """An S3 endpoint with credentials; subclasses start and stop the server behind it."""

    name = "s3"

    def __init__(self, credentials: S3Credentials) -> None:
        self.credentials = credentials
        self.endpoint_url = ""

    def client(self) -> Any:
        """A boto3 S3 client with explicit timeouts and path-style addressing."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.credentials.access_key,
            aws_secret_access_key=self.credentials.secret_key,
            region_name=self.credentials.region,
            config=_CLIENT_CONFIG,
        )

    def bucket(self, name: str | None = None) -> Bucket:
        """A new bucket on this server (a unique name unless given), created now."""
        bucket = Bucket(self, name or f"ql-{uuid.uuid4().hex[:20]}")
        bucket.create()
        return bucket

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden
        pass


class MotoS3(S3Server):
    """moto's S3 app on 127.0.0.1 and a port from the OS, served by werkzeug's threaded server in this process.

    moto's own server (`ThreadedMotoServer`) puts its dispatcher in front, which works out each request's service
    from its host, signature or body, a third of moto's CPU per request here; this server serves S3 alone."""

    name = "moto"

    def __init__(self, credentials: S3Credentials | None = None) -> None:
        super().__init__(credentials or S3Credentials.random())
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MotoS3:
        from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise

        self._server = make_server("127.0.0.1", 0, create_backend_app("s3"), threaded=True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": SHUTDOWN_POLL_S},
                                        name="moto-s3", daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.endpoint_url = f"http://{host}:{port}"
        try:
            wait_until(self._answers, timeout=10, what=f"moto S3 server at {self.endpoint_url}")
        except BaseException:
            self.close()
            raise
        return self

    def _answers(self) -> bool:
        return httpx.get(self.endpoint_url + "/", timeout=2, verify=tls.context()).status_code < 500

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class MinioS3(S3Server):
    """An S3 server in a container through testcontainers (MinIO, or gofakes3 without a MinIO image); needs Docker.

    image: None picks one (harness.fakes.images.s3_image); server: "minio" or "gofakes3", how to run that image.
    """

    name = "minio"

    def __init__(self, image: str | None = None, server: str = "minio") -> None:
        super().__init__(S3Credentials.random())
        self.image = image
        self.server = server
        self.source = ""
        self._container: Any = None

    def __enter__(self) -> MinioS3:
        available, reason = docker_status()
        if not available:
            raise UnreachableError(f"The MinIO backend needs Docker, but {reason}. Use --s3-backend moto here.")
        try:
            if self.image is None:
                self.image, self.server = s3_image()
            self._start(containers.placement())
        except BaseException:
            self.close()  # `with` calls __exit__ only after __enter__ returned
            raise
        return self

    def _command(self, address: str) -> list[str]:
        if self.server == "gofakes3":
            return ["-host", address]  # gofakes3 takes any keys: these are still the env files' and the leak scan's
        return ["server", "/data", "--address", address, "--console-address", f"127.0.0.1:{free_port()}"]

    def _start(self, where: str) -> None:
        env = {"MINIO_ROOT_USER": self.credentials.access_key, "MINIO_ROOT_PASSWORD": self.credentials.secret_key}
        if where == containers.BRIDGE:
            self._container = containers.new_container(str(self.image), self._command(":9000"), where, env=env,
                                                       exposed_ports=(9000,))
        else:
            port = free_port()
            self._container = containers.new_container(str(self.image), self._command(f"127.0.0.1:{port}"), where,
                                                       env=env)
        containers.start(self._container, f"The S3 container ({self.server}, {self.image})",
                         f"check that Docker can run {self.image}, or use --s3-backend moto.")
        if where == containers.BRIDGE:
            host = self._container.get_container_host_ip()
            # testcontainers says "localhost" for a local engine; the toxiproxy container resolves that name on its
            # own (perhaps to ::1), so the upstream it is given is the address the published port surely has.
            host = "127.0.0.1" if host == "localhost" else host
            self.endpoint_url = f"http://{host}:{self._container.get_exposed_port(9000)}"
        else:
            self.endpoint_url = f"http://127.0.0.1:{port}"
        self.source = f"{self.server} in container {self.image} ({where})"
        try:
            wait_until(self._live_or_dead, timeout=START_TIMEOUT_S, what=f"{self.server} at {self.endpoint_url}")
        except TimeoutError:
            pass  # said below, with the container's own words
        if not self._live():
            raise UnreachableError(
                f"The S3 container ({self.source}) did not answer at {self.endpoint_url} within {START_TIMEOUT_S:.0f} s "
                f"(its output: {containers.logs(self._container, 300) or 'none'}); use --s3-backend moto.")

    def _live_or_dead(self) -> bool:
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        return wrapped.status in ("exited", "dead") or self._live()

    def _live(self) -> bool:
        path = "/minio/health/live" if self.server == "minio" else "/"
        try:
            return httpx.get(self.endpoint_url + path, timeout=2, verify=tls.context()).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        if self._container is not None:
            containers.remove(self._container)
            self._container = None


class ExternalS3(S3Server):
    """Any S3 endpoint by URL; keys from QUANTLAB_CHAOS_S3_ACCESS_KEY / QUANTLAB_CHAOS_S3_SECRET_KEY."""

    name = "url"

    def __init__(self, endpoint_url: str, credentials: S3Credentials | None = None) -> None:
        if credentials is None:
            access = os.environ.get("QUANTLAB_CHAOS_S3_ACCESS_KEY", "")
            secret = os.environ.get("QUANTLAB_CHAOS_S3_SECRET_KEY", "")
            if not access or not secret:
                raise ConfigError(
                    "The 'url' S3 backend needs credentials: set QUANTLAB_CHAOS_S3_ACCESS_KEY and "
                    "QUANTLAB_CHAOS_S3_SECRET_KEY (and QUANTLAB_CHAOS_S3_REGION if not us-east-1)."
                )
            credentials = S3Credentials(access, secret, os.environ.get("QUANTLAB_CHAOS_S3_REGION", "us-east-1"))
        super().__init__(credentials)
        self.endpoint_url = endpoint_url.rstrip("/")

    def __enter__(self) -> ExternalS3:
        try:
            httpx.get(self.endpoint_url + "/", timeout=5, verify=tls.context())
        except httpx.HTTPError as exc:
            raise UnreachableError(
                f"The S3 endpoint {self.endpoint_url} does not answer ({exc}). Check the URL given with "
                "--s3-url and that the server is up, or use --s3-backend moto."
            ) from exc
        return self


def open_s3(backend: str = "moto", url: str | None = None) -> S3Server:
    """The S3 server for a backend name (`moto`, `minio` or `url`); use it as a context manager."""
    if backend == "moto":
        return MotoS3()
    if backend == "minio":
        return MinioS3()
    if backend == "url":
        if not url:
            raise ConfigError("--s3-backend url needs --s3-url http://host:port (or QUANTLAB_CHAOS_S3_URL).")
        return ExternalS3(url)
    raise ConfigError(f"Unknown S3 backend {backend!r}: choose one of {', '.join(BACKENDS)}.")


class Bucket:
    """One bucket on an S3 server, with the reads a scenario asserts on."""

    def __init__(self, server: S3Server, name: str) -> None:
        self.server = server
        self.name = name
        self._client = server.client()

    def create(self) -> None:
        self._client.create_bucket(Bucket=self.name)

    def list_keys(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.name, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def head(self, key: str) -> dict[str, Any] | None:
        """The object's metadata, or None when it does not exist."""
        try:
            found: dict[str, Any] = self._client.head_object(Bucket=self.name, Key=key)
            return found
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise

    def read_bytes(self, key: str) -> bytes:
        body: bytes = self._client.get_object(Bucket=self.name, Key=key)["Body"].read()
        return body

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def read_lines(self, key: str) -> list[Any]:
        return [json.loads(line) for line in self.read_bytes(key).decode().splitlines() if line.strip()]

    def put(self, key: str, body: bytes | str) -> None:
        self._client.put_object(Bucket=self.name, Key=key, Body=body.encode() if isinstance(body, str) else body)

    def snapshot(self, prefix: str = "") -> dict[str, str]:
        """Key -> ETag for every object under prefix: compare two snapshots to prove nothing was lost."""
        result: dict[str, str] = {}
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.name, Prefix=prefix):
            result.update({item["Key"]: item["ETag"] for item in page.get("Contents", [])})
        return result

    def delete(self) -> None:
        """Removes every object, then the bucket; missing is fine."""
        try:
            keys = self.list_keys()
            for start in range(0, len(keys), 1000):
                chunk = [{"Key": key} for key in keys[start : start + 1000]]
                self._client.delete_objects(Bucket=self.name, Delete={"Objects": chunk})
            self._client.delete_bucket(Bucket=self.name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
                raise


@contextmanager
def temporary_bucket(server: S3Server) -> Iterator[Bucket]:
    """A bucket that exists for the `with` block and is deleted afterwards."""
    bucket = server.bucket()
    try:
        yield bucket
    finally:
        bucket.delete()
