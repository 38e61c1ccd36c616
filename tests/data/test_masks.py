"""Pixel masks of the industrial layout (MVTec AD: ``ground_truth/<defect>/<stem>_mask.png``):
aligned with the test images, resized with their geometry, complete or a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.data.splits import load_splits
from components.errors import DataError

DEFECT = "square"
W, H = 48, 32  # source images: not square, resized to 16 x 16 (x / 3, y / 2)


def _load(tiny_params, source: Path, layout: str = "industrial", **overrides):
    cfg = tiny_params(data={"source": str(source), "layout": layout, "anomalous_class": None
                            if layout == "industrial" else "stripes", **overrides}).data
    return load_splits(cfg)


def _box(i: int) -> tuple[int, int, int, int]:
    """Defect image i's square in model-input (16 x 16) pixels: (y0, y1, x0, x1)."""
    return (1 + i % 3 * 3, 5 + i % 3 * 3, 2 + i, 6 + i)


def _mask_array(i: int) -> np.ndarray:
    """The source mask of defect image i (H x W, 0/255): ``_box(i)`` scaled up (x3, x2)."""
    y0, y1, x0, x1 = _box(i)
    mask = np.zeros((H, W), np.uint8)
    mask[2 * y0 : 2 * y1, 3 * x0 : 3 * x1] = 255
    return mask


def _write_with_masks(root: Path, synth, n_defect: int = 4, suffix: str = ".png") -> Path:
    """An industrial dataset of W x H images with a mask for each defect image."""
    synth.write_images(root / "train" / "good", "blob", 12, size=W)
    synth.write_images(root / "test" / "good", "blob", 4, size=W)
    synth.write_images(root / "test" / DEFECT, "blob", n_defect, size=W, defect=True)
    for folder in ("train/good", "test/good", f"test/{DEFECT}"):  # make them W x H
        for path in (root / folder).glob("*.png"):
            Image.open(path).resize((W, H)).save(path)
    (root / "ground_truth" / DEFECT).mkdir(parents=True)
    for i in range(n_defect):
        Image.fromarray(_mask_array(i), "L").save(
            root / "ground_truth" / DEFECT / f"{i:04d}_mask{suffix}")
    (root / "ground_truth" / "README.txt").write_text("not a mask: ignored")
    return root


def _expected(path: str) -> np.ndarray:
    expected = np.zeros((16, 16), np.uint8)
    if path.startswith(f"test/{DEFECT}/"):
        y0, y1, x0, x1 = _box(int(Path(path).stem))
        expected[y0:y1, x0:x1] = 1
    return expected


@pytest.mark.parametrize("kind", ["folder", "tar.gz", "zip"])
def test_masks_are_aligned_with_the_test_images_and_resized_like_them(
    tmp_path, synth, tiny_params, kind
) -> None:
    folder = _write_with_masks(tmp_path / "mvtec", synth)
    source = folder if kind == "folder" else synth.pack(folder, kind)
    splits = _load(tiny_params, source)
    test = splits.test
    assert test.masks is not None and test.masks.dtype == torch.uint8
    assert tuple(test.masks.shape) == (len(test), 16, 16)
    assert set(test.masks.unique().tolist()) <= {0, 1}
    assert sorted(test.labels) == ["good"] * 4 + [DEFECT] * 4
    for i, path in enumerate(test.paths):  # defect squares in place, zeros for normals
        np.testing.assert_array_equal(test.masks[i].numpy(), _expected(path), err_msg=path)
    assert splits.train.masks is None and splits.val.masks is None
    everything = splits.manifest["path"].tolist() + test.paths + splits.train.paths
    assert not any("ground_truth" in p or "_mask" in p for p in everything)
    assert len(splits.manifest) == 12 + 4 + 4


