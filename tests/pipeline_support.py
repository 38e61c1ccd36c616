"""A tiny nestad project for the pipeline and flow tests (and ``benchmarks/overhead.py``).

``make_project(base)`` writes, under ``base``::

    source/          an image-folder source, ``classes`` layout (gradient, blob, stripes;
                     ``stripes`` is the anomalous class), 32x32 PNGs
    project/         a git work tree with the repository's dvc.yaml and components/, and
                     a params.yaml with tiny sizes reading ``../source``

Nothing in it is initialised for DVC yet: the flows and ``nestad run`` do that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from synthetic_support import write_images

from components.config import parse_params

REPO = Path(__file__).resolve().parents[1]
NORMAL = ("gradient", "blob")
ANOMALOUS = "stripes"
DATASET = "data/synth"

TINY_PARAMS: dict[str, Any] = {
    "data": {
        "source": "../source",
        "layout": "classes",
        "anomalous_class": ANOMALOUS,
        "image_size": 16,
        "channels": 3,
        "val_fraction": 0.25,
        "seed": 0,
        "min_image_size": 8,
        "decode_workers": 1,
    },
    "model": {"base_width": 4, "disc_width": 8},
    "train": {
        "epochs": 1,
        "batch_size": 8,
        "lr_decay_start": 100,
        "device": "cpu",
        "precision": "fp32",
        "channels_last": False,
    },
    "evaluate": {"batch_size": 64, "plots": True, "grid_images": 4},
    "ingest": {"source": "../source", "data_root": "data", "name": "synth", "workers": 1},
    "validation": {
        "labels": [*NORMAL, ANOMALOUS],
        "min_size": 16,
        "expected_counts": {"train_val_normal": None, "test_normal": None, "test_anomalous": None},
    },
    "pipeline": {"profile": "tiny", "min_new_normal_images": 1},
    "profiles": {"tiny": {"train.epochs": 1}, "other": {"train.epochs": 2}},
}

# Quiet, self-contained environment for DVC, MLflow and the `nestad` stage subprocesses.
PIPELINE_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def pipeline_env(tmp: Path) -> dict[str, str]:
    """Environment variables that keep DVC, MLflow and git inside ``tmp``."""
    return {
        **PIPELINE_ENV,
        "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site"),
        "XDG_CACHE_HOME": str(tmp / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def add_images(
    source: Path,
    label: str,
    count: int,
    *,
    part: str = "train",
    start: int = 0,
    size: int = 32,
    tag: str = "",
) -> list[Path]:
    """Add ``count`` new images of class ``label`` to ``source/<part>/<label>/``."""
    pattern = label if label in (*NORMAL, ANOMALOUS) else NORMAL[0]
    return write_images(source / part / label, pattern, count, start=start, size=size, tag=tag)


def make_project(base: Path, n_train: int = 12, n_test: int = 4, **changes: Any) -> Path:
    """Write ``base/source`` and ``base/project``; return the project root.

    ``changes`` replace whole keys of params sections, e.g. ``train={"epochs": 2}``.
    """
    source = base / "source"
    for label in (*NORMAL, ANOMALOUS):
        add_images(source, label, n_train, part="train")
        add_images(source, label, n_test, part="test")
    root = base / "project"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(  # the code the stages declare as deps
        REPO / "components", root / "components",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root, **changes)
    (root / ".gitignore").write_text("/outputs/\n/mlflow.db\n/mlartifacts/\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


def write_params(root: Path, **changes: Any) -> Path:
    """Write ``root/params.yaml``: every key (DVC requires each declared one), tiny values
    from ``TINY_PARAMS``, then ``changes`` (whole keys of sections)."""
    tree = {section: dict(values) for section, values in TINY_PARAMS.items()}
    for section, values in changes.items():
        tree[section] = {**tree.get(section, {}), **values}
    full = parse_params(tree, origin="tiny params").model_dump(mode="json")
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(full, sort_keys=False))
    return path
