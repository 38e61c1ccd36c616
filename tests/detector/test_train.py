"""Adversarial training: the step learns, the schedule, checkpoints, resume, failure modes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import components.detector.train as training
from components.data.images import to_model_input
from components.detector.networks import build_networks
from components.detector.score import Scores
from components.detector.train import GanTrainer, fit, load_checkpoint, lr_factor
from components.errors import ModelFileError, TrainingError
from components.runtime import Runtime, resolve_runtime

CPU_FP32 = Runtime(torch.device("cpu"), None, False)


def _fit(params, synth, out: Path, **kwargs):
    train, val = synth.image_set(16), synth.image_set(6, seed=100)
    return fit(train, val, params.model, params.train, out, **kwargs)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- the step ---------------------------------------------------------------------------


def test_step_decreases_the_contextual_loss(synth, tiny_params) -> None:
    params = tiny_params(**{"train.lr": 1e-3})
    torch.manual_seed(0)
    trainer = GanTrainer(*build_networks(params.model, 3, 16), params.train, CPU_FP32)
    x = to_model_input(synth.batch(8))
    losses = [trainer.step(x) for _ in range(10)]
    con = [step["loss_con"].item() for step in losses]
    assert con[-1] < 0.95 * con[0], con
    assert np.mean(con[-3:]) < np.mean(con[:3])
    assert all(torch.isfinite(v).all() for step in losses for v in step.values())


def test_step_updates_generator_and_discriminator(synth, tiny_params) -> None:
    params = tiny_params()
    torch.manual_seed(0)
    trainer = GanTrainer(*build_networks(params.model, 3, 16), params.train, CPU_FP32)
    g0 = copy.deepcopy(trainer.generator.state_dict())
    d0 = copy.deepcopy(trainer.discriminator.state_dict())
    trainer.step(to_model_input(synth.batch(8)))
    g_changed = [
        k
        for k, v in trainer.generator.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, g0[k])
    ]
    d_changed = [
        k
        for k, v in trainer.discriminator.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, d0[k])
    ]
    assert len(g_changed) > len(g0) // 2
    assert len(d_changed) > len(d0) // 2
    # D is trainable again after the G update froze it
    assert all(p.requires_grad for p in trainer.discriminator.parameters())


# --- learning-rate schedule ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "epochs", "decay_start", "expected"),
    [
        (0, 15, 8, 1.0),
        (7, 15, 8, 1.0),
        (8, 15, 8, 1.0),  # decay starts from this epoch
        (9, 15, 8, 1 - 1 / 8),
        (14, 15, 8, 1 - 6 / 8),  # the last epoch still trains (lr > 0)
        (0, 3, 3, 1.0),  # decay_start >= epochs: no decay
        (2, 3, 3, 1.0),
        (0, 4, 0, 1.0),
        (3, 4, 0, 1 - 3 / 5),
    ],
)
def test_lr_factor_truth_table(epoch: int, epochs: int, decay_start: int, expected: float) -> None:
    assert lr_factor(epoch, epochs, decay_start) == pytest.approx(expected)


@pytest.mark.parametrize(("epochs", "decay_start"), [(15, 8), (4, 0), (10, 9), (2, 5)])
def test_lr_factor_is_non_increasing_and_positive_over_the_run(
    epochs: int, decay_start: int
) -> None:
    factors = [lr_factor(e, epochs, decay_start) for e in range(epochs)]
    assert factors[0] == 1.0
    assert all(b <= a for a, b in zip(factors, factors[1:], strict=False))
    assert min(factors) > 0.0


def test_fit_applies_the_schedule_per_epoch(synth, tiny_params, tmp_path) -> None:
    params = tiny_params(**{"train.epochs": 3, "train.lr_decay_start": 1, "train.lr": 1e-3})
    result = _fit(params, synth, tmp_path)
    lrs = [h.lr for h in result.history]
    assert lrs == pytest.approx([1e-3 * lr_factor(e, 3, 1) for e in range(3)])
    assert lrs[0] == lrs[1] > lrs[2] > 0  # decay begins after decay_start


# --- checkpoints and resume ---------------------------------------------------------------


def test_checkpoints_load_with_weights_only(synth, tiny_params, tmp_path) -> None:
    result = _fit(tiny_params(), synth, tmp_path)
    last = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    best = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    for key in (
        "generator",
        "discriminator",
        "opt_g",
        "opt_d",
        "sched_g",
        "sched_d",
        "rng_torch",
        "rng_shuffle",
        "history",
        "best",
    ):
        assert key in last, key
    assert last["epoch"] == 1 and best["epoch"] == 1
    _assert_same_weights(best["generator"], result.generator.state_dict())
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def test_unreadable_checkpoint_is_a_model_file_error(tmp_path) -> None:
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="last.pt"):
        load_checkpoint(bad)
    with pytest.raises(ModelFileError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(
    synth, tiny_params, tmp_path
) -> None:
    params = tiny_params(**{"train.epochs": 2, "train.lr_decay_start": 1})
    whole = _fit(params, synth, tmp_path / "whole")
    first = _fit(params, synth, tmp_path / "parts", stop_after=1)
    assert [h.epoch for h in first.history] == [1]
    resumed = _fit(params, synth, tmp_path / "parts", resume=True)
    assert resumed.resumed_from == 1
    assert [h.epoch for h in resumed.history] == [1, 2]
    assert [h.loss_g for h in resumed.history] == [h.loss_g for h in whole.history]
    assert [h.val_recon for h in resumed.history] == [h.val_recon for h in whole.history]
    a = load_checkpoint(tmp_path / "whole" / "last.pt")
    b = load_checkpoint(tmp_path / "parts" / "last.pt")
    _assert_same_weights(a["generator"], b["generator"])
    _assert_same_weights(a["discriminator"], b["discriminator"])
    _assert_same_weights(whole.generator.state_dict(), resumed.generator.state_dict())
    assert whole.best_epoch == resumed.best_epoch


def test_resume_with_another_model_config_is_a_model_file_error(
    synth, tiny_params, tmp_path
) -> None:
    _fit(tiny_params(**{"train.epochs": 2}), synth, tmp_path, stop_after=1)
    wider = tiny_params(**{"train.epochs": 2, "model.base_width": 8})
    with pytest.raises(ModelFileError, match="does not match"):
        _fit(wider, synth, tmp_path, resume=True)


# --- failure modes ------------------------------------------------------------------------


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    synth, tiny_params, tmp_path, monkeypatch
) -> None:
    armed: list[int] = []

    class PoisonedRuntime(Runtime):
        """Feeds NaN images once armed (after the first epoch's checkpoint is written)."""

        def prepare(self, images: torch.Tensor) -> torch.Tensor:
            x = super().prepare(images)
            return x.fill_(float("nan")) if armed else x

    monkeypatch.setattr(
        training,
        "resolve_runtime",
        lambda *a, **k: PoisonedRuntime(torch.device("cpu"), None, False),
    )
    saved: dict[str, torch.Tensor] = {}

    def on_epoch(report) -> None:
        saved.update(copy.deepcopy(torch.load(tmp_path / "last.pt", weights_only=True)))
        armed.append(report.epoch)

    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 2.*last\.pt"):
        _fit(tiny_params(**{"train.epochs": 3}), synth, tmp_path, on_epoch=on_epoch)
    kept = load_checkpoint(tmp_path / "last.pt")
    assert kept["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in kept["generator"].values() if v.is_floating_point())
    _assert_same_weights(kept["generator"], saved["generator"])


def test_discriminator_collapse_reinitialises_d_and_counts_it(synth, tiny_params, tmp_path) -> None:
    params = tiny_params(**{"train.epochs": 2, "train.reinit_d_below": 1e9})
    result = _fit(params, synth, tmp_path / "collapse")
    batches_per_epoch = 16 // params.train.batch_size
    assert [h.d_reinits for h in result.history] == [batches_per_epoch, 2 * batches_per_epoch]
    never = _fit(
        tiny_params(**{"train.epochs": 2, "train.reinit_d_below": 0.0}), synth, tmp_path / "never"
    )
    assert [h.d_reinits for h in never.history] == [0, 0]


def test_reinitialised_discriminator_has_fresh_dcgan_weights(synth, tiny_params) -> None:
    params = tiny_params(**{"train.reinit_d_below": 1e9, "train.lr": 0.5})
    torch.manual_seed(0)
    trainer = GanTrainer(*build_networks(params.model, 3, 16), params.train, CPU_FP32)
    trainer.step(to_model_input(synth.batch(8)))
    convs = [m for m in trainer.discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    # lr 0.5 would have blown the weights far past DCGAN's N(0, 0.02) without the reinit
    assert all(m.weight.std() < 0.05 for m in convs)
    assert trainer.d_reinits == 1


@pytest.mark.parametrize("where", ["train", "val"])
def test_anomalous_image_in_train_or_val_is_refused(
    synth, tiny_params, tmp_path, where: str
) -> None:
    params = tiny_params()
    train = synth.image_set(16, anomalous=1 if where == "train" else 0)
    val = synth.image_set(6, anomalous=1 if where == "val" else 0, seed=100)
    with pytest.raises(TrainingError, match="normal images only"):
        fit(train, val, params.model, params.train, tmp_path)
    assert not (tmp_path / "last.pt").exists()


def test_too_few_training_images_is_refused(synth, tiny_params, tmp_path) -> None:
    params = tiny_params()
    with pytest.raises(TrainingError, match="at least 2"):
        fit(synth.image_set(1), synth.image_set(2), params.model, params.train, tmp_path)


# --- checkpoint choice ----------------------------------------------------------------------


@pytest.mark.parametrize(("select_on", "expected"), [("val_recon", 2), ("last", 3)])
def test_kept_epoch_is_chosen_on_validation_reconstruction(
    synth, tiny_params, tmp_path, monkeypatch, select_on: str, expected: int
) -> None:
    val_recon = iter([0.5, 0.25, 0.375])  # epoch 2 reconstructs validation normals best

    def fake_scores(generator, discriminator, images, weight, runtime, batch_size=256):
        value = next(val_recon)
        n = len(images)
        return Scores(np.full(n, value), np.full(n, value), np.zeros(n))

    monkeypatch.setattr(training, "score_images", fake_scores)
    snapshots: list[dict] = []
    params = tiny_params(**{"train.epochs": 3, "train.select_on": select_on})
    result = _fit(
        params,
        synth,
        tmp_path,
        on_epoch=lambda r: snapshots.append(
            copy.deepcopy(torch.load(tmp_path / "last.pt", weights_only=True)["generator"])
        ),
    )
    assert [h.val_recon for h in result.history] == [0.5, 0.25, 0.375]
    assert result.best_epoch == expected
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == expected
    _assert_same_weights(result.generator.state_dict(), snapshots[expected - 1])
    assert not result.generator.training  # returned ready for scoring


def test_resolve_runtime_falls_back_to_cpu_and_fp32_when_asked() -> None:
    runtime = resolve_runtime("cpu", "fp32", channels_last=False)
    assert runtime.device.type == "cpu" and runtime.amp_dtype is None
    assert resolve_runtime("cpu", "bf16").amp_dtype == torch.bfloat16
