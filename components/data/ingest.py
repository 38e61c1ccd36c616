"""Versioned dataset ingestion: a source becomes ``<data_root>/<name>/`` with a manifest.

Sources: a folder; a ``.tar``/``.tar.gz``/``.zip`` archive (every member is checked before
anything is written); the original CIFAR-10 python archive (pickled batches, read with a
numpy-only unpickler); ``s3://bucket/prefix`` (boto3, standard credential chain). The
source layout (``classes`` or ``industrial``), anomalous class, seed and val_fraction come
from ``DataConfig``, so the split is the one ``components.data.layout`` defines.

The dataset folder, which ``components.data.load_splits`` reads through its manifest::

    manifest.csv                       MANIFEST_COLUMNS, one row per image, sorted by path
    images/<sha[:2]>/<sha256>.<ext>    the source's bytes, unchanged; ext from the content
    masks/<sha[:2]>/<sha256>.<ext>     industrial layout: the pixel masks of the defect
                                       images (``ground_truth/``), unchanged; the manifest's
                                       ``mask`` column names each image's mask
    ingest.json                        the split protocol, and which manifest was decoded

Images are content-addressed: an exact duplicate is stored once and an image never moves.
Re-ingesting adds only unseen sha256s and never changes an existing row. Each run builds
the new version in a temporary folder beside the target (existing files hard-linked, not
copied) and swaps it in with one atomic exchange (two renames where the file system lacks
it), so a failure or a SIGKILL part-way leaves the previous version as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from components.config import DataConfig, IngestConfig
from components.data.duplicates import (
    COPIES_COLUMN,
    DuplicateFinding,
    ImageCopy,
    apply_policy,
    classify,
    decode_copies,
    encode_copies,
)
from components.data.images import (
    ImageProbe,
    ImageRules,
    Progress,
    decode_mask,
    image_rules,
    sha256_hex,
)
from components.data.layout import (
    LayoutRecord,
    assign_split,
    match_masks,
    parse_layout,
    strip_to_layout_root,
)
from components.data.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    NORMAL_LABEL,
    RECORD_NAME,
    SPLITS,
    _read_record,
    manifest_decoded,
    read_manifest,
)
from components.data.probing import _Decoder, image_path
from components.data.sources.base import _Entry, _Source
from components.data.sources.cifar import _CifarPythonSource, _is_cifar_python
from components.data.sources.dispatch import _open_source
from components.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestReport:
    """What one ingestion did. ``changed`` is False when nothing new was found: the
    dataset on disk was then left untouched."""

    dataset: Path
    source: str
    added: dict[str, int]  # new images per split
    totals: dict[str, int]  # images per split in the dataset now
    seen: int  # images read from the source
    duplicates: int  # source images whose bytes were already stored or repeated
    conflicts: tuple[str, ...]  # warnings naming identical copies (data.duplicates)
    skipped: tuple[str, ...]  # undecodable images left out (on_bad_image=skip)
    changed: bool
    seconds: float
    masks: int = 0  # pixel masks stored with the new images (industrial layout)

    @property
    def images_added(self) -> int:
        return sum(self.added.values())


@dataclass
class _Found:
    """A new image's copies in the source, until its split is decided."""

    copies: list[tuple[LayoutRecord, str]]  # (layout record, path inside the source)
    probe: ImageProbe | None = None


def _pick(copies: list[tuple[LayoutRecord, str]]) -> tuple[LayoutRecord, str]:
    """Which copy of a duplicated image counts: anomalous before normal, then test before
    train, then by path -- so a doubtful image never lands in train or val (the rule of
    ``components.data.duplicates.pick_copy``)."""
    return min(copies, key=lambda c: (c[0].is_normal, c[0].partition != "test", c[0].path))


