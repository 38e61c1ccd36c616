"""Export round trips on tiny models: ONNX and OpenVINO graphs agree with the PyTorch path
(scores and maps), carry their metadata, and a broken export writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components.detector.evaluate import NormStats
from components.detector.package import build_detector, load_detector, save_detector
from components.detector.score import MapSettings, score_and_map
from components.export.equivalence import (
    TOLERANCE,
    compare_outputs,
    reference_outputs,
    run_batched,
)
from components.export.exporter import export_detector
from components.export.graph import ExportGraph
from components.export.locate import find_export
from components.export.metadata import ExportError, read_metadata
from components.export.runners import ExportedDetector, load_runner

BACKENDS = ("onnx", "openvino")


def _run_folder(root: Path, tiny_params, synth, name: str) -> Path:
    """A run folder holding a tiny untrained ``name`` detector whose statistics are fitted
    on a few synthetic images, so normalised scores and maps spread over (0, 1)."""
    params = tiny_params(model={"name": name, "depth": 2, "seg_width": 4, "seg_depth": 2})
    torch.manual_seed(0)
    detector = build_detector(params.model, 3, 16, 0.9, MapSettings(sigma=1.0, top_k=0.05))
    calib = torch.cat([synth.batch(4, size=16, seed=3), synth.batch(4, size=16, defect=True)])
    x = calib.float() / 127.5 - 1
    # Untrained BN statistics leave features (and maps) nearly constant: set them from the
    # calibration batch, as trained ones would be, and widen the untrained head's logits.
    for module in detector.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # the running statistics become this batch's
    with torch.no_grad():
        if name == "nested_restore":
            detector.generator.segmenter.head.weight.mul_(10.0)
        score_and_map(detector.generator.train(), detector.discriminator.train(), x, 0.9,
                      detector.settings)
        scores, _, _, maps = score_and_map(detector.generator.eval(),
                                           detector.discriminator.eval(), x, 0.9,
                                           detector.settings)
    low, high = np.quantile(maps.numpy(), [0.2, 0.8])
    detector.set_map_statistics(float(low), float(high))
    lo, hi = float(scores.min()), float(scores.max())
    norm = NormStats(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo), {}, 8, 0.2, 0.6, 0.05)
    save_detector(root / "model" / "detector.pt", detector, params.model, 3, 16, norm, "fpr",
                  provenance={"checkpoint_epoch": 3})
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_params, synth):
    """A nested_restore run folder with both exports (checked on 6 validation-like images)."""
    run = _run_folder(tmp_path_factory.mktemp("run"), tiny_params, synth, "nested_restore")
    detector, meta = load_detector(run / "model")
    check = synth.batch(6, size=16, seed=1)
    results = {
        backend: export_detector(detector, meta, backend, run / "export" / backend, check,
                                 "6 synthetic blobs", model={"sha256": "abc", "version": None},
                                 data_version="md5-of-data")
        for backend in BACKENDS
    }
    return run, detector, results


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_matches_pytorch_with_maps(exported, synth, backend: str) -> None:
    run, detector, results = exported
    result = results[backend]
    assert result.report.passed and result.report.images == 6
    assert max(result.report.max_abs.values()) <= TOLERANCE[backend]
    # fresh images, a batch size the graph was not traced with (dynamic batch axis)
    images = torch.cat([synth.batch(3, size=16, pattern="stripes", seed=5),
                        synth.batch(2, size=16, defect=True, seed=6)])
    runner, _ = load_runner(run / "export" / backend, backend)
    got = run_batched(runner, images)
    want = reference_outputs(detector, images)
    assert got["anomaly_map"].shape == (5, 16, 16)
    assert np.ptp(want["anomaly_map"]) > 0.1  # the maps are not all clipped to one value
    assert np.ptp(want["normalised_score"]) > 0.1
    for name in ("score", "normalised_score", "anomaly_map"):
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOLERANCE[backend])
    np.testing.assert_array_equal(got["is_anomaly"], want["is_anomaly"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata_beside_the_graph(exported, backend: str) -> None:
    run, detector, _ = exported
    meta = read_metadata(run / "export" / backend, backend)
    assert meta["image_size"] == 16 and meta["channels"] == 3
    assert meta["input"] == {"name": "image", "dtype": "uint8", "layout": "NHWC",
                             "shape": [None, 16, 16, 3],
                             "scaling": "inside the graph: x / 127.5 - 1"}
    assert meta["data_version"] == "md5-of-data"
    assert meta["model"]["generator"] == "nested_restore" and meta["model"]["sha256"] == "abc"
    assert meta["normalisation"]["score_min"] == pytest.approx(float(detector.score_min))
    assert meta["normalisation"]["map_high"] == pytest.approx(float(detector.map_high))
    assert meta["thresholds"]["used"] == "fpr"
    assert meta["thresholds"]["value"] == pytest.approx(0.6)  # the fpr threshold
    assert meta["thresholds"]["fixed"] == pytest.approx(0.2)
    assert meta["equivalence"]["passed"] and meta["equivalence"]["tolerance"] == 1e-4
    expected = {"onnx": {"model.onnx"}, "openvino": {"model.xml", "model.bin"}}[backend]
    assert set(meta["files"]) == expected
    assert sorted(p.name for p in (run / "export" / backend).iterdir()) == sorted(
        expected | {"metadata.json"})


def test_the_paper_model_exports_too(tmp_path: Path, tiny_params, synth) -> None:
    run = _run_folder(tmp_path, tiny_params, synth, "nested")
    detector, meta = load_detector(run / "model")
    result = export_detector(detector, meta, "onnx", tmp_path / "onnx",
                             synth.batch(4, size=16, seed=2), "4 synthetic blobs")
    assert result.report.passed
    assert result.metadata["model"]["generator"] == "nested"


def test_a_broken_export_fails_the_check_and_writes_nothing(
    exported, synth, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, detector, _ = exported
    _, meta = load_detector(run / "model")
    original = ExportGraph.forward

    def tampered(self, image):
        score, normed, flagged, amap = original(self, image)
        return score, normed, flagged, (amap + 0.01).clamp(0, 1)  # a map off by 0.01

    monkeypatch.setattr(ExportGraph, "forward", tampered)
    target = run / "export" / "broken"
    before = sorted(p.name for p in (run / "export").iterdir())
    with pytest.raises(ExportError, match=r"onnx export disagrees with PyTorch.*anomaly_map "
                                          r"0\.01.*nothing written"):
        export_detector(detector, meta, "onnx", target, synth.batch(4, size=16), "4 blobs")
    assert not target.exists()
    assert sorted(p.name for p in (run / "export").iterdir()) == before  # no temp folder left
    # an earlier export in the target stays as it was
    previous = (run / "export" / "onnx" / "metadata.json").read_text()
    with pytest.raises(ExportError, match="disagrees"):
        export_detector(detector, meta, "onnx", run / "export" / "onnx",
                        synth.batch(4, size=16), "4 blobs")
    assert (run / "export" / "onnx" / "metadata.json").read_text() == previous


def test_compare_outputs_flags_and_tolerance() -> None:
    ref = {"score": np.array([0.5, 0.9]), "normalised_score": np.array([0.25, 0.60001]),
           "is_anomaly": np.array([False, True]), "anomaly_map": np.zeros((2, 2, 2))}
    same = {k: v.astype(np.float32) if v.dtype != bool else v for k, v in ref.items()}
    ok = compare_outputs(ref, same, span=1.0, threshold=0.6, tolerance=1e-4, backend="onnx",
                         images_from="two")
    assert ok.passed and ok.flag_mismatches == 0
    # a flag flipped on an image 1e-5 from the threshold is rounding, not disagreement
    near = {**same, "is_anomaly": np.array([False, False])}
    assert compare_outputs(ref, near, 1.0, 0.6, 1e-4, "onnx", "two").passed
    far = {**same, "is_anomaly": np.array([True, True])}
    report = compare_outputs(ref, far, 1.0, 0.6, 1e-4, "onnx", "two")
    assert not report.passed and report.flag_mismatches == 1
    # raw scores are compared on the normalisation span: 2e-4 / 0.5 = 4e-4 > 1e-4
    off = {**same, "score": same["score"] + np.float32(2e-4)}
    report = compare_outputs(ref, off, 0.5, 0.6, 1e-4, "onnx", "two")
    assert not report.passed and report.max_abs["score"] == pytest.approx(4e-4, rel=1e-2)
    nan = {**same, "anomaly_map": np.full((2, 2, 2), np.nan, np.float32)}
    assert not compare_outputs(ref, nan, 1.0, 0.6, 1e-4, "onnx", "two").passed


def test_an_altered_export_is_refused(exported, tmp_path: Path) -> None:
    import shutil

    run, _, _ = exported
    copy = tmp_path / "onnx"
    shutil.copytree(run / "export" / "onnx", copy)
    with (copy / "model.onnx").open("r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(ExportError, match=r"model\.onnx: altered since export"):
        read_metadata(copy)
    with pytest.raises(ExportError, match="a onnx export, not openvino"):
        read_metadata(run / "export" / "onnx", "openvino")
    meta = json.loads((copy / "metadata.json").read_text())
    meta["equivalence"]["passed"] = False
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="did not pass its equivalence check"):
        read_metadata(copy)


def test_find_export_layouts(exported, tmp_path: Path) -> None:
    run, _, _ = exported
    folder = run / "export" / "onnx"
    for model in (folder, run / "export", run, run / "model", run / "model" / "detector.pt"):
        assert find_export(model, "onnx") == folder, model
    with pytest.raises(ExportError, match=r"no onnx export .*run `nestad export"):
        find_export(tmp_path, "onnx")


def test_exported_detector_scores_like_the_detector(exported, synth) -> None:
    run, detector, _ = exported
    images = synth.batch(4, size=16, seed=9)
    x = images.float().div(127.5).sub(1.0)  # what the scoring code feeds a detector
    want = detector.score_with_maps(x)
    for backend in BACKENDS:
        got = ExportedDetector.load(run, backend).score_with_maps(x)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=1e-4)
    fixed = ExportedDetector.load(run, "onnx", threshold="fixed")
    _, normed, flagged = fixed(x)
    assert torch.equal(flagged, normed >= 0.2)
