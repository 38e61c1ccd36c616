"""Helpers for the registry tests: a tiny evaluated project and an isolated MLflow store.

``project_template`` builds once per session: a git work tree holding a manifest dataset
under ``data/`` tracked by ``data.dvc``, and an evaluated run folder ``outputs/`` (untrained
networks: the figures do not matter, their round trip does). ``new_project`` copies it,
with an already-migrated SQLite store, into a test's folder in milliseconds.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from synthetic_support import build_tiny_params

from components.config import Params

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "DVC_NO_ANALYTICS": "1",
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}
DATASET = "data/synth"
_TEMPLATE: dict[str, Any] = {}


@dataclass
class Project:
    """A project folder: params, run folder, and the SQLite store ``<root>/mlflow.db``."""

    root: Path
    params: Params
    out: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


@contextlib.contextmanager
def quiet_env(tmp: Path) -> Iterator[pytest.MonkeyPatch]:
    """No telemetry, no tracking URI from outside, HOME/TMPDIR/caches inside ``tmp``."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in QUIET_ENV.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for name in ("home", "tmp", "cache"):
            (tmp / name).mkdir(parents=True, exist_ok=True)
        mp.setenv("HOME", str(tmp / "home"))
        mp.setenv("TMPDIR", str(tmp / "tmp"))
        mp.setattr(tempfile, "tempdir", str(tmp / "tmp"))
        mp.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
        mp.setenv("PYTHONPATH", str(REPO))
        # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH.
        mp.setenv("PATH", f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        yield mp


def tiny_params(root: Path, **sections: dict[str, Any]) -> Params:
    """Tiny params reading the project's manifest dataset; ``sections`` add keys."""
    data = {"source": str(root / DATASET), "layout": "manifest"}
    evaluate = {"plots": True, "threshold": "fixed"}
    return build_tiny_params(
        data=data | sections.pop("data", {}),
        evaluate=evaluate | sections.pop("evaluate", {}),
        **sections,
    )


def _image(rng: np.random.Generator, defect: bool) -> Image.Image:
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    base = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.06)[..., None] * rng.uniform(0.6, 0.9, 3)
    img = 0.7 * base + rng.normal(0, 0.03, size=(16, 16, 3))
    if defect:
        y0, x0 = rng.integers(2, 10, size=2)
        img[y0 : y0 + 4, x0 : x0 + 4] = 1.0
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), "RGB")


def _write_dataset(folder: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    plan = [("train", True, 12), ("val", True, 4), ("test", True, 6), ("test", False, 6)]
    for split, normal, count in plan:
        for i in range(count):
            label = "good" if normal else "square"
            rel = f"{split}/{label}/{i:03d}.png"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            _image(rng, not normal).save(folder / rel)
            sha = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
            rows.append([rel, sha, label, normal, split, 16, 16, 3, "synthetic"])
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "path",
                "sha256",
                "label",
                "is_normal",
                "split",
                "width",
                "height",
                "channels",
                "source",
            ]
        )
        writer.writerows(rows)


def _evaluate(root: Path) -> None:
    """An evaluated run folder from untrained networks (training is tested elsewhere)."""
    import torch

    from components.detector.checkpoints import CHECKPOINT_FORMAT, save_atomic
    from components.detector.networks import build_networks
    from components.pipeline.stages import evaluate_stage

    params = tiny_params(root, evaluate={"plots": False})
    out = root / "outputs"
    torch.manual_seed(0)
    g, d = build_networks(params.model, params.data.channels, params.data.image_size)
    save_atomic(
        {
            "format": CHECKPOINT_FORMAT,
            "epoch": 2,
            "generator": g.state_dict(),
            "discriminator": d.state_dict(),
        },
        out / "checkpoints" / "best.pt",
    )
    epochs = [
        {
            "epoch": e,
            "loss_d": 0.7 - 0.1 * e,
            "loss_g": 9.0 - e,
            "loss_adv": 0.7,
            "loss_con": 0.3,
            "loss_lat": 0.01,
            "loss_enc": 0.0,
            "lr": 2e-4,
            "d_reinits": 0,
            "val_recon": 0.5 - 0.1 * e,
            "val_score": 0.6 - 0.1 * e,
            "seconds": 1.0,
            "images_per_s": 12.0,
        }
        for e in (1, 2)
    ]
    (out / "train_history.json").write_text(
        json.dumps(
            {
                "best_epoch": 2,
                "resumed_from": 0,
                "device": "cpu",
                "precision": "fp32",
                "counts": {"train": 12, "val": 4},
                "epochs": epochs,
            },
            indent=2,
        )
    )
    evaluate_stage(params, out)
    (out / "plots").mkdir(exist_ok=True)  # no matplotlib plots (seconds); tests move files
    Image.new("RGB", (8, 8)).save(out / "plots" / "roc_pr.png")


def project_template(factory: pytest.TempPathFactory) -> Path:
    """The session's template project (built on first use)."""
    if "root" in _TEMPLATE:
        return _TEMPLATE["root"]
    root = factory.mktemp("template") / "project"
    root.mkdir()
    with quiet_env(root.parent):
        _write_dataset(root / DATASET)
        (root / "data.dvc").write_text(
            "outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  size: 12345\n"
            "  nfiles: 29\n  hash: md5\n  path: data\n"
        )
        (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
        _evaluate(root)
        for args in (
            ["init", "-q"],
            ["add", "data.dvc", "dvc.lock"],
            ["commit", "-q", "-m", "template"],
        ):
            subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)
        from components.registry.client import open_registry

        # Migrating a new SQLite store takes seconds; do it once and copy the file.
        reg = open_registry(tiny_params(root).registry, root)
        reg.client.search_experiments()
    _TEMPLATE["root"] = root
    return root