def _layout(
    entries: list[_Entry], data_cfg: DataConfig, uri: str, increment: bool
) -> list[tuple[_Entry, LayoutRecord]]:
    """Label each entry as ``components.data.parse_layout`` does.

    parse_layout checks a whole dataset: the anomalous class, a normal training class (or
    ``train/good/``) must be present. An increment to an existing dataset, such as a folder
    of new normal images only, is exempt: placeholder paths satisfy those checks and are
    dropped again, so labels still come from the one mapping in components.data.
    """
    try:
        stripped = strip_to_layout_root(dict.fromkeys((e.rel for e in entries), b""), Path(uri))
    except DataError as exc:  # data.py names the source as a Path; keep s3:// intact
        raise DataError(uri + str(exc).removeprefix(str(Path(uri)))) from None
    by_path = dict(zip(stripped, entries, strict=True))
    placeholders = set()
    if increment:
        labels = [data_cfg.anomalous_class, "\0normal"] if data_cfg.layout == "classes" else []
        placeholders = {f"train/{label}/\0placeholder.png" for label in [*labels, NORMAL_LABEL]}
    paths = [*stripped, *sorted(placeholders)]
    records = parse_layout(paths, data_cfg.layout, data_cfg.anomalous_class, uri)
    records = [rec for rec in records if rec.path not in placeholders]
    if not records:
        raise DataError(f"{uri}: no images under train/ or test/")
    return [(by_path[rec.path], rec) for rec in records]


def _mask_entries(
    entries: list[_Entry], data_cfg: DataConfig, uri: str,
    located: list[tuple[_Entry, LayoutRecord]],
) -> dict[str, _Entry]:
    """The source entry of each defect image's pixel mask, keyed by the image's layout
    path: ``ground_truth/<defect>/<stem>_mask.<ext>`` of the industrial layout, checked
    complete and exact by ``match_masks`` before anything is written. Empty when the
    source has no ground truth."""
    if data_cfg.layout != "industrial":
        return {}
    stripped = strip_to_layout_root(dict.fromkeys((e.rel for e in entries), b""), Path(uri))
    by_path = dict(zip(stripped, entries, strict=True))
    mask_of = match_masks(list(stripped), [rec for _, rec in located], uri)
    return {image: by_path[mask] for image, mask in (mask_of or {}).items()}


def _store_masks(
    src: _Source, rows: list[dict[str, Any]], picked: list[LayoutRecord],
    masks: dict[str, _Entry], staging: Path,
) -> int:
    """Store the mask of each new defect image beside the images, content-addressed, and
    name it in the row's ``mask`` column. A mask that is unreadable or not its image's size
    is a ``DataError`` naming both files."""
    wanted = [(row, masks[rec.path]) for row, rec in zip(rows, picked, strict=True)
              if rec.path in masks]
    for (row, entry), (_, data) in zip(wanted, src.read([e for _, e in wanted]), strict=True):
        decode_mask(data, f"{src.uri}/{entry.where}", 8, row["source"],
                    (int(row["width"]), int(row["height"])))
        sha = sha256_hex(data)
        rel = f"masks/{sha[:2]}/{sha}{Path(entry.rel).suffix.lower()}"
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
        row["mask"] = rel
    return len(wanted)


def _counts(frame: pd.DataFrame) -> dict[str, int]:
    counts = frame["split"].value_counts()
    return {split: int(counts.get(split, 0)) for split in SPLITS}


def ingest(
    source: str,
    cfg: IngestConfig,
    data_cfg: DataConfig,
    *,
    target: Path | None = None,
    s3_client: Any | None = None,
    progress: Progress | None = None,
    source_name: str | None = None,
) -> IngestReport:
    """Add the images of ``source`` that the dataset lacks; return what was done.

    ``target`` defaults to ``cfg.data_root / cfg.name``. ``source_name`` is how the
    manifest's ``source`` column names the source (default: its path or URI as opened);
    naming it as configured, e.g. relative to the project, keeps the dataset, and so its
    DVC hash, the same wherever the project lies. An unsafe or malformed source is
    refused before anything is written. Existing images keep their path and split; new
    normal training images get a seeded, content-determined train/val split; the rest go
    to test. The new version replaces the old one atomically, or not at all.
    """
    started = time.perf_counter()
    if data_cfg.layout == "manifest":
        raise DataError(
            "data.layout=manifest describes an ingested dataset; ingestion reads "
            "a 'classes' or 'industrial' source"
        )
    target = Path(target if target is not None else Path(cfg.data_root) / cfg.name)
    target = target.expanduser().absolute()
    src = _open_source(source, cfg, s3_client)
    with contextlib.closing(src):
        entries = src.entries()
        if _is_cifar_python(entries):
            src = _CifarPythonSource(src, entries)
            entries = src.entries()
        increment = (target / MANIFEST_NAME).is_file()
        located = _layout(entries, data_cfg, src.uri, increment)
        masks = _mask_entries(entries, data_cfg, src.uri, located)
        log.info("ingesting %d images from %s into %s", len(located), src.uri, target)
        # Everything above only read; from here on we write, beside the target.
        target.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(target.parent):
            _recover(target)
            return _ingest_locked(
                src, located, masks, target, cfg, data_cfg, progress, started,
                source_name or src.uri,
            )


