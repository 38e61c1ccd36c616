"""Ingestion: layout and split, duplicates, incremental runs, atomicity, unsafe archives,
the CIFAR-10 python format, and S3 (integration: a moto server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from components.config import DataConfig, IngestConfig
from components.data import ingest as ingestion
from components.data.duplicates import decode_copies
from components.data.ingest import ingest
from components.data.layout import assign_split
from components.data.manifest import MANIFEST_COLUMNS, read_manifest
from components.data.sources.cifar import restricted_loads
from components.data.sources.s3 import make_s3_client
from components.data.splits import load_splits
from components.errors import DataError

CLASSES = ("cat", "dog", "bird")  # bird is the anomalous class
DATA_CFG = DataConfig(anomalous_class="bird", val_fraction=0.25, seed=3)
CFG = IngestConfig(workers=1)


def _png(rng: np.random.Generator, size: int = 32, mode: str = "RGB") -> bytes:
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def _make_source(root: Path, seed: int = 0, train: int = 8, test: int = 3) -> Path:
    """``train/<class>/*.png`` and ``test/<class>/*.png`` of random, distinct images."""
    rng = np.random.default_rng(seed)
    for partition, n in (("train", train), ("test", test)):
        for label in CLASSES:
            folder = root / partition / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{seed}_{i}.png").write_bytes(_png(rng))
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return _make_source(tmp_path / "src")


@pytest.fixture
def target(tmp_path: Path) -> Path:
    return tmp_path / "data" / "toy"


# ----------------------------------------------------------------------------------------
# Layout, split, contract with components.data
# ----------------------------------------------------------------------------------------


def test_folder_ingest_writes_content_addressed_images_and_a_manifest(source, target):
    report = ingest(str(source), CFG, DATA_CFG, target=target)
    frame = read_manifest(target)
    assert list(frame.columns) == MANIFEST_COLUMNS
    assert len(frame) == report.seen == 3 * (8 + 3)
    assert report.changed and report.images_added == len(frame)
    assert (
        report.totals
        == frame["split"].value_counts().reindex(["train", "val", "test"], fill_value=0).to_dict()
    )
    source_shas = {_sha(p.read_bytes()): p for p in source.rglob("*.png")}
    for row in frame.itertuples():
        stored = (target / row.path).read_bytes()
        assert _sha(stored) == row.sha256  # stored bytes are the source's, unchanged
        assert stored == source_shas[row.sha256].read_bytes()
        assert row.path == f"images/{row.sha256[:2]}/{row.sha256}.png"
        assert (row.width, row.height, row.channels) == (32, 32, 3)
        origin = source_shas[row.sha256]
        assert row.source == f"{source}/{origin.relative_to(source).as_posix()}"
        partition, label = origin.relative_to(source).parts[:2]
        assert row.label == label and row.is_normal == (label != "bird")
        if label == "bird" or partition == "test":
            assert row.split == "test"  # leave-one-class-out: all bird images are test
        else:
            assert row.split == assign_split(row.sha256, DATA_CFG.seed, DATA_CFG.val_fraction)
    assert set(frame.loc[frame.split != "test", "is_normal"]) == {True}
    assert {"train", "val"} <= set(frame.split)


def test_training_reads_the_ingested_dataset(source, target):
    ingest(str(source), CFG, DATA_CFG, target=target)
    splits = load_splits(DATA_CFG.model_copy(update={"source": str(target)}))
    frame = read_manifest(target)
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(frame)
    assert splits.test.is_anomaly.sum() == (~frame.is_normal).sum() == 11
    assert tuple(splits.train.images.shape[1:]) == (3, 32, 32)


def test_split_is_deterministic_and_the_manifest_reproducible(source, tmp_path):
    a = ingest(str(source), CFG, DATA_CFG, target=tmp_path / "a" / "toy")
    b = ingest(str(source), CFG, DATA_CFG, target=tmp_path / "b" / "toy")
    assert (a.dataset / "manifest.csv").read_bytes() == (b.dataset / "manifest.csv").read_bytes()
    other = ingest(
        str(source), CFG, DATA_CFG.model_copy(update={"seed": 4}), target=tmp_path / "c" / "toy"
    )
    assert _tree(other.dataset).keys() == _tree(a.dataset).keys()  # same images, other split
    manifest = "manifest.csv"
    assert (other.dataset / manifest).read_bytes() != (a.dataset / manifest).read_bytes()


def test_archives_give_the_same_dataset_as_the_folder(source, tmp_path):
    tgz, zpath, dot = tmp_path / "toy.tar.gz", tmp_path / "toy.zip", tmp_path / "dot.tar"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(source, arcname="toy")  # a wrapping folder, stripped like cifar10/
    with tarfile.open(dot, "w") as tar:
        tar.add(source, arcname=".")  # as `tar -C src -cf dot.tar .` writes it: ./train/...
    with zipfile.ZipFile(zpath, "w") as zf:
        for file in sorted(source.rglob("*.png")):
            zf.write(file, file.relative_to(source).as_posix())
    folder = read_manifest(ingest(str(source), CFG, DATA_CFG, target=tmp_path / "f" / "t").dataset)
    for archive in (tgz, zpath, dot):
        frame = read_manifest(
            ingest(str(archive), CFG, DATA_CFG, target=tmp_path / archive.suffix / "t").dataset
        )
        columns = [c for c in MANIFEST_COLUMNS if c != "source"]
        pd.testing.assert_frame_equal(frame[columns], folder[columns])
        assert frame.source.str.startswith(str(archive)).all()


def test_industrial_layout_trains_on_good_images_only(tmp_path, target):
    rng = np.random.default_rng(11)
    for folder, n in (("train/good", 8), ("test/good", 3), ("test/scratch", 2), ("test/dent", 2)):
        (tmp_path / "mvtec" / folder).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "mvtec" / folder / f"{i:03d}.png").write_bytes(_png(rng))
    data_cfg = DataConfig(layout="industrial", anomalous_class=None, val_fraction=0.25)
    ingest(str(tmp_path / "mvtec"), CFG, data_cfg, target=target)
    frame = read_manifest(target)
    assert len(frame) == 15
    assert set(frame.loc[frame.split != "test", "label"]) == {"good"}
    assert (frame.split != "test").sum() == 8
    test = frame[frame.split == "test"]
    assert (test.is_normal == (test.label == "good")).all() and (~test.is_normal).sum() == 4


def test_exact_duplicates_are_stored_once_and_doubtful_copies_go_to_test(source, target):
    image = (source / "train" / "cat" / "0_0.png").read_bytes()
    (source / "train" / "cat" / "copy.png").write_bytes(image)  # same class, same split
    (source / "test" / "bird" / "copy.png").write_bytes(image)  # also labelled anomalous
    with pytest.raises(DataError, match=rf"^{source}/test/bird/copy.png and {source}/train/cat/"
                                        r"\S+.png: identical bytes under two labels"):
        ingest(str(source), CFG, DATA_CFG, target=target)  # data.duplicates: fail (default)
    assert not target.exists()
    warn = DATA_CFG.model_copy(update={"duplicates": "warn"})
    report = ingest(str(source), CFG, warn, target=target)
    frame = read_manifest(target)
    assert report.seen == 35 and len(frame) == 33 and report.duplicates == 2
    row = frame.loc[frame.sha256 == _sha(image)].iloc[0]
    assert (row.label, row.is_normal, row.split) == ("bird", False, "test")
    assert sorted(c.name for c in decode_copies(row.copies, "row")) == [
        f"{source}/train/cat/0_0.png", f"{source}/train/cat/copy.png"]
    assert len(report.conflicts) == 2 and all("under two labels" in c for c in report.conflicts)
    assert len(list((target / "images").rglob("*.png"))) == 33
    stamp = (target / "manifest.csv").read_bytes()
    again = ingest(str(source), CFG, warn, target=target)  # the same files: nothing new
    assert not again.changed and again.conflicts == ()
    assert (target / "manifest.csv").read_bytes() == stamp


# ----------------------------------------------------------------------------------------
# Incremental ingestion
# ----------------------------------------------------------------------------------------


def test_ten_new_normal_images_are_added_to_train_val_and_nothing_moves(source, target):
    ingest(str(source), CFG, DATA_CFG, target=target)
    before = read_manifest(target)
    old_files = _tree(target / "images")
    rng = np.random.default_rng(99)
    new = {}
    for i in range(10):
        data = _png(rng)
        new[_sha(data)] = data
        (source / "train" / ("cat" if i % 2 else "dog") / f"new_{i}.png").write_bytes(data)

    report = ingest(str(source), CFG, DATA_CFG, target=target)

    after = read_manifest(target)
    assert report.added["train"] + report.added["val"] == 10 and report.added["test"] == 0
    assert report.images_added == 10 and report.duplicates == len(before)
    added = after[~after.sha256.isin(before.sha256)]
    assert set(added.sha256) == set(new)
    assert set(added.split) <= {"train", "val"} and added.is_normal.all()
    kept = after[after.sha256.isin(before.sha256)].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, before.reset_index(drop=True))  # nothing moved
    files = _tree(target / "images")
    assert {k: files[k] for k in old_files} == old_files
    assert len(files) == len(old_files) + 10


def test_a_folder_of_new_normal_images_alone_is_an_increment(source, tmp_path, target):
    new = tmp_path / "new" / "train" / "dog"
    new.mkdir(parents=True)
    rng = np.random.default_rng(123)
    for i in range(10):
        (new / f"{i}.png").write_bytes(_png(rng))
    with pytest.raises(DataError, match="unknown anomalous class 'bird'"):
        ingest(str(tmp_path / "new"), CFG, DATA_CFG, target=target)  # not a dataset alone
    ingest(str(source), CFG, DATA_CFG, target=target)
    report = ingest(str(tmp_path / "new"), CFG, DATA_CFG, target=target)
    assert report.added["train"] + report.added["val"] == 10 and report.added["test"] == 0
    frame = read_manifest(target)
    assert len(frame) == 33 + 10 and frame.source.str.startswith(str(tmp_path / "new")).sum() == 10


def test_a_dataset_keeps_the_protocol_it_was_ingested_with(source, target):
    ingest(str(source), CFG, DATA_CFG, target=target)
    before = _tree(target)
    for change in ({"anomalous_class": "cat"}, {"seed": 4}, {"val_fraction": 0.2}):
        with pytest.raises(DataError, match=rf"was ingested with data\.{next(iter(change))}="):
            ingest(str(source), CFG, DATA_CFG.model_copy(update=change), target=target)
    assert _tree(target) == before


def test_reingesting_an_unchanged_source_leaves_the_dataset_untouched(source, target):
    ingest(str(source), CFG, DATA_CFG, target=target)
    stamp = (target / "manifest.csv").stat().st_mtime_ns
    report = ingest(str(source), CFG, DATA_CFG, target=target)
    assert not report.changed and report.images_added == 0 and report.duplicates == report.seen
    assert (target / "manifest.csv").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------------------
# Atomicity
# ----------------------------------------------------------------------------------------


def _leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def test_a_failure_part_way_leaves_the_previous_version_intact(source, target, monkeypatch):
    ingest(str(source), CFG, DATA_CFG, target=target)
    before = _tree(target)
    _make_source(source, seed=1, train=2, test=1)  # new images to add

    def crash(*args, **kwargs):
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(ingestion, "_write_manifest", crash)
    with pytest.raises(RuntimeError, match="injected"):
        ingest(str(source), CFG, DATA_CFG, target=target)
    assert _tree(target) == before and _leftovers(target) == []

    monkeypatch.undo()
    renames = []
    real_rename = os.rename

    def rename_fails_on_swap(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:  # staging -> target, after target was moved aside
            raise OSError("rename failed (injected)")
        return real_rename(src, dst)

    monkeypatch.setattr(ingestion.os, "rename", rename_fails_on_swap)
    monkeypatch.setattr(ingestion, "_exchange", lambda a, b: False)  # no RENAME_EXCHANGE here
    with pytest.raises(OSError, match="injected"):
        ingest(str(source), CFG, DATA_CFG, target=target)
    assert _tree(target) == before and _leftovers(target) == []


def test_an_interrupted_swap_is_recovered_on_the_next_run(source, target):
    ingest(str(source), CFG, DATA_CFG, target=target)
    before = read_manifest(target)
    os.rename(target, target.with_name(f".{target.name}.old-deadbeef"))  # crash mid-swap
    (target.parent / f".{target.name}.tmp-cafebabe").mkdir()
    _make_source(source, seed=1, train=1, test=0)
    report = ingest(str(source), CFG, DATA_CFG, target=target)
    assert report.images_added == 3 and report.duplicates == len(before)
    assert _leftovers(target) == []


def test_a_corrupt_image_fails_the_run_or_is_skipped(source, target):
    bad = source / "train" / "dog" / "broken.png"
    bad.write_bytes(_png(np.random.default_rng(5))[:60])  # truncated
    with pytest.raises(DataError, match=r"broken\.png.*(truncated|unreadable)"):
        ingest(str(source), CFG, DATA_CFG, target=target)
    assert not target.exists() and _leftovers(target) == []
    report = ingest(
        str(source), CFG.model_copy(update={"on_bad_image": "skip"}), DATA_CFG, target=target
    )
    assert len(report.skipped) == 1 and "broken.png" in report.skipped[0]
    assert len(read_manifest(target)) == 33


def test_a_concurrent_ingestion_is_refused(source, target):
    target.parent.mkdir(parents=True)
    with ingestion._exclusive(target.parent), pytest.raises(DataError, match="another"):
        ingest(str(source), CFG, DATA_CFG, target=target)


def test_a_folder_that_is_not_a_dataset_is_not_overwritten(source, target):
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds no manifest.csv"):
        ingest(str(source), CFG, DATA_CFG, target=target)
    assert _tree(target) == {"notes.txt": b"mine"}


_POOLED_INGEST = """
import sys
from components.data import ingest as ingestion
from components.data import probing
from components.config import DataConfig, IngestConfig

submitted = []


class SpyPool(probing.ProcessPoolExecutor):
    def submit(self, *args, **kwargs):
        submitted.append(1)
        return super().submit(*args, **kwargs)


probing.ProcessPoolExecutor = SpyPool
probing._POOL_MIN_IMAGES, probing._CHUNK = 1, 4
assert probing.threading.active_count() == 1
ingestion.ingest(sys.argv[1], IngestConfig(workers=2),
                 DataConfig(anomalous_class="bird", val_fraction=0.25, seed=3), target=sys.argv[2])
print(len(submitted))
"""


def test_worker_processes_produce_the_same_dataset(source, tmp_path):
    """Decoding in worker processes gives the same dataset as inline. The pool forks only
    when no other thread runs (the test session has some), so it runs in a fresh process."""
    inline = ingest(str(source), CFG, DATA_CFG, target=tmp_path / "a" / "toy")
    done = subprocess.run(
        [sys.executable, "-c", _POOLED_INGEST, str(source), str(tmp_path / "b" / "toy")],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) > 1  # chunks went to the pool
    assert _tree(tmp_path / "b" / "toy") == _tree(inline.dataset)


# ----------------------------------------------------------------------------------------
# Unsafe archives: refused before anything is written
# ----------------------------------------------------------------------------------------


def _tar_with(path: Path, bad: tarfile.TarInfo | None, extra_files: int = 0) -> Path:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for i in range(2 + extra_files):
            data = _png(rng)
            info = tarfile.TarInfo(f"train/cat/{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if bad is not None:
            payload = io.BytesIO(b"x" * bad.size) if bad.isfile() else None
            tar.addfile(bad, payload)
    return path


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


UNSAFE_TAR = {
    "absolute": (_member("/etc/cron.d/evil.png", size=4), "absolute path"),
    "dotdot": (_member("train/../../evil.png", size=4), r"climbs out"),
    "symlink": (
        _member("train/cat/link.png", tarfile.SYMTYPE, link="/etc/passwd"),
        "symbolic link",
    ),
    "hardlink": (
        _member("train/cat/hard.png", tarfile.LNKTYPE, link="train/cat/0.png"),
        "hard link",
    ),
    "char device": (_member("train/cat/dev.png", tarfile.CHRTYPE), "device file"),
    "block device": (_member("train/cat/blk.png", tarfile.BLKTYPE), "device file"),
    "fifo": (_member("train/cat/fifo.png", tarfile.FIFOTYPE), "FIFO"),
    "oversized": (_member("train/cat/huge.png", size=5000), "max_member_bytes"),
}


@pytest.mark.parametrize("case", list(UNSAFE_TAR))
def test_unsafe_tar_members_are_refused_before_anything_is_written(case, tmp_path, target):
    member, message = UNSAFE_TAR[case]
    archive = _tar_with(tmp_path / "bad.tar.gz", member)
    cfg = CFG.model_copy(update={"max_member_bytes": 4096})
    with pytest.raises(DataError, match=message):
        ingest(str(archive), cfg, DATA_CFG, target=target)
    assert not target.parent.exists()  # not even data/ was created


def test_over_numerous_members_are_refused(tmp_path, target):
    archive = _tar_with(tmp_path / "many.tar.gz", None, extra_files=8)
    with pytest.raises(DataError, match="more than 5 members"):
        ingest(str(archive), CFG.model_copy(update={"max_members": 5}), DATA_CFG, target=target)
    with pytest.raises(DataError, match="max_total_bytes"):
        ingest(
            str(archive), CFG.model_copy(update={"max_total_bytes": 1000}), DATA_CFG, target=target
        )
    assert not target.parent.exists()


def _zip_with(path: Path, name: str, mode: int | None = None, count: int = 1) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train/cat/ok.png", _png(np.random.default_rng(0)))
        for i in range(count):
            info = zipfile.ZipInfo(name if count == 1 else f"{name}{i}")
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, b"target" if mode else b"x" * 64)
    return path


@pytest.mark.parametrize(
    ("name", "mode", "count", "message"),
    [
        ("/abs/evil.png", None, 1, "absolute path"),
        ("C:/evil.png", None, 1, "absolute path"),
        ("train/../../evil.png", None, 1, "climbs out"),
        ("train/cat/link.png", 0o120777, 1, "symbolic link"),
        ("train/cat/fifo.png", 0o010644, 1, "FIFO"),
        ("train/cat/dev.png", 0o020644, 1, "device file"),
        ("train/cat/many", None, 10, "more than 5 members"),
        ("train/cat/big.png", None, 1, "max_member_bytes"),
    ],
)
def test_unsafe_zip_members_are_refused(name, mode, count, message, tmp_path, target):
    archive = _zip_with(tmp_path / "bad.zip", name, mode, count)
    cfg = CFG.model_copy(
        update={"max_members": 5, "max_member_bytes": 60 if "big" in name else 4096}
    )
    with pytest.raises(DataError, match=message):
        ingest(str(archive), cfg, DATA_CFG, target=target)
    assert not target.parent.exists()


# ----------------------------------------------------------------------------------------
# The original CIFAR-10 python format
# ----------------------------------------------------------------------------------------


def _cifar_python_archive(path: Path, per_batch: int = 6) -> dict[str, tuple[np.ndarray, str]]:
    """A miniature ``cifar-10-python.tar.gz``; returns (pixels, class) by image name."""
    rng = np.random.default_rng(7)
    names = [b"airplane", b"automobile", b"bird"]
    pixels = {}
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, obj: object) -> None:
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch})
        for batch in ("data_batch_1", "test_batch"):
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            labels = [i % 3 for i in range(per_batch)]
            files = [f"{batch}_{i}.png".encode() for i in range(per_batch)]
            for row, file, label in zip(data, files, labels, strict=True):
                # (3072,) = R, G, B planes -> (32, 32, 3)
                image = row.reshape(3, 32, 32).transpose(1, 2, 0)
                pixels[file.decode()] = (image, names[label].decode())
            add(
                batch,
                {
                    b"batch_label": batch.encode(),
                    b"labels": labels,
                    b"data": data,
                    b"filenames": files,
                },
            )
    return pixels


def test_cifar10_python_batches_become_lossless_images(tmp_path, target):
    pixels = _cifar_python_archive(tmp_path / "cifar-10-python.tar.gz")
    data_cfg = DataConfig(anomalous_class="automobile", val_fraction=0.25)
    report = ingest(str(tmp_path / "cifar-10-python.tar.gz"), CFG, data_cfg, target=target)
    frame = read_manifest(target)
    assert len(frame) == 12 and report.totals["test"] == 6 + 2  # test batch + train autos
    for row in frame.itertuples():
        assert row.source.startswith(f"{tmp_path}/cifar-10-python.tar.gz/cifar-10-batches-py/")
        image, label = pixels[Path(row.source).name]  # .../<batch>/<file name>
        decoded = np.asarray(Image.open(target / row.path))
        assert np.array_equal(decoded, image)  # exact pixels: no lossy re-encoding
        assert row.label == label and row.path.endswith(".ppm")
    again = ingest(str(tmp_path / "cifar-10-python.tar.gz"), CFG, data_cfg, target=target)
    assert not again.changed  # deterministic bytes: everything is found already stored


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_the_restricted_unpickler_refuses_anything_but_numpy_arrays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"posix\.system is not allowed|os\.system"):
        restricted_loads(pickle.dumps({"data": _Exploit()}, protocol=2), "evil")
    with pytest.raises(DataError, match="is not allowed"):
        restricted_loads(pickle.dumps(shutil.rmtree), "evil")
    assert not (tmp_path / "pwned").exists()
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        loaded = restricted_loads(pickle.dumps({b"data": array}, protocol=protocol), "ok")
        assert np.array_equal(loaded[b"data"], array)


def test_a_malicious_cifar_batch_is_refused_with_nothing_written(tmp_path, target):
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in (
            ("batches.meta", {b"label_names": [b"a", b"b"]}),
            ("data_batch_1", _Exploit()),
        ):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"data_batch_1: refused or unreadable pickle"):
        ingest(str(path), CFG, DataConfig(anomalous_class="a"), target=target)
    assert not target.parent.exists()


# ----------------------------------------------------------------------------------------
# CLI: errors are one red line and exit 2
# ----------------------------------------------------------------------------------------


def test_cli_ingest_reports_a_bad_source_in_one_line(tmp_path):
    import typer
    from typer.testing import CliRunner

    from components.cli.data import register

    app = typer.Typer()
    register(app)
    (tmp_path / "params.yaml").write_text("data:\n  anomalous_class: bird\n")
    result = CliRunner().invoke(
        app,
        ["ingest", str(tmp_path / "missing"), "--no-track", "-p", str(tmp_path / "params.yaml")],
    )
    assert result.exit_code == 2  # nestad's exit code for a user error
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last == f"error: {tmp_path / 'missing'}: no such file or folder"


def test_the_same_source_gives_the_same_data_version_wherever_the_project_lies(
    tmp_path, monkeypatch
):
    """`nestad ingest --track` with params.yaml's relative source: the manifest names the
    source as configured, so two projects in different places get the same data.dvc md5
    (a committed data.dvc is then reproducible from the source)."""
    import typer
    from typer.testing import CliRunner

    from components.cli.data import register

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    app = typer.Typer()
    register(app)
    versions = []
    for place in ("a/deep/place", "elsewhere"):
        base = tmp_path / place
        _make_source(base / "source")
        project = base / "project"
        project.mkdir(parents=True)
        (project / "params.yaml").write_text(
            "data:\n  anomalous_class: bird\n"
            "ingest:\n  source: ../source\n  data_root: data\n  name: toy\n  workers: 1\n"
        )
        result = CliRunner().invoke(app, ["ingest", "--track", "-p", str(project / "params.yaml")])
        assert result.exit_code == 0, result.output
        manifest = read_manifest(project / "data" / "toy")
        assert manifest["source"].str.startswith("../source/train/").any()
        versions.append(yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"])
    assert versions[0] == versions[1] and versions[0].endswith(".dir")


# ----------------------------------------------------------------------------------------
# S3 (integration): a moto server on 127.0.0.1
# ----------------------------------------------------------------------------------------


@pytest.fixture
def s3_source(moto_endpoint, source, fake_aws) -> tuple[str, IngestConfig]:
    """The toy source uploaded under s3://<bucket>/datasets/toy/ (fake credentials)."""
    cfg = CFG.model_copy(
        update={
            "s3_endpoint_url": moto_endpoint,
            "s3_page_size": 7,
            "s3_workers": 4,
            "s3_max_attempts": 3,
        }
    )
    client = make_s3_client(cfg)
    bucket = f"nestad-{time.monotonic_ns()}"
    client.create_bucket(Bucket=bucket)
    for file in source.rglob("*.png"):
        client.put_object(
            Bucket=bucket, Key=f"datasets/toy/{file.relative_to(source)}", Body=file.read_bytes()
        )
    client.put_object(Bucket=bucket, Key="datasets/toy/", Body=b"")  # a "folder" marker
    return f"s3://{bucket}/datasets/toy", cfg


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: object):
        yield self.body

    def read(self, *_: object, **__: object) -> bytes:
        return self.body


def _fail_get_object(client, should_fail) -> list[str]:
    """Answer GetObject with HTTP 500 while ``should_fail(url, n)``; returns failed URLs."""
    from botocore.awsrequest import AWSResponse

    failed: list[str] = []

    def hook(request, **_):
        if should_fail(request.url, len(failed)):
            failed.append(request.url)
            body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
            return AWSResponse(request.url, 500, {}, _Raw(body))
        return None

    client.meta.events.register("before-send.s3.GetObject", hook)
    return failed


@pytest.mark.integration
def test_s3_ingest_matches_the_folder(s3_source, source, tmp_path):
    uri, cfg = s3_source
    report = ingest(uri, cfg, DATA_CFG, target=tmp_path / "s3" / "toy")
    local = ingest(str(source), CFG, DATA_CFG, target=tmp_path / "local" / "toy")
    columns = [c for c in MANIFEST_COLUMNS if c != "source"]
    pd.testing.assert_frame_equal(
        read_manifest(report.dataset)[columns], read_manifest(local.dataset)[columns]
    )
    assert read_manifest(report.dataset).source.str.startswith(uri + "/train/").sum() == 24


@pytest.mark.integration
def test_s3_transient_failures_are_absorbed_by_retries(s3_source, tmp_path):
    uri, cfg = s3_source
    client = make_s3_client(cfg)
    failed = _fail_get_object(client, lambda url, n: n < 3)  # the first 3 GETs answer 500
    report = ingest(uri, cfg, DATA_CFG, target=tmp_path / "data" / "toy", s3_client=client)
    assert len(failed) == 3
    assert report.images_added == 33 and len(read_manifest(report.dataset)) == 33


@pytest.mark.integration
def test_s3_a_permanently_failing_object_leaves_nothing_half_written(s3_source, source, tmp_path):
    uri, cfg = s3_source
    cfg = cfg.model_copy(update={"s3_max_attempts": 2})  # one retry: keeps the backoff short
    target = tmp_path / "data" / "toy"
    client = make_s3_client(cfg)
    failed = _fail_get_object(client, lambda url, n: url.endswith("train/dog/0_3.png"))
    with pytest.raises(DataError, match=r"train/dog/0_3\.png: download failed.*max retries"):
        ingest(uri, cfg, DATA_CFG, target=target, s3_client=client)
    assert len(failed) == cfg.s3_max_attempts
    assert not target.exists() and _leftovers(target) == []
    # With a previous version in place, the failed run leaves it exactly as it was.
    (source / "train" / "cat" / "0_0.png").unlink()
    ingest(str(source), CFG, DATA_CFG, target=target)
    before = _tree(target)
    with pytest.raises(DataError, match="max retries"):
        ingest(uri, cfg, DATA_CFG, target=target, s3_client=client)
    assert _tree(target) == before and _leftovers(target) == []


@pytest.mark.integration
def test_s3_missing_bucket_is_a_clear_error(s3_source, tmp_path):
    _, cfg = s3_source
    with pytest.raises(DataError, match=r"s3://no-such-bucket/x: listing failed \(NoSuchBucket"):
        ingest("s3://no-such-bucket/x", cfg, DATA_CFG, target=tmp_path / "data" / "t")
