"""Whether a lock's or a marker's process still runs: only ever judged where its pid was
issued (this boot, this PID namespace), and a reused pid is another process."""

from __future__ import annotations

import subprocess
import sys

from components.registry.liveness import process_ended, process_id


def test_this_process_runs_and_a_finished_one_has_ended() -> None:
    me = process_id()
    assert me is not None and me.split(":")[2].isdigit()
    assert not process_ended(me)
    child = subprocess.run(
        [sys.executable, "-c", "from components.registry.liveness import process_id; "
         "print(process_id())"], capture_output=True, text=True, check=True)
    recorded = child.stdout.strip()
    assert recorded.rsplit(":", 2)[0] == me.rsplit(":", 2)[0]  # same boot and namespace
    assert process_ended(recorded)


def test_a_reused_pid_or_another_machine_is_judged_correctly() -> None:
    boot, ns, pid, started = process_id().split(":")
    assert process_ended(f"{boot}:{ns}:{pid}:{int(started) + 1}")  # same pid, another start
    assert not process_ended(f"another-boot:{ns}:{pid}:{started}")  # cannot tell: not ended
    assert not process_ended(f"{boot}:{int(ns) + 1}:999999999:1")  # another container
    for malformed in (None, "", "garbage", "a:b:c", "a:b:pid:1"):
        assert not process_ended(malformed)