def new_project(factory: pytest.TempPathFactory, dest: Path) -> Project:
    """A fresh copy of the template project at ``dest``, with a validation summary."""
    shutil.copytree(project_template(factory), dest, symlinks=True)
    report = dest / "reports" / "validation"
    report.mkdir(parents=True)
    (report / "summary.json").write_text(
        json.dumps(
            {
                "dataset": str(dest / DATASET),
                "success": True,
                "images": 28,
                "outcomes": [{"name": "manifest_paths_unique", "success": True}],
            }
        )
    )
    return Project(dest, tiny_params(dest), dest / "outputs")


@dataclass
class Registered:
    """The session's registered project: version 1 of ``nestad-detector`` (candidate),
    tracked live (two epochs through ``epoch_logger``) in a child of a pipeline run."""

    project: Project
    version: Any  # components.registry.versions.RegisteredVersion
    parent_run_id: str


def registered_project(factory: pytest.TempPathFactory) -> Registered:
    """Build (once per session) and return the registered project."""
    if "registered" in _TEMPLATE:
        return _TEMPLATE["registered"]
    from components.detector.train import EpochReport
    from components.registry.client import open_registry
    from components.registry.runs import epoch_logger, start_run
    from components.registry.versions import register_run

    tmp = factory.mktemp("registered")
    with quiet_env(tmp):
        project = new_project(factory, tmp / "project")
        reg = open_registry(project.params.registry, project.root)
        parent = start_run(reg, project.params, "pipeline")
        run_id = start_run(reg, project.params, "train", parent_run_id=parent)
        on_epoch = epoch_logger(reg, run_id)
        for epoch in json.loads((project.out / "train_history.json").read_text())["epochs"]:
            on_epoch(EpochReport(**epoch))
        version = register_run(project.params, project.root, project.out, run_id=run_id)
    _TEMPLATE["registered"] = Registered(project, version, parent)
    return _TEMPLATE["registered"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Wait until ``url`` answers 200; fail with the process's output if it died."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = getattr(proc, "log_file", None)
            if log is not None:
                log.seek(0)
            source = log if log is not None else proc.stdout
            out = source.read().decode(errors="replace") if source else ""
            pytest.fail(f"server exited with {proc.returncode}:\n{out[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{url} did not answer within {timeout}s")


@contextlib.contextmanager
def server(args: list[str], health_url: str, timeout: float = 90.0) -> Iterator[subprocess.Popen]:
    """Run a server process until the block ends; stop it (and its children) after.

    Its output goes to a temporary file, not a pipe: a pipe nobody reads fills up (64 KiB)
    and stalls a server that logs a lot (MLflow answering many artefact downloads)."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
        start_new_session=True,
    )
    proc.log_file = log  # type: ignore[attr-defined]
    try:
        wait_http(health_url, proc, timeout)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def git_head(root: Path) -> str:
    """The commit checked out in ``root``."""
    return subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def loopback(port: int) -> list[str]:
    """Server options: listen on 127.0.0.1:``port`` with one worker."""
    return ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


def bin_path(name: str) -> str:
    """A console script installed beside this Python (mlflow, moto_server, nestad)."""
    return str(Path(PYTHON).parent / name)


def registry_state(client: Any) -> dict[str, Any]:
    """Every registered model with its versions and aliases (to compare before/after)."""
    state = {}
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name='{rm.name}'")
        state[rm.name] = {
            "versions": sorted(int(v.version) for v in versions),
            "aliases": dict(client.get_registered_model(rm.name).aliases),
        }
    return state


def read_scores(path: Path) -> dict[str, tuple[float, float, bool]]:
    """``test_scores.csv`` (evaluation) as path -> (score, normalised, flagged)."""
    with path.open(newline="") as fh:
        return {
            r["path"]: (float(r["score"]), float(r["normalised_score"]), r["flagged"] == "1")
            for r in csv.DictReader(fh)
        }


def write_params(project: Project, name: str = "params.yaml", **registry: Any) -> Path:
    """Write the project's params (``registry`` keys changed) to ``<root>/<name>``."""
    import yaml

    tree = project.params.model_dump(mode="json", exclude={"profiles"})
    tree["registry"].update(registry)
    path = project.root / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def race_gated_promotions(reg: Any, versions: list[str], set_candidate: Any,
                          **promote_kwargs: Any) -> list[Any]:
    """Pipelines at once, one thread per version: each takes ``candidate`` for its version
    (``set_candidate(version)``) and runs the gate, again while another holds
    ``candidate``. Returns every promotion result; fails on any other error."""
    import threading

    from components.registry.client import RegistryError
    from components.registry.promote import promote_auto

    barrier = threading.Barrier(len(versions))
    results: list[Any] = []
    errors: list[BaseException] = []

    def pipeline(version: str) -> None:
        barrier.wait()
        for _ in range(100):  # another pipeline may take `candidate` before the gate runs
            set_candidate(version)
            try:
                results.extend(promote_auto(reg, version, **promote_kwargs))
                return
            except RegistryError as exc:
                if "must be candidate" not in str(exc):
                    errors.append(exc)
                    return
        errors.append(RuntimeError(f"version {version} never reached the gate"))

    threads = [threading.Thread(target=pipeline, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def dataset_test_images(root: Path) -> list[Path]:
    """The test images of a project's tiny dataset (``root / DATASET / "test"``), sorted."""
    return sorted((root / DATASET / "test").rglob("*.png"))


def template_detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The project template's trained ``detector.pt`` and its test images."""
    root = project_template(tmp_path_factory)
    return root / "outputs" / "model" / "detector.pt", dataset_test_images(root)
