"""Identical images (the same sha256) in a source or dataset: reported, never hidden.

Two copies of one image are a **leak** when they land in two splits (``train/good/x.png``
and ``test/good/y.png``: the model would be tested on what it trained on), a **mislabel**
when they carry two labels (a defect image copied into ``train/good``), and a plain
**repeat** otherwise (same label, same split). ``data.duplicates`` sets the policy:

- ``fail`` (default): a leak or mislabel is a ``DataError`` naming both files as the user
  gave them (``<source>/<path inside it>``); repeats are warnings;
- ``warn``: every finding is a warning and one copy is kept (``pick_copy``).

Either way each copy that is not kept is named: in the warning, and by ingestion in the
manifest's optional ``copies`` column (``encode_copies``), so ``nestad validate`` can judge
a stored dataset again later.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from components.errors import DataError

COPIES_COLUMN = "copies"  # optional manifest column: JSON list of the copies not kept
POLICY_KEY = "data.duplicates"

Kind = Literal["two_labels", "two_splits", "repeat"]


@dataclass(frozen=True)
class ImageCopy:
    """One file holding an image, as the user gave it, and where it would go."""

    name: str  # <source>/<path inside it>, or the stored path when no source is known
    label: str
    split: str  # train | val | test
    is_normal: bool


@dataclass(frozen=True)
class DuplicateFinding:
    """A copy that is not kept, set against the copy that is."""

    kind: Kind
    kept: ImageCopy
    other: ImageCopy

    @property
    def is_error(self) -> bool:
        """Leaks and mislabels; a repeat within one split is only a warning."""
        return self.kind != "repeat"

    def describe(self) -> str:
        a, b = sorted((self.other, self.kept), key=lambda c: c.name)
        if self.kind == "two_labels":
            why = f"under two labels ({a.label!r} and {b.label!r})"
        elif self.kind == "two_splits":
            why = f"in two splits ({a.split} and {b.split}): a test image would also be trained on"
            if "test" not in (a.split, b.split):
                why = f"in two splits ({a.split} and {b.split})"
        else:
            why = f"repeated in {a.split} ({a.label!r}); kept once"
        return f"{a.name} and {b.name}: identical bytes {why}"


def classify(kept: ImageCopy, other: ImageCopy) -> Kind:
    """Mislabel before leak: a defect image in ``train/good`` is named as a label clash."""
    if (kept.label, kept.is_normal) != (other.label, other.is_normal):
        return "two_labels"
    if kept.split != other.split:
        return "two_splits"
    return "repeat"


def pick_copy(copies: Iterable[ImageCopy]) -> ImageCopy:
    """The copy that counts: anomalous before normal, then test before train/val, then by
    name -- so a doubtful image never lands in train or val."""
    return min(copies, key=lambda c: (c.is_normal, c.split != "test", c.name))


def find_duplicates(groups: Iterable[list[ImageCopy]]) -> list[DuplicateFinding]:
    """A finding per copy not kept, for each group of identical copies (groups of one are
    skipped), in the order given."""
    findings = []
    for copies in groups:
        if len(copies) < 2:
            continue
        kept = pick_copy(copies)
        findings += [DuplicateFinding(classify(kept, c), kept, c) for c in copies if c != kept]
    return findings


def apply_policy(findings: list[DuplicateFinding], policy: str) -> list[str]:
    """Raise ``DataError`` on the first leak or mislabel under ``fail``; return the warning
    lines (every finding under ``warn``, repeats under ``fail``), errors first."""
    errors = [f for f in findings if f.is_error]
    if errors and policy == "fail":
        more = len(errors) - 1
        extra = f"; {more} more such {'copy' if more == 1 else 'copies'}" if more else ""
        raise DataError(
            f"{errors[0].describe()}{extra} ({POLICY_KEY}: fail; fix the source, or set "
            f"{POLICY_KEY}=warn to keep one copy: the anomalous, then the test one)"
        )
    return [f.describe() for f in sorted(findings, key=lambda f: not f.is_error)]


def encode_copies(copies: list[ImageCopy]) -> str:
    """The manifest cell naming the copies not kept (empty when there are none)."""
    if not copies:
        return ""
    return json.dumps([[c.name, c.label, c.split, c.is_normal] for c in copies],
                      separators=(",", ":"))


def decode_copies(cell: Any, where: str) -> list[ImageCopy]:
    """Read a ``copies`` cell back (missing or empty: none)."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)) or cell == "":
        return []
    try:
        items = json.loads(cell)
        return [ImageCopy(str(n), str(label), str(split), bool(normal))
                for n, label, split, normal in items]
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: unreadable {COPIES_COLUMN} cell {str(cell)[:60]!r} "
                        f"(expected a JSON list of [file, label, split, is_normal]; {exc})"
                        ) from None


def _row_copy(row: Any) -> ImageCopy:
    source = row.get("source")
    name = source if isinstance(source, str) and source else str(row.get("path"))
    normal = str(row.get("is_normal")) == "True"  # a Python or numpy bool; NaN is not normal
    return ImageCopy(name, str(row.get("label")), str(row.get("split")), normal)


def manifest_findings(frame: Any) -> list[tuple[Any, DuplicateFinding]]:
    """Identical copies in a stored dataset (a manifest as a DataFrame), each with the index
    of the row kept: rows sharing a sha256, and the copies ingestion recorded in the
    ``copies`` column. A manifest written without that column (before nestad recorded
    copies) is judged on its rows alone: copies dropped by such an ingestion are unknown."""
    found: list[tuple[Any, DuplicateFinding]] = []
    rows = frame[frame["sha256"].notna()]
    for _, group in rows.groupby("sha256", sort=False):
        if len(group) > 1:
            copies = {index: _row_copy(row) for index, row in group.iterrows()}
            kept = pick_copy(copies.values())
            at = next(index for index, c in copies.items() if c is kept)
            found += [(at, DuplicateFinding(classify(kept, c), kept, c))
                      for c in copies.values() if c is not kept]
    if COPIES_COLUMN in frame:
        for index, row in rows[rows[COPIES_COLUMN].notna()].iterrows():
            kept = _row_copy(row)
            found += [(index, DuplicateFinding(classify(kept, c), kept, c))
                      for c in decode_copies(row[COPIES_COLUMN], f"{kept.name} (manifest)")]
    return found
