"""Reading processes and the machine from /proc (Linux), without third-party packages.

CPU time: /proc/<pid>/stat gives utime + stime in clock ticks (usually 10 ms), too coarse for a daemon that
spends well under a millisecond per second. The kernel's per-process CPU clock (``clock_getcpuclockid``,
read with ``clock_gettime``) counts the same time in nanoseconds, including threads that have exited; it is
the primary figure and the tick count is kept next to it as a cross-check.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_stat_cpu_ticks(stat_text: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks from the text of /proc/<pid>/stat.

    The command name (field 2) is in parentheses and may itself hold spaces or parentheses, so fields are
    counted from the last ')'; utime and stime are fields 14 and 15.
    """
    rest = stat_text[stat_text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): field n is rest[n - 3].
    return int(rest[11]), int(rest[12])


def parse_status(status_text: str) -> dict[str, int]:
    """Numeric fields of /proc/<pid>/status, sizes in kB as written there (``VmRSS: 1234 kB`` -> 1234)."""
    fields: dict[str, int] = {}
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and re.fullmatch(r"\d+", parts[0]):
            fields[key.strip()] = int(parts[0])
    return fields


def cpu_ns(pid: int) -> int:
    """CPU time (user + system, all threads, also exited ones) of process ``pid`` in nanoseconds."""
    clock = ctypes.c_int()
    if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
        try:
            return time.clock_gettime_ns(clock.value)
        except OSError:
            pass
    utime, stime = stat_cpu_ticks(pid)
    return (utime + stime) * 1_000_000_000 // _CLK_TCK


def stat_cpu_ticks(pid: int) -> tuple[int, int]:
    return parse_stat_cpu_ticks(Path(f"/proc/{pid}/stat").read_text())


@dataclass(frozen=True)
class CpuSample:
    """CPU counters of a set of processes at one moment."""

    at_ns: int
    cpu_ns: dict[int, int]
    ticks: dict[int, int]


def sample_cpu(pids: list[int]) -> CpuSample:
    now = time.monotonic_ns()
    cpu = {pid: cpu_ns(pid) for pid in pids}
    ticks = {pid: sum(stat_cpu_ticks(pid)) for pid in pids}
    return CpuSample(now, cpu, ticks)


def cpu_delta(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """CPU used between two samples: per pid and in total, in ns (clock) and in ns from ticks."""
    out: dict[str, float] = {"wall_ns": after.at_ns - before.at_ns}
    total = total_ticks = 0
    for pid in before.cpu_ns:
        used = after.cpu_ns[pid] - before.cpu_ns[pid]
        used_ticks = after.ticks[pid] - before.ticks[pid]
        out[f"cpu_ns_{pid}"] = used
        total += used
        total_ticks += used_ticks
    out["cpu_ns"] = total
    out["cpu_ns_from_ticks"] = total_ticks * 1_000_000_000 / _CLK_TCK
    return out


def memory(pid: int) -> dict[str, int]:
    """Resident memory of ``pid`` in kB: VmRSS, VmHWM (peak), RssAnon, RssFile, RssShmem and, when readable, Pss."""
    status = parse_status(Path(f"/proc/{pid}/status").read_text())
    out: dict[str, int] = {k: status[k] for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem") if k in status}
    try:
        rollup = parse_status(Path(f"/proc/{pid}/smaps_rollup").read_text())
        if "Pss" in rollup:
            out["Pss"] = rollup["Pss"]
    except OSError:
        pass
    return out


def context_switches(pid: int) -> dict[str, int]:
    """Voluntary (a thread went to sleep: each one is a wake-up later) and involuntary switches of all live
    threads of ``pid``, and the number of threads."""
    voluntary = involuntary = threads = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = parse_status((task / "status").read_text())
        except OSError:
            continue  # the thread ended meanwhile
        threads += 1
        voluntary += status.get("voluntary_ctxt_switches", 0)
        involuntary += status.get("nonvoluntary_ctxt_switches", 0)
    return {"voluntary": voluntary, "involuntary": involuntary, "threads": threads}


def thread_switches(pid: int) -> dict[int, int]:
    """Voluntary context switches of each live thread of ``pid``, by thread id."""
    out: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = parse_status((task / "status").read_text()).get("voluntary_ctxt_switches", 0)
        except OSError:
            continue
    return out


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """CPU time in nanoseconds of each live thread of ``pid`` (the scheduler's own figure, schedstat)."""
    out: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2 :].split()[0] != "Z"


def children(pid: int) -> list[int]:
    """Pids of the live child processes of ``pid``."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def parse_proc_stat_cpu(stat_text: str) -> dict[str, int]:
    """The machine-wide ``cpu`` line of /proc/stat, in clock ticks."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    for line in stat_text.splitlines():
        if line.startswith("cpu "):
            return dict(zip(names, (int(x) for x in line.split()[1:9]), strict=False))
    return {}


def machine_cpu() -> dict[str, int]:
    return parse_proc_stat_cpu(Path("/proc/stat").read_text())


def machine_cpu_use(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Share of all CPUs' time that was busy, and stolen by the hypervisor, between two samples (percent)."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in before}
    total = sum(delta.values())
    if total <= 0:
        return {}
    idle = delta.get("idle", 0) + delta.get("iowait", 0)
    return {
        "busy_percent": round((total - idle) / total * 100, 1),
        "steal_percent": round(delta.get("steal", 0) / total * 100, 2),
    }


def speed_gauge_ms(repeats: int = 3) -> float:
    """Milliseconds for a fixed pure-Python workload (best of ``repeats``): a gauge of how fast this machine's
    CPU is right now. On shared virtual machines it drifts, and every figure of a run drifts with it."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        total = 0
        for i in range(300_000):
            total += i % 7
        text = ",".join(str(i) for i in range(50_000))
        _ = sum(len(part) for part in text.split(","))
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 2)


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages: other work on the machine skews every figure."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    mem_kb = parse_status(Path("/proc/meminfo").read_text()).get("MemTotal", 0)
    return {
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "mosquitto": mosquitto_version(),
        "paho_mqtt": _package_version("paho-mqtt"),
        "clk_tck": _CLK_TCK,
        "executable_is_venv": sys.prefix != sys.base_prefix,
    }


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if Path(candidate).is_file():
            return candidate
    return None


def mosquitto_version() -> str | None:
    binary = mosquitto_binary()
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"mosquitto version (\S+)", out.stdout + out.stderr)
    return match.group(1) if match else None


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_revision(repo: Path) -> dict[str, object] | None:
    """The commit the bench ran on and the tracked files changed since (None outside a git checkout)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    changed = sorted(line[3:] for line in dirty.stdout.splitlines() if line[3:])
    return {"commit": head.stdout.strip(), "changed_files": changed}