def _ingest_locked(
    src: _Source,
    located: list[tuple[_Entry, LayoutRecord]],
    masks: dict[str, _Entry],
    target: Path,
    cfg: IngestConfig,
    data_cfg: DataConfig,
    progress: Progress | None,
    started: float,
    source_name: str,
) -> IngestReport:
    if (target / MANIFEST_NAME).is_file():
        existing = read_manifest(target)
    elif target.exists() and any(target.iterdir()):
        raise DataError(
            f"{target}: exists but holds no {MANIFEST_NAME}; refusing to write "
            "into it (choose another ingest.name)"
        )
    else:
        existing = pd.DataFrame(columns=MANIFEST_COLUMNS)
    protocol = _protocol(data_cfg)
    recorded = _read_record(target).get("protocol") if len(existing) else None
    if recorded and recorded != protocol:
        changed_keys = ", ".join(
            f"data.{key}={recorded.get(key)!r} (now {value!r})"
            for key, value in protocol.items()
            if recorded.get(key) != value
        )
        raise DataError(
            f"{target}: was ingested with {changed_keys}; a dataset keeps one split "
            "protocol, so ingest into another ingest.name or restore those values"
        )
    known = set(existing["sha256"])
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        found, duplicates, again = _stream(src, located, known, staging, cfg, progress,
                                           image_rules(data_cfg))
        copies, added_copies, warnings = _judge_copies(found, again, existing, data_cfg,
                                                       source_name)
        skipped = tuple(
            f"{src.uri}/{f.copies[0][1]}: {f.probe.error}"
            for f in found.values()
            if f.probe and f.probe.error
        )
        rows, picked = [], []
        for sha, item in found.items():
            probe = item.probe
            if probe is None or probe.error is not None:
                continue
            rec, rel = _pick(item.copies)
            split = _split_of(rec, sha, data_cfg)
            rows.append(
                {
                    "path": image_path(sha, probe.suffix),
                    "sha256": sha,
                    "label": rec.label,
                    "is_normal": rec.is_normal,
                    "split": split,
                    "width": probe.width,
                    "height": probe.height,
                    "channels": probe.channels,
                    "source": f"{source_name}/{rel}",
                    "mask": "",
                    COPIES_COLUMN: encode_copies(copies.get(sha, [])),
                }
            )
            picked.append(rec)
        stored_masks = _store_masks(src, rows, picked, masks, staging)
        new = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, COPIES_COLUMN])
        if new.empty and not added_copies:
            shutil.rmtree(staging)
            frame, changed = existing, False
        else:
            previously_decoded = existing.empty or manifest_decoded(target)
            if not existing.empty:
                _link_tree(target, staging, existing)
            frame = _with_added_copies(existing, added_copies)
            frame = pd.concat([frame, new], ignore_index=True) if len(existing) else new
            frame = frame.sort_values("path", ignore_index=True)
            _write_manifest(staging, frame, previously_decoded, protocol)
            _swap(staging, target)
            changed = True
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return IngestReport(
        dataset=target,
        source=src.uri,
        added=_counts(new),
        totals=_counts(frame),
        seen=len(located),
        duplicates=duplicates,
        conflicts=tuple(warnings),
        skipped=skipped,
        changed=changed,
        seconds=time.perf_counter() - started,
        masks=stored_masks if changed else 0,
    )


