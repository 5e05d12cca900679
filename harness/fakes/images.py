"""The container images of the fakes, built here from source: no image registry needs to answer.

Each image is one static Go binary in an otherwise empty image (`FROM scratch`): toxiproxy-server (the release the
binary backend runs) and gofakes3 (a small S3 server, in place of MinIO when no MinIO image is here). The binaries
are built with `CGO_ENABLED=0 go install` into `.tools/images/bin`, once per pinned version; `netns-exec`
(tools/netns-exec/, see harness/fakes/containers.py) is built the same way. An image is tagged with a hash of its
Dockerfile and binary (`quantlab-chaos/toxiproxy:<hash>`), so it is built once per engine and content, and a
second run finds it. Builds send an in-memory context to the engine and leave no folder behind; a file lock keeps
parallel test processes from building the same thing twice.

Which image a backend runs: the one named by QUANTLAB_CHAOS_TOXIPROXY_IMAGE / QUANTLAB_CHAOS_MINIO_IMAGE, else the
upstream image when the engine already has it, else the local build.

`python -m harness.fakes.images binaries|build` builds the binaries (no Docker needed), or them and the images.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantlab_chaos.errors import MissingToolError, UnreachableError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
IMAGES_DIR = PROJECT_ROOT / ".tools" / "images"
BIN_DIR = IMAGES_DIR / "bin"
REPOSITORY = "quantlab-chaos"
IMAGE_LABEL = "quantlab-chaos.image"  # on every local build: which of ours it is, so older builds can be removed
GO_BUILD_TIMEOUT_S = 900.0
ENGINE_TIMEOUT_S = 120

TOXIPROXY_TAG = "v2.12.0"  # the release tools/install-toxiproxy.sh builds for the binary backend
TOXIPROXY_IMAGE = "ghcr.io/shopify/toxiproxy:2.12.0"
MINIO_IMAGE = "minio/minio:RELEASE.2025-04-22T22-12-26Z"
TOXIPROXY_IMAGE_ENV = "QUANTLAB_CHAOS_TOXIPROXY_IMAGE"
MINIO_IMAGE_ENV = "QUANTLAB_CHAOS_MINIO_IMAGE"


@dataclass(frozen=True)
class GoBinary:
    """A static Go program: a module's command at a version (`go install`), or a local module (`go build`)."""

    name: str
    package: str = ""  # module path of the command, for `go install package@version`
    version: str = ""
    source: Path | None = None  # a local module directory instead
    ldflags: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return BIN_DIR / self.name

    def key(self) -> str:
        """What the binary is built from; a change rebuilds it."""
        if self.source is not None:
            digest = hashlib.sha256()
            for file in sorted(self.source.rglob("*")):
                if file.is_file():
                    digest.update(file.relative_to(self.source).as_posix().encode() + b"\0" + file.read_bytes())
            what = f"{self.source.relative_to(PROJECT_ROOT).as_posix()} {digest.hexdigest()}"
        else:
            what = f"{self.package}@{self.version}"
        return f"{what} ldflags={' '.join(self.ldflags)} CGO_ENABLED=0\n"


@dataclass(frozen=True)
class ImageSpec:
    """One binary in an empty image, run as its entrypoint."""

    name: str
    binary: GoBinary
    entrypoint_args: tuple[str, ...] = ()

    def dockerfile(self) -> str:
        entrypoint = ", ".join(f'"{word}"' for word in (f"/{self.binary.name}", *self.entrypoint_args))
        return (f"FROM scratch\nCOPY {self.binary.name} /{self.binary.name}\nENTRYPOINT [{entrypoint}]\n"
                f'LABEL {IMAGE_LABEL}="{self.name}"\n')


TOXIPROXY_SERVER = GoBinary("toxiproxy-server", "github.com/Shopify/toxiproxy/v2/cmd/server", TOXIPROXY_TAG,
                            ldflags=(f"-X github.com/Shopify/toxiproxy/v2.Version={TOXIPROXY_TAG.removeprefix('v')}",))
GOFAKES3 = GoBinary("gofakes3", "github.com/johannesboyne/gofakes3/cmd/gofakes3", "v1.2.0")
NETNS_EXEC = GoBinary("netns-exec", source=PROJECT_ROOT / "tools" / "netns-exec")
BINARIES = (TOXIPROXY_SERVER, GOFAKES3, NETNS_EXEC)
IMAGES = {
    "toxiproxy": ImageSpec("toxiproxy", TOXIPROXY_SERVER),
    # In memory: every environment has buckets of its own, and nothing outlives the container.
    "s3": ImageSpec("s3", GOFAKES3, ("-backend", "memory")),
}
_built: dict[str, str] = {}  # image name -> tag, in this process


