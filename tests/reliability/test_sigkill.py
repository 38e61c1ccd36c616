"""Crash safety under SIGKILL (issue 12, item 7): no ``finally``, no cleanup, as when the
kernel or an operator kills a run. Each case runs a real ``nestad`` command in a
subprocess (``sigkill_driver.py``), kills it at seeded points, then checks what is left and
that the next run finishes the job: training resumes to bitwise-identical weights, an
ingestion leaves the previous dataset version intact, a registration leaves no
half-registered version, and a promotion lock dies with its holder.

The kill points come from a seeded RNG; progress markers are polled (never fixed sleeps)
with generous timeouts, so a loaded machine makes the tests slower, not flaky.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from synthetic_support import REPO, tiny_overrides, write_dataset

DRIVER = Path(__file__).with_name("sigkill_driver.py")
SEED = 20_261_201  # the kill points' RNG
TIMEOUT_S = 240.0  # per subprocess; a loaded 2-core machine is slow, never this slow


class Child:
    """A command running in a child of the fork server; its output goes to ``log``."""

    def __init__(self, server: ForkServer, pid: int, marker: Path, log: Path) -> None:
        self.server, self.pid, self.marker, self.log = server, pid, marker, log

    def running(self) -> bool:
        try:  # a child that ended is a zombie until the server reaps it
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, IndexError):
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.is_file() else ""

    def finish(self) -> str:
        """Wait for a run that must succeed; its output."""
        status = self.server.wait(self)
        assert status == 0, f"exit {status}:\n{self.output()}"
        return self.output()

    def killed(self) -> str:
        """Wait until the run reaches its kill point; SIGKILL it if it paused there. Returns
        the marker's text (where it died)."""
        deadline = time.monotonic() + TIMEOUT_S
        while self.running() and time.monotonic() < deadline:
            if self.marker.is_file() and self.marker.read_text().startswith("paused"):
                os.kill(self.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        status = self.server.wait(self)
        assert status == -signal.SIGKILL, f"exit {status}, not SIGKILL:\n{self.output()}"
        assert self.marker.is_file(), self.output()
        return self.marker.read_text()


class ForkServer:
    """``sigkill_driver.py --serve``: nestad, torch and MLflow imported once, a forked child
    per command (a fresh interpreter would spend seconds importing for every kill)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(DRIVER), "--serve"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)), text=True)
        self._answer(TIMEOUT_S)

    def _answer(self, timeout: float) -> dict[str, Any]:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"the fork server did not answer in {timeout:g}s")
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"the fork server ended (exit {self.proc.wait()})")
        return json.loads(line)

    def start(self, marker: Path, kill: str, args: list[object], cwd: Path) -> Child:
        marker.unlink(missing_ok=True)
        log = marker.with_suffix(".log")
        log.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        request = {"marker": str(marker), "kill": kill, "args": [str(a) for a in args],
                   "cwd": str(cwd), "env": env, "log": str(log)}
        self.proc.stdin.write(json.dumps({"run": request}) + "\n")
        self.proc.stdin.flush()
        return Child(self, self._answer(TIMEOUT_S)["pid"], marker, log)

    def wait(self, child: Child) -> int:
        self.proc.stdin.write(json.dumps({"wait": child.pid}) + "\n")
        self.proc.stdin.flush()
        try:
            return self._answer(TIMEOUT_S)["status"]
        except TimeoutError:
            os.kill(child.pid, signal.SIGKILL)
            self._answer(TIMEOUT_S)
            pytest.fail(f"{child.marker.stem} did not end in {TIMEOUT_S:g}s:\n{child.output()}")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def forks() -> Iterator[ForkServer]:
    server = ForkServer()
    yield server
    server.close()


def _assert_equal(a: Any, b: Any, where: str = "") -> None:
    """Equal, tensors bit for bit (``torch.equal``), recursing into dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} != {b.keys()}"
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# --- training ---------------------------------------------------------------------------

STEPS, EVERY = 9, 3  # three checkpoints; every RNG stream and schedule is exercised
CLOCK = ("seconds", "images_per_s")  # wall-clock figures in the history: not state


def _params_file(folder: Path, dotted: dict[str, Any]) -> Path:
    """A params file holding ``dotted`` keys (the repo's params.yaml is not needed)."""
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        *sections, name = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=True))
    return path


def _train_args(source: Path, out: Path) -> list[object]:
    """``nestad train --resume`` of the restoration detector with every random stream on:
    data order, augmentation, synthetic anomalies, D re-initialisation (global RNG),
    precise BN, the per-step LR decay and the checkpoint choice."""
    params = _params_file(source.parent, tiny_overrides(**{
        "data.source": str(source), "data.layout": "industrial", "data.image_size": 16,
        "model.name": "nested_restore", "model.seg_width": 4, "model.seg_depth": 2,
        "train.steps": STEPS, "train.eval_every": EVERY,
        "train.lr_decay_from": 0.5, "train.select_on": "val_recon", "train.threads": 1,
        "train.compile": False, "train.reinit_d_below": 0.6, "train.augment.hflip": True,
        "train.augment.rot90": True, "train.augment.shift": 0.1,
        "train.augment.brightness": 0.1, "train.augment.contrast": 0.1,
    }))
    return ["train", "-p", params, "-o", out, "--resume"]


def _train_state(out: Path) -> dict[str, Any]:
    """Everything training leaves that must not depend on interruptions."""
    from components.detector.train import load_checkpoint

    last = load_checkpoint(out / "checkpoints" / "last.pt")
    for epoch in last["history"]:
        for key in CLOCK:
            epoch.pop(key)
    history = json.loads((out / "train_history.json").read_text())
    return {"last": last, "best": load_checkpoint(out / "checkpoints" / "best.pt"),
            "best_epoch": history["best_epoch"],
            "epochs": [{k: v for k, v in e.items() if k not in CLOCK} for e in history["epochs"]]}


def _kill_points(rng: random.Random) -> list[str]:
    """Five kill points in run order: three at random optimiser steps (mid-interval or on
    its last step, before its checkpoint), two inside checkpoint writes (half a temp file;
    the whole temp file, not yet renamed)."""
    steps = sorted(rng.sample(range(1, STEPS), 5))
    kinds = ["pause-step"] * 3 + ["save-mid", "save-replace"]
    rng.shuffle(kinds)
    return [f"{kind}:{step}" for kind, step in zip(kinds, steps, strict=True)]


@pytest.mark.slow
def test_training_killed_at_five_points_resumes_to_identical_weights(
    forks: ForkServer, tmp_path: Path
) -> None:
    source = write_dataset(tmp_path / "parts", "industrial", n_train=16, n_test=2, n_defect=2)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    reference = forks.start(tmp_path / "whole.marker", "none", _train_args(source, whole),
                            tmp_path)
    points = _kill_points(random.Random(SEED))
    marker = tmp_path / "broken.marker"
    died = [forks.start(marker, kill, _train_args(source, broken), tmp_path).killed()
            for kill in points]
    last_run = forks.start(marker, "none", _train_args(source, broken), tmp_path).finish()
    assert "kept epoch" in last_run, last_run
    reference.finish()
    assert sum(d.startswith("dying") for d in died) == 2, (points, died)
    assert not list((broken / "checkpoints").glob(".*.tmp"))  # the half temp file was replaced
    expected, got = _train_state(whole), _train_state(broken)
    assert got["last"]["epoch"] == STEPS // EVERY
    assert expected["last"]["d_reinits"] > 0  # the global RNG stream was exercised
    _assert_equal(expected, got, "state")
