"""Bad images a user meets at the command line (issue 12, items 1-3 and 8): 16-bit PNGs,
decompression-bomb sizes, a 1x1 image, grey/palette/CMYK images among RGB, and seeded
corruptions through ``nestad score`` and the REST scorer. Each refusal: exit code 2, one
line naming the file as the user gave it, no traceback, nothing stored or written."""

from __future__ import annotations

import base64
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_support import assert_one_line_error
from image_support import corrupt, encode, grey_png, sixteen_bit_twin, with_declared_size
from PIL import Image
from typer.testing import CliRunner

from components.cli.app import get_app
from components.data.manifest import read_manifest
from components.data.splits import load_splits
from components.detector.package import load_detector
from components.errors import DataError
from components.registry.serve import score_request

BOMBS = {"144-MP": 12_000, "196-MP": 14_000}  # Pillow: a warning at 89.5 MP, an error at 179


def _invoke(*args: object):
    return CliRunner().invoke(get_app(), [str(a) for a in args])


def _train_args(synth, source: Path, out: Path, **overrides: object) -> list[object]:
    sets = synth.overrides(**{"data.source": str(source), "data.layout": "industrial",
                              **overrides})
    args: list[object] = ["train", "-p", synth.repo / "params.yaml", "-o", out]
    for key, value in sets.items():
        args += ["-s", f"{key}={json.dumps(value) if isinstance(value, bool) else value}"]
    return args


def _over_limit(path: Path, side: int) -> str:
    return (f"{path}: image is {side}x{side} ({side * side / 1e6:.4g} megapixels), over the "
            "limit of 100 megapixels (data.max_image_pixels=100000000); refused before decoding")


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    """Real, valid all-black PNGs of 144 and 196 megapixels (0.6 and 0.9 MB of file)."""
    root = tmp_path_factory.mktemp("bombs")
    paths = {}
    for name, side in BOMBS.items():
        paths[name] = root / f"{name}.png"
        paths[name].write_bytes(grey_png(side, side))
    return paths


@pytest.fixture(scope="module")
def model(tmp_path_factory, synth) -> Path:
    """``nestad train --evaluate`` once on a tiny industrial dataset: the model folder. Its
    data.min_image_size (6, not the default 8) shows that score applies the model's rules."""
    root = tmp_path_factory.mktemp("bad_images")
    source = synth.dataset(root / "data", "industrial", n_train=12, n_test=4, n_defect=4)
    result = _invoke(*_train_args(synth, source, root / "run", **{"data.min_image_size": 6}),
                     "--evaluate")
    assert result.exit_code == 0, result.output
    return root / "run" / "model"


def _project(tmp_path: Path, source: Path) -> Path:
    """A params.yaml for ``nestad ingest``/``validate`` of ``source`` into data/ds."""
    params = {
        "data": {"layout": "industrial", "image_size": 16, "val_fraction": 0.25},
        "ingest": {"source": str(source), "data_root": "data", "name": "ds", "track": False,
                   "workers": 1},
        "validation": {"data_docs": False, "report_dir": "reports"},
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    return tmp_path / "params.yaml"


def _stored(dataset: Path) -> tuple[bytes, list[str]]:
    """The manifest's bytes and every stored file: what must not change."""
    return ((dataset / "manifest.csv").read_bytes(),
            sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*")))


# --- 16-bit greyscale PNG -------------------------------------------------------------------


def test_a_16_bit_png_scores_exactly_like_its_8_bit_picture(model, tmp_path) -> None:
    eight, sixteen, _ = sixteen_bit_twin(7, 32)
    (tmp_path / "eight.png").write_bytes(eight)
    (tmp_path / "sixteen.png").write_bytes(sixteen)
    out = tmp_path / "scores.csv"
    result = _invoke("score", tmp_path / "eight.png", tmp_path / "sixteen.png", "-m", model,
                     "--output", out)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["path"]).name for r in rows] == ["eight.png", "sixteen.png"]
    assert rows[0]["score"] == rows[1]["score"]  # was 0.45 vs 0.90 (saturated to white)


