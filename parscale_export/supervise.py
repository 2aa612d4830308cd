"""Run a command in a process session of its own and leave nothing behind when it ends.

Ctrl-C in a terminal signals the whole foreground process group. Ray's own processes (GCS,
raylet, workers) would get it too and die before the server could stop its replicas cleanly,
leaving orphans that take a minute to notice. So the server runs as a child in a new session:
it alone gets a SIGTERM, forwarded from here, stops the application and its Ray instance, and
whatever is still alive in its process group afterwards is ended here. Standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

GRACE_S = 60.0  # a clean stop of Ray Serve takes a few seconds; after this the group is killed
SWEEP_S = 10.0
PR_SET_PDEATHSIG = 1


def run_in_own_session(command: Sequence[str]) -> tuple[int, bool]:
    """Run `command` until it exits; SIGINT or SIGTERM here becomes one SIGTERM to it. Returns
    its exit code and whether a signal asked it to stop. Its process group is swept afterwards."""
    child = subprocess.Popen(list(command), start_new_session=True, preexec_fn=_die_with_parent)
    asked_at: list[float] = []

    def forward(_signum: int, _frame) -> None:
        if not asked_at:
            asked_at.append(time.monotonic())
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (code := child.poll()) is None:
            if asked_at and time.monotonic() - asked_at[0] > GRACE_S:
                _signal_group(child.pid, signal.SIGKILL)
            time.sleep(0.2)
    finally:
        sweep_group(child.pid)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code, bool(asked_at)


def sweep_group(pgid: int) -> None:
    """SIGTERM to every process left in group `pgid`, SIGKILL to those still there after SWEEP_S."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + SWEEP_S
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return
        time.sleep(0.2)
    _signal_group(pgid, signal.SIGKILL)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of group `pgid`, read from /proc: zombies whose parent is gone
    wait for init to reap them and hold nothing."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


def _signal_group(pgid: int, signum: int) -> bool:
    """Whether any process of the group was there to receive `signum` (0 only asks)."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _die_with_parent() -> None:
    """In the child: if this supervisor is killed outright, the kernel sends the child SIGTERM."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
