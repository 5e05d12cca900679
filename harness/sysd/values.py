"""Value syntax several systemd directives share: time spans, sizes, CPU quotas, rlimits, booleans, signals, exit
statuses, and the quoting and C escapes of command lines and Environment= (systemd.syntax(7), systemd.time(7)).

Each parser raises ValueError for what systemd would reject; the spec reader turns that into a UnitError that
names the file and line.
"""
from __future__ import annotations

import math
import os
import re
import resource
import signal
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Time spans, sizes, quotas, limits
# ---------------------------------------------------------------------------------------------

_TIME_UNITS = {
    "ns": 1e-9, "nsec": 1e-9,
    "us": 1e-6, "usec": 1e-6, "µs": 1e-6, "μs": 1e-6,
    "ms": 1e-3, "msec": 1e-3,
    "": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
    "M": 2629800.0, "month": 2629800.0, "months": 2629800.0,
    "y": 31557600.0, "year": 31557600.0, "years": 31557600.0,
}
_TIME_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-zµμ]*)")


def parse_timespan(text: str) -> float:
    """Seconds in a systemd time span (`5`, `5s`, `500ms`, `1min 30s`, `2h`, `infinity` -> math.inf).

    Raises ValueError for anything systemd would reject.
    """
    value = text.strip()
    if value == "infinity":
        return math.inf
    if not value:
        raise ValueError("empty time span")
    total, pos = 0.0, 0
    while pos < len(value):
        match = _TIME_PART.match(value, pos)
        if not match or match.group(2) not in _TIME_UNITS:
            raise ValueError(f"{text!r} is not a time span (examples: 5, 5s, 500ms, '1min 30s', 2h, infinity)")
        total += float(match.group(1)) * _TIME_UNITS[match.group(2)]
        pos = match.end()
        while pos < len(value) and value[pos].isspace():
            pos += 1
    return total


_SIZE_SUFFIX = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5, "E": 1024**6}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTPE]?)B?\Z")


