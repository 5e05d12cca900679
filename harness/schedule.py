"""Scheduling the chaos run from what its scenarios cost: recorded wall time, CPU time and memory per scenario
(`durations.json`, written beside every run's reports).

- Workers by waiting: most of a scenario's time is waiting (restart delays, run lengths, deadlines), so the number of
  workers is what the machine can carry, not its core count: as many as the waits allow (past that the longest
  scenario bounds the run), no more than the cores can feed at the scenarios' recorded CPU use, and no more than
  memory holds at the largest environment's recorded size.
- Longest first, so no worker is left with the longest scenario at the end. An xdist worker always holds its running
  scenario and the next one (it needs the next to tear down), so the longest scenarios start first, each paired with
  a short one (`paired`, `DurationScheduling`).
- Shards: a deterministic, duration-balanced share (longest processing time first, ties by test id), the same on
  every machine given the same durations file.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from quantlab_chaos.errors import ConfigError

DURATIONS_JSON = "durations.json"
BASELINE = Path(__file__).with_name("scenarios") / DURATIONS_JSON  # recorded on the twin; shards use it by default
FORMAT = 1
CPU_HEADROOM = 0.9  # of the cores' time the scenarios may use together
MEMORY_HEADROOM = 0.7  # of the memory available when the run starts
DEFAULT_ENVIRONMENT_BYTES = 512 * 1024 * 1024  # an environment whose size was not recorded


@dataclass(frozen=True)
class Timing:
    """What one scenario cost in a run: its wall time (setup, call and teardown), the CPU time of its test process and
    everything that process started for it, and the memory of that process tree while the scenario ran."""

    wall_s: float
    cpu_s: float = 0.0
    rss_bytes: int = 0


def load(path: Path) -> dict[str, Timing]:
    """The timings in a durations file by test id; {} when it does not exist; ConfigError when it is malformed."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        scenarios = data["scenarios"] if isinstance(data, dict) and data.get("format") == FORMAT else None
        if not isinstance(scenarios, dict):
            raise ValueError(f'expected {{"format": {FORMAT}, "scenarios": {{...}}}}')
        return {str(nodeid): Timing(float(t["wall_s"]), float(t.get("cpu_s", 0.0)), int(t.get("rss_bytes", 0)))
                for nodeid, t in scenarios.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a durations file ({exc}); delete it (the next run writes a new one) or pass "
                          "another with --durations.") from None


def save(path: Path, timings: Mapping[str, Timing]) -> None:
    data = {"format": FORMAT, "scenarios": {nodeid: asdict(t) for nodeid, t in sorted(timings.items())}}
    path.write_text(json.dumps(data, indent=1) + "\n")


def weights(nodeids: Iterable[str], timings: Mapping[str, Timing]) -> dict[str, float]:
    """Each scenario's expected wall time: its recorded one, else the mean of those recorded (1 s with none)."""
    known = [t.wall_s for t in timings.values()]
    mean = sum(known) / len(known) if known else 1.0
    return {nodeid: timings[nodeid].wall_s if nodeid in timings else mean for nodeid in nodeids}


def longest_first(nodeids: Sequence[str], timings: Mapping[str, Timing]) -> list[str]:
    expected = weights(nodeids, timings)
    return sorted(nodeids, key=lambda nodeid: (-expected[nodeid], nodeid))


def paired(order: Sequence[str], workers: int) -> list[str]:
    """`order` (longest first) rearranged for `DurationScheduling`, which starts worker k on positions k and
    k + workers: the k-th longest scenario is paired with the k-th shortest (the longest with the shortest), and the
    rest follow longest first, handed out as workers come free."""
    if workers <= 1 or len(order) < 2 * workers:
        return list(order)
    head, rest = list(order[:workers]), list(order[workers:])
    return head + rest[-workers:][::-1] + rest[:-workers]


def shards(nodeids: Sequence[str], timings: Mapping[str, Timing], count: int) -> list[list[str]]:
    """`count` shards of the scenarios, balanced by expected time (each scenario, longest first, to the least loaded
    shard; the lower index on a tie): the same shards for the same test ids and durations, whatever their order."""
    expected = weights(nodeids, timings)
    loads = [0.0] * count
    out: list[list[str]] = [[] for _ in range(count)]
    for nodeid in longest_first(sorted(set(nodeids)), timings):
        index = min(range(count), key=lambda i: (loads[i], i))
        out[index].append(nodeid)
        loads[index] += expected[nodeid]
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` (1 <= K <= N) as (K, N); ConfigError otherwise."""
    k, slash, n = text.partition("/")
    if slash and k.strip().isdigit() and n.strip().isdigit() and 1 <= int(k) <= int(n):
        return int(k), int(n)
    raise ConfigError(f"--shard {text!r}: write K/N with 1 <= K <= N, e.g. --shard 1/2 for the first of two shards.")


@dataclass(frozen=True)
class WorkerFit:
    workers: int
    why: str


def fit_workers(nodeids: Sequence[str], timings: Mapping[str, Timing], cores: int | None = None,
                available_bytes: int | None = None) -> WorkerFit:
    """How many workers this machine can carry for these scenarios (see the module doc)."""
    cores = cores or os.cpu_count() or 1
    known = [timings[n] for n in nodeids if n in timings]
    if not nodeids:
        return WorkerFit(1, "no scenario to run")
    if not known:
        return WorkerFit(min(cores, len(nodeids)), f"{cores} core(s): no durations recorded yet for these scenarios")
    expected = weights(nodeids, timings)
    total, longest = sum(expected.values()), max(expected.values())
    wall_known = sum(t.wall_s for t in known)
    cpu_share = sum(t.cpu_s for t in known) / wall_known if wall_known else 1.0  # cores one scenario keeps busy
    by_waits = math.ceil(total / longest)
    by_cpu = max(1, math.floor(cores * CPU_HEADROOM / cpu_share)) if cpu_share > 0 else len(nodeids)
    biggest = max((t.rss_bytes for t in known), default=0) or DEFAULT_ENVIRONMENT_BYTES
    available = available_bytes if available_bytes is not None else _available_memory()
    by_memory = max(1, math.floor(available * MEMORY_HEADROOM / biggest)) if available else len(nodeids)
    workers = max(1, min(by_waits, by_cpu, by_memory, len(nodeids)))
    return WorkerFit(workers, f"waits allow {by_waits} (sum {total:.0f} s over the longest {longest:.0f} s), "
                              f"{cores} core(s) carry {by_cpu} at {cpu_share:.2f} CPU each, memory holds {by_memory} "
                              f"at {biggest / 2**20:.0f} MiB each")


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


