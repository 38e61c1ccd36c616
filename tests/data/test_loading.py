"""Image datasets: layouts, sources, leak-free splits, decoding and one error per bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.data.images import to_model_input
from components.data.splits import load_images, load_splits
from components.errors import ConfigError, DataError

ANOMALOUS = "stripes"


def _load(tiny_params, source: Path, layout: str, **overrides):
    cfg = tiny_params(
        data={"source": str(source), "layout": layout, "anomalous_class": ANOMALOUS, **overrides}
    ).data
    return load_splits(cfg)


def _split_of(splits) -> dict[str, str]:
    return dict(zip(splits.manifest["path"], splits.manifest["split"], strict=True))


# --- sources and layouts ----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["classes", "industrial"])
def test_folder_tar_gz_and_zip_give_identical_splits(
    make_dataset, synth, tiny_params, layout: str
) -> None:
    folder = make_dataset(layout)
    loaded = [
        _load(tiny_params, src, layout)
        for src in (folder, synth.pack(folder, "tar.gz"), synth.pack(folder, "zip"))
    ]
    reference = loaded[0].manifest.drop(columns="source")
    assert len(reference) == sum(1 for p in folder.rglob("*.png"))
    assert set(reference["split"]) == {"train", "val", "test"}
    for other in loaded[1:]:
        pd.testing.assert_frame_equal(other.manifest.drop(columns="source"), reference)
        for name in ("train", "val", "test"):
            mine, theirs = getattr(other, name), getattr(loaded[0], name)
            assert torch.equal(mine.images, theirs.images)
            np.testing.assert_array_equal(mine.is_anomaly, theirs.is_anomaly)


def test_classes_layout_sends_the_anomalous_class_train_and_test_images_to_test(
    classes_dir, tiny_params
) -> None:
    splits = _load(tiny_params, classes_dir, "classes")
    m = splits.manifest
    anomalous = m[m["label"] == ANOMALOUS]
    assert len(anomalous) == len(list((classes_dir / "train" / ANOMALOUS).glob("*.png"))) + len(
        list((classes_dir / "test" / ANOMALOUS).glob("*.png"))
    )
    assert set(anomalous["split"]) == {"test"}
    assert not anomalous["is_normal"].any()
    assert (m.loc[m["label"] != ANOMALOUS, "is_normal"]).all()
    # test holds the anomalous class (from train/ and test/) plus the normal test images
    normal_test = m[(m["split"] == "test") & m["is_normal"]]
    assert splits.test.is_anomaly.sum() == len(anomalous)
    assert (splits.test.is_anomaly == 0).sum() == len(normal_test) == 2 * 4
    assert all(p.startswith("test/") for p in normal_test["path"])
    assert all(
        label == ANOMALOUS
        for label, flag in zip(splits.test.labels, splits.test.is_anomaly, strict=True)
        if flag
    )


def test_industrial_layout_marks_defects_anomalous(industrial_dir, synth, tiny_params) -> None:
    splits = _load(tiny_params, industrial_dir, "industrial")
    test_labels = np.array(splits.test.labels)
    np.testing.assert_array_equal(splits.test.is_anomaly, (test_labels == synth.defect).astype(int))
    assert (test_labels == synth.defect).sum() == 4
    assert (test_labels == "good").sum() == 4
    assert set(splits.train.labels) | set(splits.val.labels) == {"good"}
    assert all(p.startswith("train/good/") for p in splits.train.paths + splits.val.paths)


@pytest.mark.parametrize("layout", ["classes", "industrial"])
def test_train_and_val_hold_normal_images_only(make_dataset, tiny_params, layout) -> None:
    splits = _load(tiny_params, make_dataset(layout), layout)
    assert len(splits.train) > 0 and len(splits.val) > 0
    assert splits.train.is_anomaly.sum() == 0 and splits.val.is_anomaly.sum() == 0
    m = splits.manifest
    assert m.loc[m["split"] != "test", "is_normal"].all()
    # val comes only from the normal *training* images
    assert all(p.startswith("train/") for p in splits.val.paths)


def test_val_split_is_deterministic_for_a_seed_and_changes_with_it(
    classes_dir, tiny_params
) -> None:
    first = _load(tiny_params, classes_dir, "classes")
    again = _load(tiny_params, classes_dir, "classes")
    other = _load(tiny_params, classes_dir, "classes", seed=1)
    assert first.val.paths == again.val.paths
    assert torch.equal(first.val.images, again.val.images)
    assert set(first.val.paths) != set(other.val.paths)


def test_adding_images_never_moves_an_existing_one(classes_dir, synth, tiny_params) -> None:
    before = _split_of(_load(tiny_params, classes_dir, "classes"))
    for cls in synth.classes:
        synth.write_images(classes_dir / "train" / cls, cls, 10, tag="new")
        synth.write_images(classes_dir / "test" / cls, cls, 2, tag="new")
    after = _split_of(_load(tiny_params, classes_dir, "classes"))
    assert len(after) == len(before) + 36
    assert {p: after[p] for p in before} == before


def test_max_images_take_a_stratified_subset(classes_dir, tiny_params) -> None:
    splits = _load(tiny_params, classes_dir, "classes", max_test_images=8, max_train_images=12)
    assert len(splits.test) == 8
    assert 0 < splits.test.is_anomaly.sum() < 8
    assert len(splits.train) + len(splits.val) == 12


# --- decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("channels", [1, 3])
def test_grey_and_rgb_sources_decode_to_the_configured_channels(
    make_dataset, tiny_params, mode: str, channels: int
) -> None:
    folder = make_dataset("industrial", mode=mode, n_train=6, n_test=2, n_defect=2)
    splits = _load(tiny_params, folder, "industrial", channels=channels, val_fraction=0.3)
    for part in (splits.train, splits.val, splits.test):
        assert part.images.shape[1:] == (channels, 16, 16)
        assert part.images.dtype == torch.uint8
    if mode == "L" and channels == 3:  # grey promoted to RGB: three equal planes
        img = splits.train.images
        assert torch.equal(img[:, 0], img[:, 1]) and torch.equal(img[:, 1], img[:, 2])
    if mode == "RGB" and channels == 3:  # the tint survives: planes differ
        assert not torch.equal(splits.train.images[:, 0], splits.train.images[:, 2])


@pytest.mark.parametrize("image_size", [32, 64])
def test_images_are_resized_and_original_sizes_recorded(
    make_dataset, tiny_params, image_size: int
) -> None:
    folder = make_dataset("industrial", size=40, n_train=6, n_test=2, n_defect=2)
    splits = _load(tiny_params, folder, "industrial", image_size=image_size, val_fraction=0.3)
    assert splits.train.images.shape[1:] == (3, image_size, image_size)
    assert splits.test.images.shape[1:] == (3, image_size, image_size)
    assert set(splits.manifest["width"]) == {40} and set(splits.manifest["height"]) == {40}
    x = to_model_input(splits.train.images)
    assert x.dtype == torch.float32 and x.min() >= -1.0 and x.max() <= 1.0


def test_model_input_maps_uint8_range_to_minus_one_one() -> None:
    x = to_model_input(torch.tensor([0, 255, 128], dtype=torch.uint8))
    assert x.dtype == torch.float32
    assert torch.allclose(x, torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)


def test_image_size_not_multiple_of_16_is_a_config_error(tiny_params) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        tiny_params(data={"image_size": 24})


# --- bad inputs: each gives a DataError naming the file -----------------------------------


def _truncated_png(path: Path, synth) -> None:
    synth.image("blob", 0, 32).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_file(kind: str, root: Path, synth) -> str:
    """Plant one bad input in an industrial dataset; return the name the error must carry."""
    if kind == "truncated":
        path = root / "train" / "good" / "truncated.png"
        _truncated_png(path, synth)
    elif kind == "garbage":
        path = root / "test" / "good" / "garbage.png"
        path.write_bytes(b"this is not a PNG at all" * 10)
    elif kind == "non_image":
        path = root / "train" / "good" / "notes.txt"
        path.write_text("not an image")
    elif kind == "empty_class":
        path = root / "test" / "crack"
        path.mkdir()
    elif kind == "too_small":
        path = root / "test" / "good" / "tiny.png"
        synth.image("blob", 1, 4).save(path)
    else:
        raise ValueError(kind)
    return path.name


@pytest.mark.parametrize("kind", ["truncated", "garbage", "non_image", "empty_class", "too_small"])
def test_bad_input_in_a_folder_raises_data_error_naming_it(
    industrial_dir, synth, tiny_params, kind: str
) -> None:
    name = _bad_file(kind, industrial_dir, synth)
    with pytest.raises(DataError, match=name):
        _load(tiny_params, industrial_dir, "industrial")


@pytest.mark.parametrize("kind", ["truncated", "garbage", "non_image", "too_small"])
def test_bad_input_in_an_archive_raises_data_error_naming_it(
    industrial_dir, synth, tiny_params, kind: str
) -> None:
    name = _bad_file(kind, industrial_dir, synth)
    archive = synth.pack(industrial_dir, "zip")
    with pytest.raises(DataError, match=name):
        _load(tiny_params, archive, "industrial")


def test_too_small_error_says_the_sizes(industrial_dir, synth, tiny_params) -> None:
    _bad_file("too_small", industrial_dir, synth)
    with pytest.raises(DataError, match=r"4x4.*8x8"):
        _load(tiny_params, industrial_dir, "industrial")


def test_unknown_anomalous_class_is_named_with_the_known_ones(classes_dir, tiny_params) -> None:
    with pytest.raises(DataError, match=r"'airplane'.*blob, gradient, stripes"):
        _load(tiny_params, classes_dir, "classes", anomalous_class="airplane")


def test_missing_source_is_a_data_error(tmp_path, tiny_params) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        _load(tiny_params, tmp_path / "nowhere", "industrial")


def test_corrupt_archive_is_a_data_error(tmp_path, tiny_params) -> None:
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"PK but not really a zip")
    with pytest.raises(DataError, match="data.zip"):
        _load(tiny_params, archive, "industrial")


# --- load_images: files and folders for scoring -------------------------------------------


def test_load_images_reads_files_and_folders(tmp_path, synth) -> None:
    folder = tmp_path / "incoming"
    written = synth.write_images(folder, "blob", 3) + synth.write_images(folder / "sub", "blob", 2)
    (folder / "README.txt").write_text("ignored: not an image suffix")
    (folder / ".hidden.png").write_bytes(b"ignored: hidden")
    single = tmp_path / "one.png"
    synth.image("gradient", 7, 40, mode="L").save(single)

    images, names = load_images([folder, single], image_size=16, channels=3, workers=1)
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    assert names == [str(p) for p in sorted(written)] + [str(single)]
    # the same image decodes to the same array whichever way it is named
    alone, _ = load_images([written[0]], image_size=16, channels=3)
    assert torch.equal(alone[0], images[0])
    grey, _ = load_images([single], image_size=32, channels=1)
    assert grey.shape == (1, 1, 32, 32)
    expected = np.asarray(Image.open(single).resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(grey[0, 0].numpy(), expected)


def test_load_images_bad_inputs_name_the_path(tmp_path, synth) -> None:
    with pytest.raises(DataError, match="missing.png"):
        load_images([tmp_path / "missing.png"], 16, 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: folder holds no image"):
        load_images([empty], 16, 3)
    broken = tmp_path / "broken.png"
    _truncated_png(broken, synth)
    with pytest.raises(DataError, match="broken.png"):
        load_images([broken], 16, 3)
