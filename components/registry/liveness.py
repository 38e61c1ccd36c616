"""Whether the process that left a lock or a marker in the registry still runs.

A process is recorded as ``<boot id>:<pid namespace>:<pid>:<start time>``: the kernel's
boot id and the PID namespace's inode say where the pid was issued (this machine, this
container, since this boot), the start time (clock ticks since boot) tells a reused pid
from the original. A pid is only ever looked up where it was issued, so a holder on
another machine or in another container is "cannot tell", and only a TTL frees it.
Linux only (``/proc``); elsewhere nothing is recorded and the TTL rules alone.
"""

from __future__ import annotations

import os
from pathlib import Path


def _pid_namespace() -> str | None:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """Process ``pid``'s start time, or None if no such process runs (a zombie has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22: starttime


def process_id() -> str | None:
    """This process, as recorded in a lock or marker; None where it cannot be told."""
    where, started = _pid_namespace(), _start_time(os.getpid())
    if where is None or started is None:
        return None
    return f"{where}:{os.getpid()}:{started}"


def process_ended(recorded: str | None) -> bool:
    """True only if ``recorded`` (a ``process_id``) was issued in this PID namespace since
    this boot and that process no longer runs; False if it runs or if that cannot be told."""
    parts = (recorded or "").split(":")
    if len(parts) != 4 or not parts[2].isdigit():
        return False
    if _pid_namespace() != f"{parts[0]}:{parts[1]}":
        return False
    return _start_time(int(parts[2])) != parts[3]
