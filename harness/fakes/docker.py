"""Whether a Docker engine answers here; container-backed fakes are skipped with this reason when not."""
from __future__ import annotations

import functools

from quantlab_chaos.errors import MissingToolError


@functools.lru_cache(maxsize=1)
def docker_status() -> tuple[bool, str]:
    """(True, version) when a Docker engine answers within 3 s, else (False, why)."""
    try:
        import docker  # installed with testcontainers
    except ImportError:  # pragma: no cover - testcontainers is a pinned dependency
        return False, "the docker Python package is missing (reinstall with 'make bootstrap')"
    try:
        client = docker.from_env(timeout=3)
        version = client.version().get("Version", "unknown")
        client.close()
    except Exception as exc:  # noqa: BLE001 - any failure means "no engine to use"
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return False, f"no Docker engine answers here ({first_line[:160]})"
    return True, f"Docker {version}"


def require_docker(what: str, instead: str) -> None:
    """Raises MissingToolError (exit 2) saying what to do when no Docker engine answers.

    what: the option and what it runs ("--s3-backend minio runs MinIO"); instead: the option that needs no Docker.
    """
    available, reason = docker_status()
    if not available:
        raise MissingToolError(f"{what} in a Docker container, but {reason}. Start Docker (or point DOCKER_HOST at a "
                               f"running engine) and run again, or use {instead}, which needs no Docker.")
