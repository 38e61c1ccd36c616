"""benchmarks/paper_table.py on a tiny synthetic CIFAR-like archive (3 classes, 16 px).

Checks the table files and both protocols, resuming, that the paper-compatible per-epoch
scoring (train-mode BatchNorm on the test set) never feeds back into the networks the
leak-free protocol measures, and that the leak-free protocol touches test data only after
training has ended.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from components.data.splits import load_splits
from components.detector.networks import build_networks
from components.detector.train import fit
from components.runtime import resolve_runtime

REPO = Path(__file__).resolve().parents[1]


def _load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "paper_table", REPO / "benchmarks" / "paper_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_table"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


pt = _load_benchmark()


@pytest.fixture(autouse=True)
def _one_thread():
    """As the benchmark runs on CPU: on a shared 2-core machine 2 threads are far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def archive(synth, tmp_path: Path) -> Path:
    """cifar-like.tar.gz: train/<class>/ 16 images, test/<class>/ 6, for 3 classes."""
    root = synth.dataset(tmp_path / "cifar", "classes", n_train=16, n_test=6, size=16)
    return synth.pack(root, "tar.gz")


@pytest.fixture
def overrides(synth, archive: Path) -> list[str]:
    """TINY settings (CPU, fp32, width 4, 16 px) with 2 epochs, so a best epoch is chosen."""
    tiny = synth.overrides(**{"train.epochs": 2, "train.batch_size": 8,
                              "data.max_test_images": 24})
    return [f"{k}={v}" for k, v in tiny.items()] + [f"data.source={archive}",
                                                           "data.anomalous_class=blob"]


def _params(overrides: list[str], tmp_path: Path, **cell: object):
    base = pt.profile_params("quick", tmp_path / "no-params.yaml", overrides)
    return pt.cell_params(base, pt.Cell(cell.get("model", "nested"),
                                        cell.get("cls", "blob"), cell.get("seed", 0)))


def test_class_splits_match_load_splits_and_store_normals_first(overrides, tmp_path):
    params = _params(overrides, tmp_path, cls="stripes")
    cfg = params.data.model_copy(update={"max_train_images": 30})
    source = pt.decode_source(cfg, log=lambda _: None)
    ours = pt.class_splits(source, cfg)
    reference = load_splits(cfg)
    for name in ("train", "val", "test"):
        mine, theirs = getattr(ours, name), getattr(reference, name)
        assert sorted(mine.paths) == sorted(theirs.paths), name
        order = {p: i for i, p in enumerate(theirs.paths)}
        same = [order[p] for p in mine.paths]
        assert torch.equal(mine.images, theirs.images[same]), name
    y = ours.test.is_anomaly
    assert y.sum() > 0 and (y[:-1] <= y[1:]).all()  # all normals, then all anomalies
    assert not (ours.train.is_anomaly.any() or ours.val.is_anomaly.any())


