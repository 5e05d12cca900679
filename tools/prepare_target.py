#!/usr/bin/env python3
"""Prepares the real QuantLab snapshot(s) in ../shared/targets/ for the harness's tests.

Each archive is unpacked into a cache folder outside the project
(`${QUANTLAB_CHAOS_CACHE:-${XDG_CACHE_HOME:-~/.cache}/quantlab-chaos}/targets/<archive name>/`), and
`npm ci --ignore-scripts` runs in every folder of it that has a package-lock.json. A stamp in that folder
records the archive's sha256 and the folders installed, so a prepared archive is reused and a changed one is
prepared again from scratch. The work happens in a temporary folder beside the destination, renamed into place
only when complete: an interrupted run never leaves a checkout that looks prepared.

Standard library only: `make prepare-target` runs it before the virtualenv exists.

    python3 tools/prepare_target.py [--archive PATH] [--cache DIR] [--print-root]

Exit 0 when prepared or when there is nothing to prepare (no ../shared/targets/), 2 with one paragraph saying
what to do otherwise, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]
TARGETS = PROJECT.parent / "shared" / "targets"
TARGETS_SHOWN = "../shared/targets/"
STAMP = ".quantlab-chaos-prepared.json"
NPM_CI = ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
NPM_CI_TIMEOUT_S = 900
VERSION_TIMEOUT_S = 30
LOCK_TIMEOUT_S = 3600  # another preparation of the same archive may be running npm ci in five folders
STDERR_TAIL_LINES = 12
PROG = "prepare-target"


class PrepareError(Exception):
    """What went wrong and what to do, in one paragraph; exit 2."""


class Progress:
    """Progress lines: on stdout, or on stderr when stdout carries only the checkout's path (--print-root)."""

    def __init__(self, to_stderr: bool) -> None:
        self.stream = sys.stderr if to_stderr else sys.stdout
        self.open_line = False

    def say(self, text: str) -> None:
        self.end_line()
        print(f"{PROG}: {text}", file=self.stream, flush=True)

    def begin(self, text: str) -> float:
        self.end_line()
        print(f"{PROG}: {text} ...", end="", file=self.stream, flush=True)
        self.open_line = True
        return time.monotonic()

    def done(self, started: float) -> None:
        print(f" done ({time.monotonic() - started:.1f} s)", file=self.stream, flush=True)
        self.open_line = False

    def end_line(self) -> None:
        if self.open_line:
            print(file=self.stream, flush=True)
            self.open_line = False