@contextmanager
def _build_lock() -> Iterator[None]:
    """One builder at a time across processes (xdist workers start containers at the same moment)."""
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    with open(IMAGES_DIR / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # held for a build at most, and every build has a timeout
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _go() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    if found is None:
        raise MissingToolError("Building the fakes' container images needs Go, which is not on PATH. Install Go "
                               "(https://go.dev/doc/install, or 'apt-get install golang') and run again, or use "
                               "--s3-backend moto and --toxiproxy-backend binary.")
    return found


def build_binary(binary: GoBinary) -> Path:
    """The static binary, built now unless the one in .tools/images/bin was built from the same key."""
    stamp = BIN_DIR / f".{binary.name}.stamp"
    key = binary.key()
    if binary.path.is_file() and stamp.is_file() and stamp.read_text() == key:
        return binary.path
    if not sys.platform.startswith("linux"):
        raise MissingToolError(f"The {binary.name} image is built on Linux only (a Linux binary for a Linux engine); "
                               f"here, let Docker pull the upstream image.")
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod -buildvcs=false"}
    flags = ["-trimpath", "-ldflags", " ".join(("-s", "-w", *binary.ldflags))]
    with tempfile.TemporaryDirectory(dir=BIN_DIR, prefix=".build-") as tmp:
        if binary.source is not None:
            argv, cwd = [_go(), "build", *flags, "-o", str(Path(tmp) / binary.name), "."], binary.source
            built = Path(tmp) / binary.name
        else:
            argv, cwd = [_go(), "install", *flags, f"{binary.package}@{binary.version}"], PROJECT_ROOT
            env["GOBIN"] = tmp
            built = Path(tmp) / binary.package.rsplit("/", 1)[-1]
        try:
            done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=GO_BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise MissingToolError(f"Building {binary.name} ({' '.join(argv[1:])}) took over {GO_BUILD_TIMEOUT_S:.0f} "
                                   "s; check that the Go module proxy answers, and run again.") from exc
        if done.returncode != 0 or not built.is_file():
            tail = " | ".join(line for line in done.stderr.strip().splitlines()[-4:] if not line.startswith("go: down"))
            raise MissingToolError(f"Building {binary.name} with '{' '.join(argv[1:])}' failed ({tail or done.returncode}); "
                                   "check that Go and its module proxy work here, and run again.")
        os.replace(built, binary.path)
    stamp.write_text(key)
    return binary.path


def build_binaries() -> list[Path]:
    """Every binary the images and containers need, for bootstrap (no Docker engine needed)."""
    with _build_lock():
        return [build_binary(binary) for binary in BINARIES]


def netns_launcher() -> Path:
    """The static `netns-exec`, which a container mounts to join a test process's network namespace."""
    with _build_lock():
        return build_binary(NETNS_EXEC)


def _context(spec: ImageSpec, binary: Path) -> tuple[bytes, str]:
    """The build context as a tar in memory, and the tag its content names."""
    dockerfile = spec.dockerfile().encode()
    payload = binary.read_bytes()
    digest = hashlib.sha256(dockerfile + b"\0" + payload).hexdigest()
    tag = f"{REPOSITORY}/{spec.name}:{digest[:16]}"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data, mode in (("Dockerfile", dockerfile, 0o644), (spec.binary.name, payload, 0o755)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), tag


def _client() -> Any:
    import docker

    return docker.from_env(timeout=ENGINE_TIMEOUT_S)


def present(image: str, client: Any = None) -> bool:
    """Whether the engine has the image already (nothing is pulled)."""
    import docker

    own = client is None
    client = client or _client()
    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        return False
    finally:
        if own:
            client.close()


def ensure_image(name: str) -> str:
    """The tag of our image `name` ("toxiproxy" or "s3") on the engine, built now when it has none of this content."""
    if name in _built:
        return _built[name]
    import docker

    spec = IMAGES[name]
    client = _client()
    try:
        with _build_lock():
            context, tag = _context(spec, build_binary(spec.binary))
            if not present(tag, client):
                try:
                    client.images.build(fileobj=io.BytesIO(context), custom_context=True, tag=tag, rm=True,
                                        forcerm=True, pull=False)
                except (docker.errors.BuildError, docker.errors.APIError) as exc:
                    raise UnreachableError(f"Docker could not build the {name} image {tag} ({str(exc)[:200]}); "
                                           "check the engine with 'docker info'.") from exc
                _remove_older(client, name, tag)
    finally:
        client.close()
    _built[name] = tag
    return tag


def _remove_older(client: Any, name: str, keep: str) -> None:
    """Earlier builds of the same image (another content hash) are removed, unless a container still uses one."""
    import docker

    for image in client.images.list(filters={"label": f"{IMAGE_LABEL}={name}"}):
        if keep in image.tags:
            continue
        try:
            client.images.remove(image.id)
        except docker.errors.APIError:
            pass  # in use, or removed by another process: it is removed later, or by the engine's owner


def toxiproxy_image() -> str:
    """The image the toxiproxy container backend runs (see the module's docstring)."""
    explicit = os.environ.get(TOXIPROXY_IMAGE_ENV, "").strip()
    if explicit:
        return explicit
    if present(TOXIPROXY_IMAGE) or not sys.platform.startswith("linux"):
        return TOXIPROXY_IMAGE
    return ensure_image("toxiproxy")


def s3_image() -> tuple[str, str]:
    """(image, server) for the S3 container backend: server "minio" for a MinIO image, else "gofakes3"."""
    explicit = os.environ.get(MINIO_IMAGE_ENV, "").strip()
    if explicit:
        return explicit, "minio"
    if present(MINIO_IMAGE) or not sys.platform.startswith("linux"):
        return MINIO_IMAGE, "minio"
    return ensure_image("s3"), "gofakes3"


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.fakes.images", description="Builds the fakes' static binaries and images.")
    parser.add_argument("what", choices=("binaries", "build"),
                        help="binaries: the static Go binaries only; build: them and the images, on DOCKER_HOST's engine")
    args = parser.parse_args(argv)
    try:
        started = time.perf_counter()
        paths = build_binaries()
        print(f"images: {len(paths)} static binaries in {BIN_DIR} ({time.perf_counter() - started:.1f} s)", flush=True)
        if args.what == "build":
            for name in IMAGES:
                clock = time.perf_counter()
                print(f"images: {ensure_image(name)} ({time.perf_counter() - clock:.1f} s)", flush=True)
    except (MissingToolError, UnreachableError) as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