def test_masks_follow_the_test_subset(tmp_path, synth, tiny_params) -> None:
    folder = _write_with_masks(tmp_path / "mvtec", synth, n_defect=6)
    test = _load(tiny_params, folder, max_test_images=5).test
    assert len(test) == 5 and 0 < test.is_anomaly.sum() < 5
    assert test.masks is not None and len(test.masks) == 5
    for i, path in enumerate(test.paths):
        np.testing.assert_array_equal(test.masks[i].numpy(), _expected(path), err_msg=path)


def test_a_mask_is_binarised_at_128_and_may_be_any_image_format(tmp_path, synth, tiny_params):
    root = tmp_path / "mvtec"
    synth.write_images(root / "train" / "good", "blob", 12, size=16)
    synth.write_images(root / "test" / DEFECT, "blob", 1, size=16, defect=True)
    mask = np.zeros((16, 16, 3), np.uint8)
    mask[:, :4], mask[:, 4:8], mask[:, 8:] = 127, 128, 255
    (root / "ground_truth" / DEFECT).mkdir(parents=True)
    Image.fromarray(mask, "RGB").save(root / "ground_truth" / DEFECT / "0000_mask.bmp")
    test = _load(tiny_params, root).test
    assert test.masks is not None
    expected = np.zeros((16, 16), np.uint8)
    expected[:, 4:] = 1
    np.testing.assert_array_equal(test.masks[0].numpy(), expected)


def test_without_a_ground_truth_folder_masks_are_none(make_dataset, tiny_params) -> None:
    industrial = _load(tiny_params, make_dataset("industrial"))
    assert industrial.test.masks is None
    assert industrial.train.masks is None and industrial.val.masks is None
    assert _load(tiny_params, make_dataset("classes"), "classes").test.masks is None


def test_the_classes_layout_ignores_a_ground_truth_folder(make_dataset, tiny_params) -> None:
    folder = make_dataset("classes")
    (folder / "ground_truth" / "stripes").mkdir(parents=True)
    (folder / "ground_truth" / "stripes" / "x_mask.png").write_bytes(b"not looked at")
    assert _load(tiny_params, folder, "classes").test.masks is None


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_a_defect_image_without_a_mask_is_an_error_naming_it_and_the_mask(
    tmp_path, synth, tiny_params, kind
) -> None:
    folder = _write_with_masks(tmp_path / "mvtec", synth)
    (folder / "ground_truth" / DEFECT / "0002_mask.png").unlink()
    source = folder if kind == "folder" else synth.pack(folder, kind)
    with pytest.raises(DataError, match=rf"test/{DEFECT}/0002\.png: defect image has no mask "
                                        rf"\(expected .*ground_truth/{DEFECT}/0002_mask\.png"):
        _load(tiny_params, source)


def test_a_mask_without_its_image_is_an_error_naming_the_mask(tmp_path, synth, tiny_params):
    folder = _write_with_masks(tmp_path / "mvtec", synth)
    Image.fromarray(_mask_array(0)).save(folder / "ground_truth" / DEFECT / "0099_mask.png")
    with pytest.raises(DataError, match=rf"ground_truth/{DEFECT}/0099_mask\.png: mask without"):
        _load(tiny_params, folder)


def test_a_mask_of_another_size_is_an_error_naming_both(tmp_path, synth, tiny_params) -> None:
    folder = _write_with_masks(tmp_path / "mvtec", synth)
    Image.fromarray(np.zeros((H, W + 1), np.uint8)).save(
        folder / "ground_truth" / DEFECT / "0001_mask.png")
    with pytest.raises(DataError, match=rf"0001_mask\.png: mask is 49x32 but its image "
                                        rf".*test/{DEFECT}/0001\.png is 48x32"):
        _load(tiny_params, folder)


def test_a_badly_named_mask_is_an_error(tmp_path, synth, tiny_params) -> None:
    folder = _write_with_masks(tmp_path / "mvtec", synth)
    (folder / "ground_truth" / DEFECT / "0000_mask.png").rename(
        folder / "ground_truth" / DEFECT / "0000.png")
    with pytest.raises(DataError, match=r"0000\.png: not a mask name"):
        _load(tiny_params, folder)