def test_table_has_both_protocols_and_resume_skips_finished_cells(
        overrides, tmp_path, monkeypatch):
    decodes, runs = [], []
    real_decode, real_run = pt.decode_source, pt.run_cell
    monkeypatch.setattr(pt, "decode_source",
                        lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    monkeypatch.setattr(pt, "run_cell", lambda *a, **k: runs.append(1) or real_run(*a, **k))
    out = tmp_path / "results"
    kwargs = dict(profile="quick", out=out, models=["nested", "ganomaly"], classes=None,
                  seeds=[0], params_path=tmp_path / "no-params.yaml", overrides=overrides,
                  histogram_class="blob", log=lambda _: None)
    doc = pt.run_table(**kwargs)

    assert len(decodes) == 1  # the archive is decoded once for every class and model
    assert len(runs) == len(doc["cells"]) == 6 and doc["missing"] == []
    for cell in doc["cells"]:
        assert set(cell["protocols"]) == set(pt.PROTOCOLS)
        assert len(cell["per_epoch_test"]) == 2
        assert cell["timing"]["wall_s"] > 0 and cell["device"]["device"] == "cpu"
        for proto in cell["protocols"].values():
            assert 0.0 <= proto["auroc"] <= 1.0
    saved = json.loads((out / "paper_table.json").read_text())
    assert saved["summary"]["nested"]["classes"]["blob"]["leak_free"]["auroc"]["n"] == 1
    md = (out / "paper_table.md").read_text()
    for text in ("Table 1: AUROC", "Table 2: AUPRC", "leak-free", "test-best + train-BN",
                 "paper", "Cells finished: **6 / 6**"):
        assert text in md
    for name in ("paper_fig4_auroc.png", "paper_fig5_auprc.png",
                 "paper_fig6_blob_histogram.png"):
        assert (out / name).stat().st_size > 1000

    # Resume: nothing left to do, so neither decoding nor training happens again ...
    decodes.clear()
    runs.clear()
    again = pt.run_table(**{**kwargs, "classes": ["gradient", "blob", "stripes"],
                            "figures": False})
    assert decodes == [] and runs == []
    assert len(again["cells"]) == 6
    # ... and a lost cell, or one computed with other settings, is the only one rerun.
    (out / "cache" / "quick" / "ganomaly-blob-0.json").unlink()
    stale = out / "cache" / "quick" / "nested-stripes-0.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "fingerprint": "other"}))
    pt.run_table(**{**kwargs, "figures": False})
    assert len(runs) == 2


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_train_mode_scoring_leaves_networks_modes_and_rng_untouched(overrides, tmp_path):
    params = _params(overrides, tmp_path)
    splits = pt.class_splits(pt.decode_source(params.data, log=lambda _: None), params.data)
    runtime = resolve_runtime("cpu", "fp32", False)
    torch.manual_seed(0)
    g, d = build_networks(params.model, 3, 16)
    g.train()
    d.eval()
    before_g, before_d, rng = _state(g), _state(d), torch.get_rng_state()

    hook = pt.PaperProtocol(splits.test, params, runtime)
    hook(1, g, d)

    for before, net in ((before_g, g), (before_d, d)):
        after = net.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running stats
    assert g.training and not d.training
    assert torch.equal(rng, torch.get_rng_state())
    # The train-mode figures really use batch statistics: they differ from eval mode.
    assert not np.allclose(hook.scores[1, "train"], hook.scores[1, "eval"])
    # ... and depend on which images share a batch (why the protocol is not leak-free).
    images, weight = splits.test.images, params.evaluate.score_weight
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    stored = pt.score_train_mode(*_copies(g, d), images, weight, runtime, batch_size=8)
    shuffled = np.empty_like(stored)
    shuffled[perm.numpy()] = pt.score_train_mode(*_copies(g, d), images[perm], weight,
                                                 runtime, batch_size=8)
    assert not np.allclose(shuffled, stored)


def _copies(*nets: torch.nn.Module) -> list[torch.nn.Module]:
    return [copy.deepcopy(n) for n in nets]


def test_paper_protocol_does_not_change_what_the_leak_free_protocol_measures(
        overrides, tmp_path):
    params = _params(overrides, tmp_path, model="skip_ganomaly")
    splits = pt.class_splits(pt.decode_source(params.data, log=lambda _: None), params.data)
    kept = {}

    def fit_keeping(*args, **kwargs):
        result = fit(*args, **kwargs)
        kept[kwargs["inspect_epoch"] is not None] = (_state(result.generator),
                                                     _state(result.discriminator))
        return result

    with_paper = pt.run_cell(params, splits, paper=True, fit_fn=fit_keeping, log=lambda _: None)
    without = pt.run_cell(params, splits, paper=False, fit_fn=fit_keeping, log=lambda _: None)

    for a, b in zip(kept[True], kept[False], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert with_paper["protocols"]["leak_free"] == without["protocols"]["leak_free"]
    assert with_paper["scores"]["leak_free"] == without["scores"]["leak_free"]
    assert set(without["protocols"]) == {"leak_free"}


@pytest.mark.parametrize("paper", [False, True])
def test_leak_free_protocol_touches_test_data_only_after_training(
        overrides, tmp_path, monkeypatch, paper):
    params = _params(overrides, tmp_path, cls="gradient")
    splits = pt.class_splits(pt.decode_source(params.data, log=lambda _: None), params.data)
    test_paths = set(splits.test.paths)
    state = {"training": False, "trained": None}
    calls = []  # (during training?, generator) for every eval-mode scoring of test images
    real_score = pt.score_images

    def spy(generator, discriminator, images, *args, **kwargs):
        if images is splits.test.images:
            calls.append((state["training"], generator))
        return real_score(generator, discriminator, images, *args, **kwargs)

    def fit_spy(train, val, *args, **kwargs):
        assert not test_paths & (set(train.paths) | set(val.paths))
        state["training"] = True
        result = fit(train, val, *args, **kwargs)
        state.update(training=False, trained=result.generator)
        return result

    monkeypatch.setattr(pt, "score_images", spy)
    pt.run_cell(params, splits, paper=paper, fit_fn=fit_spy, log=lambda _: None)

    after = [g for during, g in calls if not during]
    assert len(after) == 1 and after[0] is state["trained"]  # once, after training
    during = [g for during, g in calls if during]
    assert len(during) == (2 if paper else 0)  # paper protocol: one per epoch, on copies
    assert all(g is not state["trained"] for g in during)
