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

import hashlib
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
from synthetic_support import REPO, tiny_overrides, write_dataset, write_images

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
    from components.detector.checkpoints import load_checkpoint

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
    assert json.loads((broken / "train_history.json").read_text())["resumed_from"] > 0
    # D re-initialisation draws from the global RNG: make sure that stream is exercised
    # (if a model change stops it, raise train.reinit_d_below above)
    assert expected["last"]["d_reinits"] > 0
    _assert_equal(expected, got, "state")


# --- ingestion ------------------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with the sha256 of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(data_root: Path) -> list[str]:
    return sorted(p.name for p in data_root.iterdir() if p.name.startswith("."))


@pytest.mark.slow
def test_ingestion_killed_part_way_leaves_the_previous_version_and_the_next_succeeds(
    forks: ForkServer, tmp_path: Path
) -> None:
    import shutil

    from components.data.ingest import _exchange

    first = write_dataset(tmp_path / "first", "industrial", n_train=8, n_test=2, n_defect=2)
    second = tmp_path / "second"  # new images (their own seeds), to add to the first version
    write_images(second / "train" / "good", "blob", 24, tag="new")
    write_images(second / "test" / "square", "blob", 4, tag="new", defect=True)
    data = tmp_path / "data"
    params = _params_file(tmp_path, {"data.layout": "industrial", "ingest.data_root": str(data),
                                     "ingest.workers": 1, "ingest.track": False})
    marker = tmp_path / "ingest.marker"

    def ingest(source: Path, name: str, kill: str = "none") -> Child:
        args = ["ingest", source, "--name", name, "--no-track", "-p", params]
        return forks.start(marker, kill, args, tmp_path)

    ingest(first, "v1").finish()
    ingest(second, "v1").finish()
    reference = _tree(data / "v1")  # both, ingested without interruption
    shutil.rmtree(data / "v1")
    ingest(first, "v1").finish()
    previous = _tree(data / "v1")
    assert len(reference) == len(previous) + 28
    atomic_swap = _exchange(data / "v1", data / "v1")  # the file system can swap folders
    rng = random.Random(SEED)
    points = [*(f"store:{k}" for k in sorted(rng.sample(range(1, 29), 2))), "swap", "cleanup"]
    for i, kill in enumerate(points):
        name = f"case{i}"
        shutil.copytree(data / "v1", data / name)
        died = ingest(second, name, kill).killed()
        if kill == "swap" and not atomic_swap:  # two renames: moved aside, put back next
            assert not (data / name).exists() and any(".old-" in n for n in _leftovers(data))
        elif kill in ("swap", "cleanup"):  # killed once the new version was in: complete
            assert _tree(data / name) == reference, died
        else:  # killed while storing images: the previous version, untouched
            assert _tree(data / name) == previous, died
        assert _leftovers(data), died  # what it was building (or removing) is still there
        done = ingest(second, name).finish()
        assert f"dataset {data / name}" in done, done
        assert _tree(data / name) == reference, (kill, died)
        assert _leftovers(data) == [], (kill, died)


# --- registration and promotion ------------------------------------------------------------

REGISTRY_TIMEOUT_S = 120.0