def physical_memory_bytes() -> int:
    """Total RAM, the base of `MemoryMax=N%`."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def parse_memory_limit(text: str) -> int | None:
    """Bytes in a MemoryMax= value (`2G`, `512M`, `1073741824`, `50%`); None for `infinity`."""
    value = text.strip()
    if value == "infinity":
        return None
    if value.endswith("%"):
        percent = float(value[:-1])
        if not 0 <= percent <= 100:
            raise ValueError(f"{text!r} is not a percentage between 0% and 100%")
        return int(physical_memory_bytes() * percent / 100)
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{text!r} is not a size (use bytes, or K, M, G, T with base 1024, or N%, or infinity)")
    return int(float(match.group(1)) * _SIZE_SUFFIX[match.group(2)])


def system_tasks_max() -> int:
    """The base of `TasksMax=N%`: the most tasks the kernel allows (threads-max, and pid_max less pid 0)."""
    limits = []
    for name, less in (("threads-max", 0), ("pid_max", 1)):
        try:
            limits.append(int(Path("/proc/sys/kernel", name).read_text().strip()) - less)
        except (OSError, ValueError):
            continue
    return min(limits, default=4194303)


def parse_tasks_max(text: str) -> int | None:
    """The task limit in a TasksMax= value (`4096`, `15%` of the system's limit); None for `infinity`."""
    value = text.strip()
    if value == "infinity":
        return None
    if value.endswith("%"):
        percent = float(value[:-1])
        if not 0 < percent <= 100:
            raise ValueError(f"{text!r} is not a percentage above 0% and at most 100%")
        return max(1, int(system_tasks_max() * percent / 100))
    if not value.isdigit() or int(value) == 0:
        raise ValueError(f"{text!r} is not a task count (use a whole number above 0, N%, or infinity)")
    return int(value)


def parse_cpu_quota(text: str) -> float:
    """The percent of one CPU in a CPUQuota= value (`80%` -> 80.0; `200%` is two CPUs)."""
    value = text.strip()
    if not value.endswith("%"):
        raise ValueError(f"{text!r} is not a CPU quota (write it as a percentage, e.g. 80%)")
    percent = float(value[:-1])
    if percent <= 0:
        raise ValueError(f"{text!r} must be above 0%")
    return percent


def parse_rlimit(text: str) -> tuple[int, int]:
    """(soft, hard) from `N`, `soft:hard` or `infinity` (resource.RLIM_INFINITY for infinity)."""

    def one(part: str) -> int:
        part = part.strip()
        if part == "infinity":
            return resource.RLIM_INFINITY
        if not part.isdigit():
            raise ValueError(f"{text!r} is not a limit (use N, soft:hard or infinity)")
        return int(part)

    soft, _, hard = text.partition(":")
    return (one(soft), one(hard)) if hard else (one(soft), one(soft))


def parse_boolean(text: str) -> bool:
    """systemd's booleans: 1/yes/y/true/t/on and 0/no/n/false/f/off, in any case."""
    value = text.strip().lower()
    if value in ("1", "yes", "y", "true", "t", "on"):
        return True
    if value in ("0", "no", "n", "false", "f", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use yes or no)")


def parse_signal(text: str) -> signal.Signals:
    """A KillSignal= value: a number, or a name with or without SIG (KeyError/ValueError when there is none)."""
    value = text.strip().upper()
    if value.isdigit():
        return signal.Signals(int(value))
    return signal.Signals[value if value.startswith("SIG") else "SIG" + value]


# ---------------------------------------------------------------------------------------------
# Exit statuses (RestartPreventExitStatus= and its kin)
# ---------------------------------------------------------------------------------------------

# systemd's names for exit statuses (systemd.exec(5), "Process Exit Codes"): libc, LSB, BSD sysexits and systemd's own.
EXIT_STATUS_NAMES = {
    "SUCCESS": 0, "FAILURE": 1,
    "INVALIDARGUMENT": 2, "NOTIMPLEMENTED": 3, "NOPERMISSION": 4, "NOTINSTALLED": 5, "NOTCONFIGURED": 6,
    "NOTRUNNING": 7,
    "USAGE": 64, "DATAERR": 65, "NOINPUT": 66, "NOUSER": 67, "NOHOST": 68, "UNAVAILABLE": 69, "SOFTWARE": 70,
    "OSERR": 71, "OSFILE": 72, "CANTCREAT": 73, "IOERR": 74, "TEMPFAIL": 75, "PROTOCOL": 76, "NOPERM": 77,
    "CONFIG": 78,
    "CHDIR": 200, "NICE": 201, "FDS": 202, "EXEC": 203, "MEMORY": 204, "LIMITS": 205, "OOM_ADJUST": 206,
    "SIGNAL_MASK": 207, "STDIN": 208, "STDOUT": 209, "CHROOT": 210, "IOPRIO": 211, "TIMERSLACK": 212,
    "SECUREBITS": 213, "SETSCHEDULER": 214, "CPUAFFINITY": 215, "GROUP": 216, "USER": 217, "CAPABILITIES": 218,
    "CGROUP": 219, "SETSID": 220, "CONFIRM": 221, "STDERR": 222, "PAM": 224, "NETWORK": 225, "NAMESPACE": 226,
    "NO_NEW_PRIVILEGES": 227, "SECCOMP": 228, "SELINUX_CONTEXT": 229, "PERSONALITY": 230, "APPARMOR": 231,
    "ADDRESS_FAMILIES": 232, "RUNTIME_DIRECTORY": 233, "CHOWN": 235, "SMACK_PROCESS_LABEL": 236, "KEYRING": 237,
    "STATE_DIRECTORY": 238, "CACHE_DIRECTORY": 239, "LOGS_DIRECTORY": 240, "CONFIGURATION_DIRECTORY": 241,
    "NUMA_POLICY": 242, "EXCEPTION": 255,
}


@dataclass(frozen=True)
class ExitStatusSet:
    """Exit statuses and termination signals, as RestartPreventExitStatus= lists them."""

    statuses: frozenset[int] = frozenset()
    signals: frozenset[signal.Signals] = frozenset()

    def matches(self, returncode: int) -> bool:
        """Whether a Popen returncode is in the set: an exit status when >= 0, a signal when negative."""
        if returncode >= 0:
            return returncode in self.statuses
        return any(sig.value == -returncode for sig in self.signals)

    def __or__(self, other: ExitStatusSet) -> ExitStatusSet:
        return ExitStatusSet(self.statuses | other.statuses, self.signals | other.signals)

    def __bool__(self) -> bool:
        return bool(self.statuses or self.signals)

    def __str__(self) -> str:
        return " ".join([*map(str, sorted(self.statuses)), *(sig.name for sig in sorted(self.signals))])


def parse_exit_statuses(text: str) -> ExitStatusSet:
    """The words of one RestartPreventExitStatus= line: exit statuses (0-255, or a name such as EXEC) and signal
    names (SIGABRT or ABRT), separated by spaces; systemd reads a number as an exit status, never as a signal."""
    statuses: set[int] = set()
    signals: set[signal.Signals] = set()
    for word in split_words(text):
        if word in EXIT_STATUS_NAMES:
            statuses.add(EXIT_STATUS_NAMES[word])
        elif word.isdigit():
            if int(word) > 255:
                raise ValueError(f"{word} is not an exit status (they run from 0 to 255)")
            statuses.add(int(word))
        else:
            name = word if word.startswith("SIG") else "SIG" + word
            if name not in signal.Signals.__members__:
                raise ValueError(f"{word!r} is neither an exit status nor a signal name")
            signals.add(signal.Signals[name])
    return ExitStatusSet(frozenset(statuses), frozenset(signals))


# ---------------------------------------------------------------------------------------------
# Quoting and C escapes
# ---------------------------------------------------------------------------------------------

_C_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
              "\\": "\\", '"': '"', "'": "'", "s": " ", ";": ";"}