# --- masks through `nestad ingest`: stored with the images, read back through the manifest


def _ingest(tiny_params, source: Path, target: Path):
    from components.config import IngestConfig
    from components.data.ingest import ingest

    cfg = tiny_params(data={"source": str(source), "layout": "industrial",
                            "anomalous_class": None}).data
    return ingest(str(source), IngestConfig(workers=1), cfg, target=target), cfg


@pytest.mark.parametrize("kind", ["folder", "tar.gz"])
def test_ingest_stores_the_masks_and_training_reads_the_same_ones_back(
    tmp_path, synth, tiny_params, kind
) -> None:
    folder = _write_with_masks(tmp_path / "mvtec", synth)
    source = folder if kind == "folder" else synth.pack(folder, kind)
    report, cfg = _ingest(tiny_params, source, tmp_path / "data" / "parts")
    assert report.masks == 4
    manifest = pd.read_csv(tmp_path / "data" / "parts" / "manifest.csv", keep_default_na=False)
    defects = manifest[manifest["label"] == DEFECT]
    assert (defects["mask"].str.match(r"masks/[0-9a-f]{2}/[0-9a-f]{64}\.png$")).all()
    assert (manifest.loc[manifest["label"] != DEFECT, "mask"] == "").all()
    for mask in defects["mask"]:
        assert (tmp_path / "data" / "parts" / mask).is_file()

    stored = load_splits(cfg.model_copy(update={"source": str(tmp_path / "data" / "parts"),
                                                "layout": "manifest"})).test
    assert stored.masks is not None and tuple(stored.masks.shape) == (8, 16, 16)
    origin = manifest.set_index("path")["source"]
    for i, path in enumerate(stored.paths):  # the stored image's own mask, in place
        where = origin[path]
        rel = f"test/{DEFECT}/{Path(where).name}" if f"/{DEFECT}/" in where else "test/good/x"
        np.testing.assert_array_equal(stored.masks[i].numpy(), _expected(rel), err_msg=where)
    assert int(stored.masks.sum()) > 0


def test_ingest_refuses_incomplete_masks_before_writing_anything(
    tmp_path, synth, tiny_params
) -> None:
    folder = _write_with_masks(tmp_path / "mvtec", synth)
    (folder / "ground_truth" / DEFECT / "0003_mask.png").unlink()
    target = tmp_path / "data" / "parts"
    with pytest.raises(DataError, match=rf"test/{DEFECT}/0003\.png: defect image has no mask"):
        _ingest(tiny_params, folder, target)
    assert not target.exists()


def test_ingest_refuses_a_mask_of_another_size_and_keeps_the_previous_version(
    tmp_path, synth, tiny_params
) -> None:
    folder = _write_with_masks(tmp_path / "mvtec", synth)
    target = tmp_path / "data" / "parts"
    _ingest(tiny_params, folder, target)
    before = (target / "manifest.csv").read_bytes()
    synth.write_images(folder / "test" / DEFECT, "blob", 1, size=16, defect=True, start=50)
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(
        folder / "ground_truth" / DEFECT / "0050_mask.png")
    with pytest.raises(DataError, match=r"0050_mask\.png: mask is 3x3 but its image"):
        _ingest(tiny_params, folder, target)
    assert (target / "manifest.csv").read_bytes() == before


def test_a_manifest_without_a_mask_column_still_loads_without_masks(
    tmp_path, synth, tiny_params
) -> None:
    folder = _write_with_masks(tmp_path / "mvtec", synth)
    _, cfg = _ingest(tiny_params, folder, tmp_path / "data" / "parts")
    manifest = tmp_path / "data" / "parts" / "manifest.csv"
    pd.read_csv(manifest).drop(columns=["mask"]).to_csv(manifest, index=False)  # older nestad
    splits = load_splits(cfg.model_copy(update={"source": str(manifest.parent),
                                                "layout": "manifest"}))
    assert splits.test.masks is None and len(splits.test) == 8
