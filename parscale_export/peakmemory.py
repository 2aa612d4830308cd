"""Peak memory of a command and every process it starts (Linux), two ways, sampled from /proc.

`peak_anon_bytes`: anonymous resident memory (RssAnon) summed over the process tree. It is what
the processes themselves allocated (tensors, buffers, the interpreter), without what the kernel
may drop under pressure: page cache of the files they read or write, shared libraries, files
they map. A memory cgroup's peak counts page cache too. Sampling can miss a spike shorter than
the interval, and so sees more of them in a longer run.

`peak_rss_bytes`: the kernel's own high-water mark (VmHWM) of the largest process in the tree,
exact whenever it was read after the peak (it only grows), but counting mapped files (shared
libraries: about the same in any two runs of one program; a runtime that maps a bundle's
weights: all of them). Not ru_maxrss: a child's starts at its parent's size when forked.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Measured:
    returncode: int
    seconds: float
    peak_anon_bytes: int  # largest sum of RssAnon over the process tree seen at one sample
    peak_rss_bytes: int  # the largest VmHWM of one process in the tree: exact, mapped files included


def status_bytes(pid: int, field: str) -> int:
    """A size field of /proc/PID/status ("RssAnon", "VmHWM"), 0 once the process is gone."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def anonymous_bytes(pid: int) -> int:
    """RssAnon of one process, 0 once it is gone."""
    return status_bytes(pid, "RssAnon")


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from each process's parent in /proc/PID/stat."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name, in parentheses, may hold spaces
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue += children.get(current, [])
    return found


def run_measured(command: list[str], interval: float = 0.05, timeout: float | None = None, **popen) -> Measured:
    """Run `command` to completion, sampling the tree's memory every `interval` s."""
    start = time.perf_counter()
    process = subprocess.Popen(command, **popen)
    anon = hwm = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal anon, hwm
        while not done.is_set():
            tree = descendants(process.pid)
            anon = max(anon, sum(anonymous_bytes(p) for p in tree))
            hwm = max([hwm, *(status_bytes(p, "VmHWM") for p in tree)])
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    finally:
        done.set()
        sampler.join()
    return Measured(returncode, time.perf_counter() - start, anon, hwm)