def _unescape_one(text: str, pos: int) -> tuple[str, int]:
    """Decode the C escape whose backslash is at text[pos-1]; returns (char, next position)."""
    if pos >= len(text):
        raise ValueError("a backslash ends the value")
    char = text[pos]
    if char in _C_ESCAPES:
        return _C_ESCAPES[char], pos + 1
    if char.isspace():
        return char, pos + 1
    for lead, width, base in (("x", 2, 16), ("u", 4, 16), ("U", 8, 16)):
        if char == lead:
            digits = text[pos + 1:pos + 1 + width]
            if len(digits) != width or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError(f"bad escape \\{lead}{digits}")
            return chr(int(digits, base)), pos + 1 + width
    if char in "01234567":
        digits = text[pos:pos + 3]
        if len(digits) != 3 or any(c not in "01234567" for c in digits):
            raise ValueError(f"bad octal escape \\{digits}")
        return chr(int(digits, 8)), pos + 3
    raise ValueError(f"unknown escape \\{char}")


def split_words(text: str) -> list[str]:
    """Words of a command line or Environment= value, unquoted and C-unescaped as systemd does.

    Whitespace separates words; single or double quotes may start anywhere in a word and keep
    whitespace; backslash escapes (\\n, \\t, \\", \\xNN, ...) work inside and outside quotes.
    Raises ValueError on an unclosed quote or an unknown escape.
    """
    words: list[str] = []
    pos, size = 0, len(text)
    while True:
        while pos < size and text[pos].isspace():
            pos += 1
        if pos >= size:
            return words
        word: list[str] = []
        quote = ""
        while pos < size:
            char = text[pos]
            if char == "\\":
                decoded, pos = _unescape_one(text, pos + 1)
                word.append(decoded)
            elif quote:
                pos += 1
                if char == quote:
                    quote = ""
                else:
                    word.append(char)
            elif char in "'\"":
                quote, pos = char, pos + 1
            elif char.isspace():
                break
            else:
                word.append(char)
                pos += 1
        if quote:
            raise ValueError(f"the quote {quote} is never closed")
        words.append("".join(word))