def _stream(
    src: _Source,
    located: list[tuple[_Entry, LayoutRecord]],
    known: set[str],
    staging: Path,
    cfg: IngestConfig,
    progress: Progress | None,
    rules: ImageRules | None = None,
) -> tuple[dict[str, _Found], int, list[tuple[str, LayoutRecord, str]]]:
    """Read every source image once: hash it, and decode + store the ones not yet known.
    Also returns ``(sha256, record, path inside the source)`` of each already stored one."""
    found: dict[str, _Found] = {}
    duplicates = 0
    again: list[tuple[str, LayoutRecord, str]] = []
    keys: list[str] = []
    batch: list[tuple[str, bytes]] = []
    decoder = _Decoder(staging, cfg.workers, len(located), rules)  # what training accepts

    def settle(results: Iterator[tuple[str, ImageProbe]]) -> None:
        done = 0
        for sha, probe in results:
            found[sha].probe = probe
            done += 1
            if probe.error is not None and cfg.on_bad_image == "fail":
                raise DataError(
                    f"{src.uri}/{found[sha].copies[0][1]}: {probe.error} "
                    "(set ingest.on_bad_image=skip to leave such images out)"
                )
        if progress and done:
            progress(done)

    try:
        entries = [entry for entry, _ in located]
        for (entry, rec), (read_entry, data) in zip(located, src.read(entries), strict=True):
            assert read_entry is entry
            sha = sha256_hex(data)
            if sha in known:
                duplicates += 1
                again.append((sha, rec, entry.where))
                continue
            if sha in found:
                duplicates += 1
                found[sha].copies.append((rec, entry.where))
                continue
            found[sha] = _Found([(rec, entry.where)])
            keys.append(sha)
            batch.append((sha, data))
            if len(batch) == decoder.chunk:
                settle(decoder.submit(keys, batch))
                keys, batch = [], []
        if batch:
            settle(decoder.submit(keys, batch))
        settle(decoder.drain())
    finally:
        decoder.close()
    return found, duplicates, again


def _split_of(rec: LayoutRecord, sha: str, data_cfg: DataConfig) -> str:
    if not rec.is_normal or rec.partition == "test":
        return "test"
    return assign_split(sha, data_cfg.seed, data_cfg.val_fraction)


def _judge_copies(
    found: dict[str, _Found],
    again: list[tuple[str, LayoutRecord, str]],
    existing: pd.DataFrame,
    data_cfg: DataConfig,
    source_name: str,
) -> tuple[dict[str, list[ImageCopy]], dict[str, list[ImageCopy]], list[str]]:
    """Apply ``data.duplicates`` to identical copies, named as the user gave them: among the
    source's new images, and against images already stored (the stored row never moves;
    the same file ingested again, or a copy already recorded, is no finding). Returns the
    copies not kept per new image and per stored image, and the warning lines."""

    def copy(rec: LayoutRecord, where: str, sha: str) -> ImageCopy:
        return ImageCopy(f"{source_name}/{where}", rec.label, _split_of(rec, sha, data_cfg),
                         rec.is_normal)

    findings: list[DuplicateFinding] = []
    not_kept: dict[str, list[ImageCopy]] = {}
    for sha, item in found.items():
        group = [copy(rec, where, sha) for rec, where in item.copies]
        kept = group[item.copies.index(_pick(item.copies))]  # the copy the row describes
        not_kept[sha] = [c for c in group if c is not kept]
        findings += [DuplicateFinding(classify(kept, c), kept, c) for c in not_kept[sha]]
    stored = existing.drop_duplicates("sha256").set_index("sha256") if again else existing
    added: dict[str, list[ImageCopy]] = {}
    for sha, rec, where in again:
        row = stored.loc[sha]
        name = row["source"] if isinstance(row["source"], str) and row["source"] else row["path"]
        kept = ImageCopy(name, row["label"], row["split"], bool(row["is_normal"]))
        new = copy(rec, where, sha)
        recorded = {c.name for c in decode_copies(row.get(COPIES_COLUMN), f"{name} (manifest)")}
        recorded |= {c.name for c in added.get(sha, [])}
        same_file = name == new.name or (name.endswith(f"/{where}") and kept == ImageCopy(
            name, new.label, new.split, new.is_normal))
        if same_file or new.name in recorded:
            continue
        findings.append(DuplicateFinding(classify(kept, new), kept, new))
        added.setdefault(sha, []).append(new)
    return not_kept, added, apply_policy(findings, data_cfg.duplicates)


