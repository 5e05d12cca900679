"""Whether a Docker engine answers here; container-backed fakes are skipped with this reason when not."""
from __future__ import annotations

import functools


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


def docker_available() -> bool:
    return docker_status()[0]