def test_a_16_bit_png_in_train_good_is_read_as_its_8_bit_picture(make_dataset, tiny_params):
    source = make_dataset("industrial", n_train=8)
    victim = sorted((source / "train" / "good").glob("*.png"))[0]
    eight, sixteen, _ = sixteen_bit_twin(11, 32)
    cfg = tiny_params(**{"data.source": str(source), "data.layout": "industrial"}).data
    loaded = []
    for data in (eight, sixteen):  # the same content hash split: only the file differs
        victim.write_bytes(data)
        splits = load_splits(cfg)
        images = {p: img for part in (splits.train, splits.val)
                  for p, img in zip(part.paths, part.images, strict=True)}
        loaded.append(images[victim.relative_to(source).as_posix()])
    assert loaded[0].equal(loaded[1])
    assert 120 < loaded[1].float().mean() < 135  # the table: mean 254, now 131


# --- 144- and 196-megapixel PNGs ------------------------------------------------------------


@pytest.mark.parametrize("size", list(BOMBS))
def test_score_refuses_a_bomb_sized_png_from_its_header(model, bombs, tmp_path, size) -> None:
    out = tmp_path / "scores.csv"
    result = _invoke("score", bombs[size], "-m", model, "--output", out)
    line = assert_one_line_error(result)
    assert line == f"error: {_over_limit(bombs[size], BOMBS[size])}"
    assert "DecompressionBomb" not in result.output and not out.exists()


@pytest.mark.parametrize("size", list(BOMBS))
def test_train_refuses_a_bomb_sized_png_in_train_good(make_dataset, synth, bombs, tmp_path,
                                                      size) -> None:
    source = make_dataset("industrial")
    victim = source / "train" / "good" / "huge.png"
    shutil.copy(bombs[size], victim)
    result = _invoke(*_train_args(synth, source, tmp_path / "run"))
    line = assert_one_line_error(result)
    assert line == f"error: {_over_limit(victim, BOMBS[size])}"
    assert "DecompressionBomb" not in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ingest_does_not_store_a_bomb_sized_png(make_dataset, bombs, tmp_path) -> None:
    source = make_dataset("industrial")
    params = _project(tmp_path, source)
    assert _invoke("ingest", "-p", params).exit_code == 0
    before = _stored(tmp_path / "data" / "ds")
    victim = source / "train" / "good" / "huge.png"
    shutil.copy(bombs["144-MP"], victim)
    line = assert_one_line_error(_invoke("ingest", "-p", params))
    assert line.startswith(f"error: {_over_limit(victim, BOMBS['144-MP'])}")
    assert _stored(tmp_path / "data" / "ds") == before


# --- 1x1 image ------------------------------------------------------------------------------


def test_ingest_refuses_a_1x1_image_naming_the_source_file(make_dataset, tmp_path) -> None:
    source = make_dataset("industrial")
    params = _project(tmp_path, source)
    assert _invoke("ingest", "-p", params).exit_code == 0
    before = _stored(tmp_path / "data" / "ds")
    tiny = source / "test" / "good" / "tiny.png"
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tiny)
    line = assert_one_line_error(_invoke("ingest", "-p", params))
    assert line.startswith(f"error: {tiny}: image is 1x1, smaller than the allowed minimum "
                           "8x8 (data.min_image_size)")
    assert _stored(tmp_path / "data" / "ds") == before


def test_score_refuses_a_1x1_image(model, tmp_path) -> None:
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    line = assert_one_line_error(_invoke("score", tiny, "-m", model))
    assert line == (f"error: {tiny}: image is 1x1, smaller than the allowed minimum 6x6 "
                    "(data.min_image_size)")  # the model's rule (fixture)


def test_training_from_a_stored_1x1_image_names_the_file_the_user_gave(make_dataset, synth,
                                                                       tmp_path) -> None:
    """Stored under a lower data.min_image_size, then trained with the default 8."""
    source = make_dataset("industrial")
    tiny = source / "train" / "good" / "tiny.png"
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tiny)
    params = _project(tmp_path, source)
    assert _invoke("ingest", "-p", params, "-s", "data.min_image_size=1").exit_code == 0
    dataset = tmp_path / "data" / "ds"
    result = _invoke(*_train_args(synth, dataset, tmp_path / "run", **{"data.layout":
                                                                       "manifest"}))
    line = assert_one_line_error(result, f"{tiny} (stored as {dataset}/images/",
                                 "image is 1x1, smaller than the allowed minimum 8x8")
    assert line.startswith(f"error: {tiny} (stored as")


