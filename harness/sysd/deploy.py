"""Fitting a production unit onto a checkout: QuantLab's units are written for `/home/deploy/quantlab-backend`,
`/etc/quantlab/*.env` and `/usr/bin/node`; the harness boots them from a checkout, with env files it writes.

`rewrite_for_checkout` makes those substitutions and records every one of them in `ServiceSpec.rewrites`, so the
report shows what was changed rather than hiding it; `load_service` is the usual way to get a bootable spec.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from harness.sysd.spec import EnvFileRef, ExecCommand, OutputSpec, Rewrite, ServiceSpec
from harness.sysd.unitfile import parse_unit
from quantlab_chaos.envfile import where
from quantlab_chaos.errors import UnitError
from quantlab_chaos.redact import REDACTED, is_secret_name

DEPLOY_ROOT = "/home/deploy/quantlab-backend"
ENV_DIR = "/etc/quantlab"
RESOLVABLE_BINARIES = ("/usr/bin/node", "/usr/bin/python3", "/usr/bin/env")

EnvFileMap = Mapping[str, "os.PathLike[str] | str"] | Callable[[Path], "os.PathLike[str] | str | None"]


def _replace_root(text: str, root: str, checkout: str) -> str:
    """`text` with `root` replaced where it ends a path component (not inside `/home/deploy/quantlab-backend-old`)."""
    return re.sub(re.escape(root.rstrip("/")) + r"(?=/|$|[^\w.-])", lambda _m: checkout, text)


def _env_file_target(ref: EnvFileRef, env_file_map: EnvFileMap) -> Path | None:
    """The harness's file for a production env file: looked up by full path, then by file name."""
    if callable(env_file_map):
        target = env_file_map(ref.path)
    else:
        target = env_file_map.get(str(ref.path), env_file_map.get(ref.path.name))
    return Path(target) if target is not None else None


def rewrite_for_checkout(
    spec: ServiceSpec,
    *,
    checkout: str | os.PathLike[str],
    deploy_root: str = DEPLOY_ROOT,
    env_file_map: EnvFileMap | None = None,
    search_path: str | None = None,
    env_dir: str = ENV_DIR,
    resolve_binaries: Iterable[str] = RESOLVABLE_BINARIES,
) -> ServiceSpec:
    """`spec` with the deploy root replaced by `checkout`, `/etc/quantlab/*.env` replaced by the
    harness's env files, and missing `/usr/bin/node|python3|env` replaced by the binary on PATH.

    `env_file_map` maps an env file's full path or its file name (`replayd.env`) to the file the
    harness wrote, or is a callable taking the production path. Binaries in `resolve_binaries` that
    do not exist are looked up on `search_path` (default: $PATH). Every change is in `.rewrites`.
    """
    resolvable = frozenset(resolve_binaries)
    root = deploy_root.rstrip("/")
    target = str(Path(checkout).resolve())
    rewrites: list[Rewrite] = list(spec.rewrites)

    def rebase(field_name: str, text: str) -> str:
        changed = _replace_root(text, root, target)
        if changed != text:
            rewrites.append(Rewrite(field_name, text, changed, "deploy root -> checkout"))
        return changed

    def command(label: str, cmd: ExecCommand) -> ExecCommand:
        argv = tuple(rebase(f"{label}[{index}]", word) for index, word in enumerate(cmd.argv))
        rebased = dataclasses.replace(cmd, path=_replace_root(cmd.path, root, target), argv=argv)
        if "@" in cmd.prefixes and rebased.path != cmd.path:
            rewrites.append(Rewrite(f"{label}.path", cmd.path, rebased.path, "deploy root -> checkout"))
        return _resolve_binary(label, rebased, rewrites, search_path, resolvable)

    def commands(label: str) -> tuple[ExecCommand, ...]:
        return tuple(command(label, cmd) for cmd in getattr(spec, label))

    workdir = spec.working_directory
    if workdir is not None:
        workdir = Path(rebase("WorkingDirectory", str(workdir)))
    env_files = tuple(_rewrite_env_file(ref, root, target, env_file_map, env_dir, spec, rewrites)
                      for ref in spec.environment_files)
    environment = tuple((name, _rebase_env_value(name, value, root, target, rewrites))
                        for name, value in spec.environment)

    def output(label: str, given: OutputSpec | None) -> OutputSpec | None:
        if given is None or given.path is None:
            return given
        return OutputSpec(given.kind, Path(rebase(label, str(given.path))))

    standard_output = output("standard_output", spec.standard_output)
    standard_error = output("standard_error", spec.standard_error)
    return dataclasses.replace(
        spec,
        exec_start=commands("exec_start"),
        exec_start_pre=commands("exec_start_pre"),
        exec_start_post=commands("exec_start_post"),
        exec_stop=commands("exec_stop"),
        exec_stop_post=commands("exec_stop_post"),
        working_directory=workdir,
        environment_files=env_files,
        environment=environment,
        standard_output=standard_output,
        standard_error=standard_error,
        rewrites=tuple(rewrites),
    )


