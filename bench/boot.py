"""Part 2, environment boot: moto, toxiproxy and the fake exchange ready as a whole, and each alone.

Each boot runs in a fresh child process (`python -m bench.boot --child WHAT`), as a pytest-xdist worker meets
it: the harness's modules are imported (the plugin does that at start-up), then the clock runs from the first
constructor to "answers". The child boots twice: cold (the first, paying lazy imports such as moto's) and warm
(the second, in the same process). Where a Docker engine answers, the container backends are measured beside the
binaries in the same run (the S3 container against moto, the toxiproxy container against the binary, all three
parts with both containers against the default), after building their images here (harness.fakes.images): once
from nothing on the engine (cold) and once more, which finds them by content (warm).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

from bench.common import Goal, PartResult, fmt, median, ratio, say

BOOT_GOAL_S = 1.5  # the embedded default (moto + toxiproxy + fake exchange), ready
PARTS_ALONE = ("moto", "toxiproxy", "exchange")
# Each container kind and the kind it stands in for.
CONTAINER_KINDS = {"s3_container": "moto", "toxiproxy_container": "toxiproxy", "all_containers": "all"}
CHILD_TIMEOUT_S = 180.0
ROOT = Path(__file__).resolve().parents[1]


def run(repeats: int = 3) -> PartResult:
    part = PartResult("boot")
    from harness.fakes.docker import docker_status

    docker_ok, docker_reason = docker_status()
    images = _image_builds() if docker_ok else {}
    kinds = [*PARTS_ALONE, "all", "all_parallel"] + (list(CONTAINER_KINDS) if docker_ok else [])
    samples: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for _ in range(repeats):  # interleaved, so a noisy moment hits every kind alike
        for kind in kinds:
            samples[kind].append(_child(kind))
    raw: dict[str, Any] = {}
    for kind in kinds:
        runs = samples[kind]
        raw[kind] = {
            "cold_ready_s": median(r["cold"]["ready_s"] for r in runs),
            "warm_ready_s": median(r["warm"]["ready_s"] for r in runs),
            "cold_stop_s": median(r["cold"]["stop_s"] for r in runs),
            "harness_import_s": median(r["import_s"] for r in runs),
            "process_to_ready_s": median(r["process_to_ready_s"] for r in runs),
            "repeats": len(runs),
        }
    alone_sum = sum(raw[kind]["cold_ready_s"] for kind in PARTS_ALONE)
    whole = raw["all"]["cold_ready_s"]
    for kind in PARTS_ALONE:
        say(f"{kind} alone: ready in {fmt(raw[kind]['cold_ready_s'])} s cold, {fmt(raw[kind]['warm_ready_s'])} s warm")
    say(f"all three (shared_parts + FakeBinance): ready in {fmt(whole)} s cold ({ratio(whole, alone_sum) or 0:.2f}x the "
        f"sum of each alone, {fmt(alone_sum)} s); {fmt(raw['all']['process_to_ready_s'])} s from process start")
    say(f"all three started in parallel threads: {fmt(raw['all_parallel']['cold_ready_s'])} s "
        f"({ratio(raw['all_parallel']['cold_ready_s'], whole) or 0:.2f}x the sequential boot)")
    part.ratios = {
        "whole_vs_sum_alone": ratio(whole, alone_sum),
        "whole_vs_goal": ratio(whole, BOOT_GOAL_S),
        "parallel_vs_sequential": ratio(raw["all_parallel"]["cold_ready_s"], whole),
        "cold_vs_warm_whole": ratio(whole, raw["all"]["warm_ready_s"]),
        **{f"{kind}_share_of_whole": ratio(raw[kind]["cold_ready_s"], whole) for kind in PARTS_ALONE},
    }
    if docker_ok:
        raw["images"] = images
        say(f"container images built here: {fmt(images['cold_s'])} s from nothing on the engine "
            f"({', '.join(images['tags'])}), {fmt(images['warm_s'])} s when the engine has them; static binaries "
            f"{fmt(images['binaries_s'])} s (cached)")
        for kind, instead in CONTAINER_KINDS.items():
            key = f"{kind}_vs_{instead}"
            part.ratios[key] = ratio(raw[kind]["cold_ready_s"], raw[instead]["cold_ready_s"])
            part.ratios[f"{kind}_stop_vs_{instead}"] = ratio(raw[kind]["cold_stop_s"], raw[instead]["cold_stop_s"])
            say(f"{kind}: ready in {fmt(raw[kind]['cold_ready_s'])} s cold, {fmt(raw[kind]['warm_ready_s'])} s warm "
                f"({part.ratios[key] or 0:.2f}x {instead}, {fmt(raw[instead]['cold_ready_s'])} s); stops in "
                f"{fmt(raw[kind]['cold_stop_s'])} s ({fmt(raw[instead]['cold_stop_s'])} s)")
    else:
        for kind in ("images", *CONTAINER_KINDS):
            raw[kind] = {"skipped": docker_reason}
        say(f"container backends: skipped ({docker_reason})")
    part.raw = raw
    part.goals = [Goal("boot.embedded_default_ready_s", "embedded default boot (moto + toxiproxy + fake exchange)",
                       whole, BOOT_GOAL_S, "s", "max")]
    slowest = max(PARTS_ALONE, key=lambda kind: raw[kind]["cold_ready_s"])
    part.notes.append(f"the slowest part alone is {slowest} ({part.ratios[f'{slowest}_share_of_whole'] or 0:.0%} of the "
                      "whole); cold minus warm is lazy imports (moto's server) paid once per worker")
    return part


def _image_builds() -> dict[str, Any]:
    """Seconds to build the container images from the cached binaries, with none on the engine and then again."""
    from harness.fakes import images

    started = time.perf_counter()
    images.build_binaries()
    binaries = time.perf_counter() - started
    _remove_our_images()
    started = time.perf_counter()
    tags = [images.ensure_image(name) for name in images.IMAGES]
    cold = time.perf_counter() - started
    images._built.clear()  # as the next process finds them
    started = time.perf_counter()
    for name in images.IMAGES:
        images.ensure_image(name)
    return {"binaries_s": binaries, "cold_s": cold, "warm_s": time.perf_counter() - started, "tags": tags}


def _remove_our_images() -> None:
    import docker

    from harness.fakes import images

    client = docker.from_env(timeout=60)
    try:
        for image in client.images.list(filters={"label": images.IMAGE_LABEL}):
            client.images.remove(image.id, force=True)
    finally:
        client.close()
    images._built.clear()


def _child(kind: str) -> dict[str, Any]:
    spawned = time.time()
    done = subprocess.run([sys.executable, "-m", "bench.boot", "--child", kind], cwd=ROOT, capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT_S)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"booting {kind} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["process_to_ready_s"] = result["cold"]["ready_wall"] - spawned
    return result


# ------------------------------------------------------------------------------------------------ the child


def _makers(kind: str) -> list[Callable[[], AbstractContextManager[Any]]]:
    from harness.environment import shared_parts
    from harness.fakes.binance import FakeBinance
    from harness.fakes.s3 import open_s3
    from harness.fakes.toxiproxy import ToxiproxyServer

    makers: dict[str, list[Callable[[], AbstractContextManager[Any]]]] = {
        "moto": [lambda: open_s3("moto")],
        "toxiproxy": [lambda: ToxiproxyServer()],
        "exchange": [lambda: FakeBinance()],
        "s3_container": [lambda: open_s3("minio")],
        "toxiproxy_container": [lambda: ToxiproxyServer(backend="container")],
        "all_containers": [lambda: open_s3("minio"), lambda: ToxiproxyServer(backend="container"), lambda: FakeBinance()],
        # As the plugin's session fixtures and a test's fake_binance fixture do it: one after the other.
        "all": [lambda: shared_parts("moto"), lambda: FakeBinance()],
        "all_parallel": [lambda: open_s3("moto"), lambda: ToxiproxyServer(), lambda: FakeBinance()],
    }
    return makers[kind]


def _enter(make: Callable[[], AbstractContextManager[Any]]) -> Any:
    return make().__enter__()


def _boot_once(kind: str) -> dict[str, float]:
    makers = _makers(kind)
    with ExitStack() as stack:
        started = time.perf_counter()
        if kind == "all_parallel":
            with ThreadPoolExecutor(len(makers)) as pool:
                futures = [pool.submit(_enter, make) for make in makers]
            failures = [exc for f in futures if (exc := f.exception()) is not None]
            for future in futures:  # every part that did start is stopped, even when another failed
                if future.exception() is None:
                    stack.push(future.result().__exit__)
            if failures:
                raise failures[0]
        else:
            for make in makers:
                stack.enter_context(make())
        ready = time.perf_counter() - started
        ready_wall = time.time()
        stopping = time.perf_counter()
        stack.close()
        stop = time.perf_counter() - stopping
    return {"ready_s": ready, "stop_s": stop, "ready_wall": ready_wall}


def _child_main(kind: str) -> int:
    started = time.perf_counter()
    import harness.environment
    import harness.fakes.binance  # noqa: F401 - imported only to time it, as the pytest plugin imports it first

    imported = time.perf_counter() - started
    cold = _boot_once(kind)
    warm = _boot_once(kind)
    print(json.dumps({"kind": kind, "import_s": imported, "cold": cold, "warm": warm, "pid": os.getpid()}), flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.boot", description="Boot benchmark child (used by bench.run).")
    parser.add_argument("--child", required=True, choices=(*PARTS_ALONE, "all", "all_parallel", *CONTAINER_KINDS))
    raise SystemExit(_child_main(parser.parse_args().child))