# --- grey, palette and CMYK images among RGB ------------------------------------------------


def test_validate_accepts_the_grey_palette_and_cmyk_images_training_converts(make_dataset,
                                                                            tmp_path) -> None:
    source = make_dataset("industrial")
    good = sorted((source / "train" / "good").glob("*.png"))
    rgb = Image.open(good[0]).convert("RGB")
    rgb.convert("L").save(good[0])
    rgb.convert("P").save(good[1])
    rgb.convert("CMYK").save(good[2].with_suffix(".jpg"), "JPEG")
    good[2].unlink()
    params = _project(tmp_path, source)
    assert _invoke("ingest", "-p", params).exit_code == 0
    channels = set(read_manifest(tmp_path / "data" / "ds")["channels"])
    assert channels == {1, 3, 4}  # the source band counts: grey and palette 1, CMYK 4
    result = _invoke("validate", "-p", params)
    assert result.exit_code == 0, result.output
    assert "validation passed" in result.output


# --- item 8: seeded corruptions through `nestad score` and the REST scorer ------------------


def _corrupted(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    seeds = [encode(rgb, fmt) for fmt in ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP")]
    out = [with_declared_size(seeds[0], 1 << 16, 1 << 16)]  # a bomb header, valid CRC
    while len(out) < n:
        out.append(corrupt(seeds[len(out) % len(seeds)], rng))
    return out


def test_score_never_ends_in_a_traceback_on_corrupted_files(model, tmp_path) -> None:
    for i, data in enumerate(_corrupted(8, seed=5)):
        image = tmp_path / f"fuzz{i}.png"
        image.write_bytes(data)
        result = _invoke("score", image, "-m", model)
        if result.exit_code == 0:
            assert f"fuzz{i}.png" in result.output and "Traceback" not in result.output
        else:
            assert_one_line_error(result, f"{image}: ")


def test_the_rest_scorer_scores_or_names_the_row_of_corrupted_images(model) -> None:
    detector, meta = load_detector(model)
    verdicts = set()
    for data in _corrupted(40, seed=6):
        frame = pd.DataFrame({"image_b64": [base64.b64encode(data).decode()]})
        try:
            out = score_request(detector, meta, frame)
        except DataError as exc:
            assert str(exc).startswith("request row 0: "), exc
            verdicts.add("refused")
        else:
            assert len(out) == 1 and np.isfinite(out["score"]).all()
            verdicts.add("scored")
    assert verdicts == {"refused", "scored"}  # the corruptions exercise both outcomes


def test_the_rest_scorer_refuses_a_bomb_sized_png_naming_the_row(model, bombs) -> None:
    detector, meta = load_detector(model)
    good = encode(Image.new("RGB", (16, 16), (80, 90, 100)))
    frame = pd.DataFrame({"image_b64": [base64.b64encode(b).decode()
                                        for b in (good, bombs["196-MP"].read_bytes())]})
    with pytest.raises(DataError, match=r"^request row 1: image is 14000x14000 \(196 megapixels\), "
                                         r"over the limit of 100 megapixels"):
        score_request(detector, meta, frame)
    assert meta["image_rules"].max_pixels == 100_000_000  # stored in the model file


def test_the_model_file_carries_the_rules_it_was_trained_with(model, synth, tmp_path) -> None:
    """Trained with data.min_image_size=6: score applies 6, not the config default 8."""
    _, meta = load_detector(model)
    assert (meta["image_rules"].min_size, meta["image_rules"].max_pixels) == (6, 100_000_000)
    seven = tmp_path / "seven.png"
    synth.image("blob", 1, 7).save(seven)
    result = _invoke("score", seven, "-m", model)
    assert result.exit_code == 0 and "seven.png" in result.output, result.output