def _with_added_copies(frame: pd.DataFrame, added: dict[str, list[ImageCopy]]) -> pd.DataFrame:
    """``frame`` with the copies of stored images found now appended to their rows."""
    if not added:
        return frame
    frame = frame.copy()
    if COPIES_COLUMN not in frame:
        frame[COPIES_COLUMN] = ""
    for i in frame.index[frame["sha256"].isin(list(added))]:
        where = f"{frame.at[i, 'path']} (manifest)"
        before = decode_copies(frame.at[i, COPIES_COLUMN], where)
        frame.at[i, COPIES_COLUMN] = encode_copies(before + added[frame.at[i, "sha256"]])
    return frame


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (no lock file is left behind)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(
                f"{directory}: another ingestion is writing here; run again when it has finished"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _recover(target: Path) -> None:
    """Undo what an interrupted run left: restore a version moved aside, drop temp folders."""
    backups = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if backups and not target.exists():
        log.warning("restoring %s from an interrupted ingestion", target)
        os.rename(backups.pop(), target)
    for stale in [*backups, *target.parent.glob(f".{target.name}.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _link_tree(source: Path, dest: Path, existing: pd.DataFrame) -> None:
    """Hard-link every file of the current version into the new one (copy if linking fails);
    the files we rewrite are skipped."""
    for dirpath, dirnames, filenames in os.walk(source):
        rel = Path(dirpath).relative_to(source)
        (dest / rel).mkdir(exist_ok=True)
        for name in filenames:
            if rel == Path(".") and name in (MANIFEST_NAME, RECORD_NAME):
                continue
            src_file, dst_file = Path(dirpath) / name, dest / rel / name
            try:
                os.link(src_file, dst_file)
            except FileExistsError:
                pass  # a new image that an old one already covers: same bytes
            except OSError:
                shutil.copy2(src_file, dst_file)
        dirnames.sort()
    missing = [p for p in existing["path"] if not (dest / p).is_file()]
    if missing:
        raise DataError(
            f"{source / missing[0]}: listed in {MANIFEST_NAME} but missing "
            f"({len(missing)} such files); restore the dataset (`dvc checkout`) "
            "before ingesting more"
        )


def _protocol(data_cfg: DataConfig) -> dict[str, Any]:
    """The DataConfig values that decide labels and splits; fixed for a dataset's life."""
    keys = ("layout", "anomalous_class", "seed", "val_fraction")
    return {key: getattr(data_cfg, key) for key in keys}


def _write_manifest(
    dataset: Path, frame: pd.DataFrame, all_decoded: bool, protocol: dict[str, Any]
) -> None:
    manifest = dataset / MANIFEST_NAME
    # The optional copies column is written only when some image has copies (CIFAR-10 has
    # none: its manifest, and so its DVC hash, stay as they were).
    extra = COPIES_COLUMN in frame and frame[COPIES_COLUMN].fillna("").astype(str).ne("").any()
    with open(manifest, "w", newline="") as fh:
        frame[[*MANIFEST_COLUMNS, *([COPIES_COLUMN] if extra else [])]].to_csv(fh, index=False)
        fh.flush()
        os.fsync(fh.fileno())
    record = {
        "format": 1,
        "images": len(frame),
        "all_decoded": all_decoded,
        "manifest_sha256": sha256_hex(manifest.read_bytes()),
        "protocol": protocol,
    }
    (dataset / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <linux/fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); False where the system or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without it
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap(staging: Path, target: Path) -> None:
    """Put ``staging`` in place of ``target``: one atomic exchange where the system allows
    it (a reader, or a run killed at any instant, finds the old version or the new, never
    none), else two renames (a kill between them leaves the old version moved aside, which
    ``_recover`` puts back); on failure, undo."""
    if target.exists() and _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous version
        return
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    had_target = target.exists()
    if had_target:
        os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        if had_target:
            os.rename(backup, target)
        raise
    if had_target:
        shutil.rmtree(backup, ignore_errors=True)