def _rebase_env_value(name: str, value: str, root: str, target: str, rewrites: list[Rewrite]) -> str:
    changed = _replace_root(value, root, target)
    if changed != value:
        shown = (REDACTED, REDACTED) if is_secret_name(name) else (value, changed)
        rewrites.append(Rewrite(f"Environment {name}", shown[0], shown[1], "deploy root -> checkout"))
    return changed


def _rewrite_env_file(ref: EnvFileRef, root: str, target: str, env_file_map: EnvFileMap | None, env_dir: str,
                      spec: ServiceSpec, rewrites: list[Rewrite]) -> EnvFileRef:
    if str(ref.path.parent) == env_dir.rstrip("/") and ref.path.suffix == ".env":
        replacement = _env_file_target(ref, env_file_map) if env_file_map is not None else None
        if replacement is None:
            raise UnitError(f"{where(spec.unit.source, ref.line)}: EnvironmentFile={ref.path} has no env file "
                            f"written by the harness. Add {ref.path.name!r} (or its full path) to env_file_map.")
        rewrites.append(Rewrite("EnvironmentFile", str(ref.path), str(replacement), "harness env file"))
        return dataclasses.replace(ref, path=replacement)
    rebased = _replace_root(str(ref.path), root, target)
    if rebased != str(ref.path):
        rewrites.append(Rewrite("EnvironmentFile", str(ref.path), rebased, "deploy root -> checkout"))
        return dataclasses.replace(ref, path=Path(rebased))
    return ref


def _resolve_binary(label: str, cmd: ExecCommand, rewrites: list[Rewrite], search_path: str | None,
                    resolvable: frozenset[str]) -> ExecCommand:
    if cmd.path not in resolvable or os.access(cmd.path, os.X_OK):
        return cmd
    found = shutil.which(Path(cmd.path).name, path=search_path if search_path is not None else os.environ.get("PATH"))
    if found is None:
        return cmd  # the start fails with 203/EXEC and says which binary is missing
    rewrites.append(Rewrite(f"{label}.path", cmd.path, found, f"{cmd.path} does not exist here; using PATH"))
    return cmd.with_path(found)


def load_service(
    unit_path: str | os.PathLike[str],
    *,
    checkout: str | os.PathLike[str],
    env_file_map: EnvFileMap | None = None,
    deploy_root: str = DEPLOY_ROOT,
    search_path: str | None = None,
) -> ServiceSpec:
    """parse_unit + ServiceSpec.from_unit + rewrite_for_checkout, the usual way to get a bootable spec."""
    spec = ServiceSpec.from_unit(parse_unit(unit_path))
    return rewrite_for_checkout(spec, checkout=checkout, deploy_root=deploy_root, env_file_map=env_file_map,
                                search_path=search_path)
