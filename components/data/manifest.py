"""The manifest: one row per image (``MANIFEST_COLUMNS``), how a dataset written by
``nestad ingest`` records what it holds and which split each image is in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from components.data.images import sha256_hex
from components.errors import DataError

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = [
    "path",  # relative to the dataset folder, POSIX separators
    "sha256",
    "label",  # class or defect name; "good" for industrial normals
    "is_normal",
    "split",  # train | val | test
    "width",
    "height",
    "channels",
    "source",
    "mask",  # industrial layout: the defect image's stored pixel mask, "" when it has none
]
# Columns a manifest written by an older nestad may lack, and the value they then take.
OPTIONAL_COLUMNS = {"mask": ""}
REQUIRED_COLUMNS = [c for c in MANIFEST_COLUMNS if c not in OPTIONAL_COLUMNS]
SPLITS = ("train", "val", "test")
NORMAL_LABEL = "good"
RECORD_NAME = "ingest.json"


def _read_record(dataset: Path) -> dict[str, Any]:
    try:
        return json.loads((dataset / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return {}


def manifest_decoded(dataset: Path) -> bool:
    """True when ingestion fully decoded every image of the current manifest.csv."""
    record = _read_record(dataset)
    try:
        digest = sha256_hex((dataset / MANIFEST_NAME).read_bytes())
    except OSError:
        return False
    return bool(record.get("all_decoded")) and record.get("manifest_sha256") == digest




def read_manifest(dataset_dir: Path) -> pd.DataFrame:
    """Read and check an ingested dataset's manifest."""
    path = dataset_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no manifest (run `nestad ingest` first)")
    try:
        frame = pd.read_csv(path, dtype={"path": str, "sha256": str, "label": str,
                                         "split": str, "source": str, "mask": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a readable CSV manifest ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing columns {', '.join(missing)}")
    for column, default in OPTIONAL_COLUMNS.items():
        frame[column] = frame[column].fillna(default) if column in frame else default
    bad = frame.loc[~frame["split"].isin(SPLITS), "path"]
    if len(bad):
        raise DataError(f"{path}: row {bad.iloc[0]!r} has a split other than {SPLITS}")
    frame["is_normal"] = frame["is_normal"].astype(str).str.lower().isin(["true", "1"])
    leaked = frame.loc[(frame["split"] != "test") & ~frame["is_normal"], "path"]
    if len(leaked):
        raise DataError(f"{path}: anomalous image {leaked.iloc[0]!r} in a train/val split")
    return frame
