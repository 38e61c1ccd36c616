"""Where a run came from: the data version (DVC md5, manifest hash, counts), the
evaluation-set digest, the git commit and ``dvc.lock`` hash, the validation verdict."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.config import (
    Params,
    project_path,
)
from components.data.version import DATA_TARGET, data_version


@dataclass(frozen=True)
class DataVersion:
    """Which data a run used: DVC hash, manifest hash and what the manifest holds."""

    source: str
    dvc_md5: str | None = None  # outs[0].md5 of data.dvc, when the source lies inside it
    manifest_sha256: str | None = None  # of <dataset>/manifest.csv
    source_sha256: str | None = None  # of an archive source (no manifest)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> normal/anom.

    @property
    def key(self) -> str | None:
        """The one identifier of this data version (None: unversioned raw folder)."""
        return self.dvc_md5 or self.manifest_sha256 or self.source_sha256


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_data(source: str, root: Path) -> DataVersion:
    """The data version of a training source (relative paths are from ``root``).

    The DVC md5 is recorded when the source lies inside the DVC-tracked ``data/`` (the
    pipeline's ingest stage keeps ``data.dvc`` up to date).
    """
    from components.data.manifest import MANIFEST_NAME, read_manifest

    path = project_path(root, source).resolve()
    dvc_md5 = manifest_sha = source_sha = None
    counts: dict[str, dict[str, int]] = {}
    tracked = (root / DATA_TARGET).resolve()
    if (root / f"{DATA_TARGET}.dvc").is_file() and (path == tracked or tracked in path.parents):
        dvc_md5 = data_version(root, DATA_TARGET)
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        manifest_sha = _sha256_file(manifest)
        frame = read_manifest(path)
        for (split, normal), n in frame.groupby(["split", "is_normal"]).size().items():
            counts.setdefault(str(split), {"normal": 0, "anomalous": 0})[
                "normal" if normal else "anomalous"
            ] = int(n)
    elif path.is_file():
        source_sha = _sha256_file(path)
    return DataVersion(str(path), dvc_md5, manifest_sha, source_sha, counts)


def eval_data_digest(data: DataVersion, test_scores: Path) -> str | None:
    """Digest of the evaluation set: every test image and label, nothing else.

    Two runs share it only if they were scored on the same images with the same labels,
    so their test figures are comparable. The dataset version is deliberately left out:
    retraining on new normal images changes it but leaves the sealed test split as it was
    (ingested paths are content hashes), and the gate must still compare such a model
    with production. None for unversioned data, whose paths do not identify content.
    """
    import csv

    if data.key is None:
        return None
    with test_scores.open(newline="") as fh:
        rows = sorted((r["path"], r["label"], r["is_anomaly"]) for r in csv.DictReader(fh))
    # An archive's paths name files, not content: there the archive's hash stays in.
    content_addressed = data.dvc_md5 is not None or data.manifest_sha256 is not None
    digest = hashlib.sha256(b"nestad-eval-set/2\n" if content_addressed
                            else f"{data.key}\n".encode())
    for row in rows:
        digest.update(("\t".join(row) + "\n").encode())
    return digest.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def code_version(root: Path) -> dict[str, str | None]:
    """Git commit (and whether the tree differs from it) and the dvc.lock hash."""
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    lock = root / "dvc.lock"
    return {
        "git_commit": _git(root, "rev-parse", "HEAD"),
        "git_dirty": None if status is None else str(bool(status)).lower(),
        "dvc_lock_sha256": _sha256_file(lock) if lock.is_file() else None,
    }


def _validation_summary(params: Params, root: Path, data: DataVersion) -> dict[str, Any] | None:
    """The latest ``nestad validate`` verdict for this dataset, or None if there is none."""
    file = project_path(root, params.validation.report_dir) / "summary.json"
    if not file.is_file():
        return None
    try:
        summary = json.loads(file.read_text())
    except (OSError, ValueError):
        return {"file": str(file), "success": None, "note": "unreadable summary.json"}
    result = {
        "file": str(file),
        "dataset": summary.get("dataset"),
        "success": summary.get("success"),
        "images": summary.get("images"),
        "failed": [
            o.get("name")
            for o in summary.get("outcomes", [])
            if isinstance(o, dict) and not o.get("success")
        ],
    }
    if summary.get("dataset") and Path(summary["dataset"]).resolve() != Path(data.source):
        result["note"] = "summary is for another dataset"
        result["success"] = None
    manifest = Path(data.source) / "manifest.csv"
    if manifest.is_file() and manifest.stat().st_mtime > file.stat().st_mtime:
        result["note"] = "manifest changed after validation"
        result["success"] = None
    return result