def default_cache() -> Path:
    explicit = os.environ.get("QUANTLAB_CHAOS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "quantlab-chaos"


def archive_name(archive: Path) -> str:
    return archive.name.removesuffix(".tar.gz")


def find_archives(explicit: str | None) -> list[Path] | None:
    """The archives to prepare: the one given, or every *.tar.gz in ../shared/targets/; None when there is none."""
    if explicit:
        archive = Path(explicit).expanduser().resolve()
        if not archive.is_file():
            raise PrepareError(f"--archive {explicit}: no such file. Pass the path of a QuantLab snapshot "
                               f"(a .tar.gz, such as those in {TARGETS_SHOWN}), or leave --archive out to prepare "
                               f"every archive there.")
        if not archive.name.endswith(".tar.gz"):
            raise PrepareError(f"--archive {explicit}: not a .tar.gz. Pass a QuantLab snapshot packed as .tar.gz.")
        return [archive]
    if not TARGETS.is_dir():
        return None
    return sorted(TARGETS.glob("*.tar.gz")) or None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_stamp(dest: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((dest / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def reusable(dest: Path, digest: str) -> tuple[Path | None, str]:
    """(the prepared checkout, "") when dest holds this archive fully installed; else (None, why not)."""
    if not dest.exists():
        return None, ""
    stamp = read_stamp(dest)
    if stamp is None:
        return None, f"{dest} has no readable {STAMP}; preparing it again from scratch"
    if stamp.get("sha256") != digest:
        return None, (f"the archive changed (sha256 {str(stamp.get('sha256'))[:12]}... -> {digest[:12]}...); "
                      f"preparing it again from scratch")
    root = dest / str(stamp.get("root", "."))
    missing = [folder for folder in stamp.get("installed", []) if not (root / folder / "node_modules").is_dir()]
    if not root.is_dir() or missing:
        return None, f"{', '.join(missing) or root} lost its node_modules; preparing it again from scratch"
    return root.resolve(), ""


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """One preparation per archive at a time (two `make test` at once would otherwise race for the rename)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the rename below still refuses to clobber a finished folder
        yield
        return
    with lock_path.open("w") as handle:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PrepareError(f"another preparation has held {lock_path} for {LOCK_TIMEOUT_S} s. If no "
                                       f"other prepare_target.py is running, delete that file and run again.") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Every member, refusing what could write outside the folder (absolute paths, `..`, links out, devices)."""
    members = tar.getmembers()
    for member in members:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise PrepareError(f"the archive holds {member.name!r}, a path outside its own folder; refusing to "
                               f"unpack it. Use an archive made with `git archive` or plain `tar czf`.")
        if member.isdev() or member.isfifo():
            raise PrepareError(f"the archive holds the device or pipe {member.name!r}; refusing to unpack it.")
        if member.issym() or member.islnk():
            target = PurePosixPath(member.linkname)
            base = path.parent if member.issym() else PurePosixPath()
            if target.is_absolute() or ".." in (base / target).parts:
                raise PrepareError(f"the archive holds the link {member.name!r} -> {member.linkname!r}, which "
                                   f"points outside its own folder; refusing to unpack it.")
    return members


def unpack(archive: Path, into: Path) -> str:
    """Unpacks safely into `into`; returns the checkout's folder relative to it (its single top folder, or ".")."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = check_members(tar)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, members=members, filter="data")
            else:  # Python without extraction filters: the members were checked above
                tar.extractall(into, members=members)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise PrepareError(f"{archive} cannot be unpacked ({exc}); it is damaged or not a .tar.gz. Replace it with "
                           f"a good copy and run again.") from None
    tops = [entry for entry in into.iterdir() if entry.name != STAMP]
    return tops[0].name if len(tops) == 1 and tops[0].is_dir() else "."


def lockfile_folders(root: Path) -> list[str]:
    """Folders (relative to root, sorted) that hold a package-lock.json, not looking inside node_modules."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("node_modules", ".git"))
        if "package-lock.json" in files:
            found.append(Path(folder).relative_to(root).as_posix())
    return sorted(found)


def tool_version(program: str) -> str:
    """`program --version`, or PrepareError saying how to get Node.js."""
    advice = ("Install Node.js 20 with npm (https://nodejs.org/, or `apt-get install nodejs npm`) and run "
              "`python3 tools/prepare_target.py` again; the snapshot's npm packages cannot be installed without it.")
    path = shutil.which(program)
    if path is None:
        raise PrepareError(f"{program} is not on PATH. {advice}")
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PrepareError(f"`{program} --version` did not answer within {VERSION_TIMEOUT_S} s. {advice}") from None
    if done.returncode != 0:
        raise PrepareError(f"`{program} --version` failed (exit {done.returncode}): {tail(done.stderr)}. {advice}")
    return done.stdout.strip()


def tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    kept = [line.strip() for line in (text or "").strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "(nothing on stderr)"


def npm_ci(folder: Path, shown: str) -> None:
    """npm ci in its own process group, killed whole on timeout or interruption."""
    env = dict(os.environ, npm_config_update_notifier="false")
    process = subprocess.Popen(NPM_CI, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=NPM_CI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_group(process)
        _, stderr = process.communicate()
        raise PrepareError(f"npm ci in {shown} did not finish within {NPM_CI_TIMEOUT_S} s and was stopped; npm "
                           f"said: {tail(stderr)}. Check that the npm registry answers (`npm ping`), then run "
                           f"`python3 tools/prepare_target.py` again; nothing half-installed was kept.") from None
    except BaseException:
        kill_group(process)
        raise
    if process.returncode != 0:
        raise PrepareError(f"npm ci in {shown} failed (exit {process.returncode}); npm said: {tail(stderr)}. Fix "
                           f"what it says (no network: check that `npm ping` answers; a lockfile out of date: the "
                           f"snapshot is broken, replace it), then run `python3 tools/prepare_target.py` again; "
                           f"nothing half-installed was kept.")


def kill_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def prepare(archive: Path, cache: Path, progress: Progress) -> Path:
    """The prepared checkout of this archive: reused when its stamp matches, else unpacked and installed anew."""
    parent = cache.resolve() / "targets"
    dest = parent / archive_name(archive)
    if dest.is_relative_to(PROJECT):
        raise PrepareError(f"the cache folder {dest} is inside the project; pass --cache (or set "
                           f"QUANTLAB_CHAOS_CACHE to) a folder outside {PROJECT}.")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepareError(f"cannot create the cache folder {parent} ({exc.strerror}); pass --cache or set "
                           f"QUANTLAB_CHAOS_CACHE to a folder you can write.") from None
    digest = sha256_of(archive)
    root, _ = reusable(dest, digest)  # the common case needs no lock
    if root is None:
        with locked(parent / f".{dest.name}.lock"):
            root, why = reusable(dest, digest)  # another run may have finished it while we waited
            if root is None:
                if why:
                    progress.say(why)
                return build(archive, digest, dest, progress)
    progress.say(f"already prepared: {root} (sha256 {digest[:12]}...)")
    return root


def build(archive: Path, digest: str, dest: Path, progress: Progress) -> Path:
    """Unpacks and installs the archive in a temporary folder beside dest, then renames it into place."""
    started = time.monotonic()
    for stale in dest.parent.glob(f".{dest.name}.partial-*"):  # left by an interrupted run (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    node, npm = tool_version("node"), tool_version("npm")
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would hide the checkout from the user the services run as
    try:
        step = progress.begin(f"unpacking {archive.name} into {dest}")
        top = unpack(archive, work)
        progress.done(step)
        folders = lockfile_folders(work / top)
        for folder in folders:
            shown = "./" if folder == "." else f"{folder}/"
            step = progress.begin(f"npm ci in {shown}")
            npm_ci(work / top / folder, shown)
            progress.done(step)
        stamp = {"archive": archive.name, "sha256": digest, "root": top, "installed": folders,
                 "node": node, "npm": npm, "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (work / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        replace(work, dest)
    finally:
        progress.end_line()
        shutil.rmtree(work, ignore_errors=True)  # gone already when it was renamed into place
    root = (dest / top).resolve()
    progress.say(f"prepared {root} in {time.monotonic() - started:.1f} s")
    return root


def replace(work: Path, dest: Path) -> None:
    """Puts the finished folder in place; an old one is moved aside first, then deleted."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.partial-old-{os.getpid()}")
        dest.rename(old)
    work.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _interrupted(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prepare_target.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", help=f"the snapshot to prepare (default: every *.tar.gz in {TARGETS_SHOWN})")
    parser.add_argument("--cache", help="cache folder (default: $QUANTLAB_CHAOS_CACHE, else "
                                        "${XDG_CACHE_HOME:-~/.cache}/quantlab-chaos); checkouts go in its targets/")
    parser.add_argument("--print-root", action="store_true",
                        help="print only the prepared checkout's path on stdout (progress goes to stderr)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Progress(to_stderr=args.print_root)
    # make and CI stop us with SIGTERM: unwind like Ctrl-C, so npm's group and the partial folder go too
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        archives = find_archives(args.archive)
        if archives is None:
            where = "is absent" if not TARGETS.is_dir() else "holds no *.tar.gz"
            progress.say(f"skipped: {TARGETS_SHOWN} {where} ({TARGETS}); there is no real QuantLab snapshot to prepare")
            return 0
        if args.print_root and len(archives) > 1:
            raise PrepareError(f"{TARGETS_SHOWN} holds {len(archives)} archives "
                               f"({', '.join(a.name for a in archives)}); --print-root prints one checkout, so "
                               f"pass --archive PATH to say which.")
        cache = Path(args.cache).expanduser() if args.cache else default_cache()
        roots = [prepare(archive, cache, progress) for archive in archives]
    except PrepareError as exc:
        progress.end_line()
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress.end_line()
        print(f"{PROG}: interrupted; nothing half-prepared was kept. Run it again to prepare the snapshot.",
              file=sys.stderr)
        return 130
    except OSError as exc:
        progress.end_line()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: {where}{exc.strerror or exc}. Check the path, its permissions and the free disk space, "
              f"then run again.", file=sys.stderr)
        return 2
    if args.print_root:
        print(roots[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