@pytest.fixture
def project(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Iterator[Any]:
    """An evaluated project with its own SQLite registry (``mlflow_support``), in a quiet
    environment the fork server's children inherit."""
    from mlflow_support import new_project, quiet_env

    with quiet_env(tmp_path):
        yield new_project(tmp_path_factory, tmp_path / "project")


def _registry_state(reg: Any) -> dict[str, Any]:
    """Versions (with whether they carry the registration marker) and aliases."""
    from components.registry.interrupted import unfinished

    versions = reg.client.search_model_versions(f"name='{reg.name}'")
    aliases = ({a: str(v) for a, v in reg.client.get_registered_model(reg.name).aliases.items()}
               if versions else {})
    return {"versions": {str(v.version): unfinished(v) for v in versions}, "aliases": aliases}


@pytest.mark.slow
def test_registration_killed_part_way_leaves_no_half_registered_candidate(
    forks: ForkServer, project: Any, tmp_path: Path
) -> None:
    from mlflow_support import write_params

    from components.registry.client import RegistryError, open_registry
    from components.registry.promote import promote_auto

    params = write_params(project)
    args = ["register", "-p", params, "-o", project.out]
    marker = tmp_path / "register.marker"
    forks.start(marker, "call:0", args, project.root).finish()  # counts the client calls
    calls = int(marker.read_text().split()[-1])
    reg = open_registry(project.params.registry, project.root)
    assert _registry_state(reg) == {"versions": {"1": False}, "aliases": {"candidate": "1"}}
    rng = random.Random(SEED)
    points = ["after:create_model_version", "after:set_registered_model_alias",
              f"call:{rng.randrange(1, calls)}"]
    complete, halves, logs = {"1"}, set(), []
    for kill in points:  # each run repairs what the one before left, then is killed
        child = forks.start(marker, kill, args, project.root)
        died = child.killed()
        logs.append(child.output())
        after = _registry_state(reg)
        half = {v for v, marked in after["versions"].items() if marked}
        assert complete <= set(after["versions"]) - half, (kill, died, after)
        complete |= set(after["versions"]) - half
        halves |= half
        candidate = after["aliases"].get("candidate")
        if candidate in half:  # visible, but marked: promotion refuses it
            with pytest.raises(RegistryError, match="not fully registered"):
                promote_auto(reg)
        else:  # a complete version (the new one if it was killed after finishing)
            assert candidate in complete, (kill, died, after)
    logs.append(forks.start(marker, "none", args, project.root).finish())
    now = _registry_state(reg)
    newest = max(now["versions"], key=int)
    assert not any(now["versions"].values()), now
    assert set(now["versions"]) == complete | {newest}, (points, complete, now)
    assert now["aliases"] == {"candidate": newest}, now
    assert halves, (points, now)  # the kill points did leave half-registered versions
    for version in halves:  # a later registration undid each, and said so
        assert any(f"undid the registration of version {version}" in log for log in logs), (
            version, logs)


@pytest.mark.slow
def test_a_promotion_killed_holding_the_lock_blocks_the_next_at_most_its_ttl(
    forks: ForkServer, project: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses

    from mlflow_support import write_params

    from components.decisions import PRODUCTION, STAGING
    from components.registry.client import open_registry
    from components.registry.promote import promote

    reg = open_registry(project.params.registry, project.root)
    client, lock = reg.client, f"{reg.name}.promotion-lock"
    client.create_registered_model(reg.name)
    for _ in range(2):
        mv = client.create_model_version(reg.name, str(project.out / "model"))
    client.set_registered_model_alias(reg.name, "candidate", mv.version)
    params = write_params(project)
    marker = tmp_path / "promote.marker"
    args = ["promote", "--to", "staging", "-p", params]

    # killed on this machine: its process has ended, so the lock is taken over at once
    died = forks.start(marker, "locked", args, project.root).killed()
    assert died == "dying while holding the lock"
    assert client.get_registered_model(lock).tags["process"]
    started = time.monotonic()
    with caplog.at_level("WARNING"):
        assert promote(reg, STAGING, "2").promoted  # candidate -> staging
    assert time.monotonic() - started < reg.cfg.lock_ttl_s / 10  # not the 300 s TTL
    assert "has ended" in caplog.text
    assert client.search_registered_models(f"name='{lock}'") == []

    # a holder this machine cannot check (another host): free after the TTL, not later
    forks.start(marker, "locked", args, project.root).killed()
    client.set_registered_model_tag(lock, "process", "another-boot:1:42:1")
    taken = float(client.get_registered_model(lock).tags["acquired_at"])
    short = dataclasses.replace(reg, cfg=reg.cfg.model_copy(
        update={"lock_ttl_s": 3.0, "lock_timeout_s": REGISTRY_TIMEOUT_S}))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert promote(short, PRODUCTION, "2", force=True).promoted
    waited = time.time() - taken
    assert 3.0 <= waited < 3.0 + 30.0, waited
    assert "older than registry.lock_ttl_s=3" in caplog.text
    assert client.search_registered_models(f"name='{lock}'") == []
