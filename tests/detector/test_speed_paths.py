"""The fast paths compute what the plain fp32 eager reference computes.

Folded-BN, channels_last scoring and the compiled training step and scorer are checked
against the reference on tiny networks whose BatchNorm statistics and weights are
randomised, so that every folded layer and every score term matters.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from components.config import TrainConfig
from components.data.images import to_model_input
from components.detector.model import GENERATOR_NAMES
from components.detector.networks import build_discriminator, build_generator
from components.detector.score import fold_batchnorm, score_batch, score_images
from components.detector.train import GanTrainer
from components.runtime import Runtime, compile_pays_off, intra_op_threads, resolve_threads

CPU = torch.device("cpu")
REFERENCE = Runtime(CPU, None, channels_last=False, compile=False)
FAST = Runtime(CPU, None, channels_last=True, compile=False)
WEIGHT = 0.9


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Kaiming conv weights and non-trivial BN statistics and affines, as after training;
    DCGAN's init alone leaves G's output ~1e-5, where any two paths would agree."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return module


def _networks(name: str = "nested", size: int = 32, width: int = 8) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    g = build_generator(
        name, 3, size, base_width=width, depth=4 if size >= 32 else 2, latent_dim=16
    )
    d = build_discriminator(3, size, width)
    return _randomise(g, 1), _randomise(d, 2)


def _uint8(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def _reference_scores(g: nn.Module, d: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Plain eval-mode fp32 contiguous scoring, the whole set in one batch."""
    g, d = copy.deepcopy(g).eval(), copy.deepcopy(d).eval()
    with torch.no_grad():
        a, r, lat = score_batch(g, d, to_model_input(images), WEIGHT)
    return np.stack([a.double().numpy(), r.double().numpy(), lat.double().numpy()])


def _as_array(scores) -> np.ndarray:
    return np.stack([scores.score, scores.recon, scores.latent])


# --- BatchNorm folding --------------------------------------------------------------------


@pytest.mark.parametrize("name", GENERATOR_NAMES)
def test_folded_generator_computes_the_eval_mode_function(name: str) -> None:
    g, _ = _networks(name)
    x = to_model_input(_uint8(4))
    with torch.no_grad():
        expected = copy.deepcopy(g).eval()(x).image
        folded = fold_batchnorm(g)
        got = folded(x).image
    assert expected.std() > 0.1  # the randomised network's output is far from trivial
    # fp32 rounding through ~20 layers of a randomised net: 5e-5 of the output's range
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-5 * expected.abs().max())
    assert g.training, "the original keeps its mode"
    if name == "nested":  # every BN of the nested G follows a conv: none is left
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_folded_discriminator_computes_logits_and_features() -> None:
    _, d = _networks()
    x = to_model_input(_uint8(4))
    before = copy.deepcopy(d.state_dict())
    with torch.no_grad():
        expected = copy.deepcopy(d).eval()(x)
        folded = fold_batchnorm(d)
        got = folded(x)
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5 * e.abs().max())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    for k, v in d.state_dict().items():  # folding worked on a copy
        assert torch.equal(v, before[k]), k


# --- optimised eager scoring ----------------------------------------------------------------


def test_fast_scoring_matches_the_plain_reference() -> None:
    g, d = _networks()
    images = _uint8(20)
    expected = _reference_scores(g, d, images)
    assert expected[2].min() > 1e-3  # the latent term is not negligible either
    got = _as_array(score_images(g, d, images, WEIGHT, FAST, batch_size=8))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # the path without channels_last folds BN as well and agrees too
    plain = _as_array(score_images(g, d, images, WEIGHT, REFERENCE, batch_size=8))
    np.testing.assert_allclose(plain, expected, rtol=1e-5)


def test_fast_scores_do_not_depend_on_batch_size_or_order() -> None:
    g, d = _networks()
    images = _uint8(24, seed=3)
    reference = _as_array(score_images(g, d, images, WEIGHT, FAST, batch_size=len(images)))
    for batch_size in (1, 5, 16):
        got = _as_array(score_images(g, d, images, WEIGHT, FAST, batch_size=batch_size))
        np.testing.assert_allclose(got, reference, rtol=1e-6, err_msg=f"batch {batch_size}")
    perm = np.random.default_rng(0).permutation(len(images))
    shuffled = _as_array(score_images(g, d, images[torch.from_numpy(perm)], WEIGHT, FAST, 7))
    np.testing.assert_allclose(shuffled, reference[:, perm], rtol=1e-6)


def test_scoring_leaves_the_networks_as_they_were() -> None:
    g, d = _networks()
    g.train()
    state = copy.deepcopy({**g.state_dict(), **{f"d.{k}": v for k, v in d.state_dict().items()}})
    score_images(g, d, _uint8(6), WEIGHT, FAST, batch_size=4)
    assert g.training and d.training
    after = {**g.state_dict(), **{f"d.{k}": v for k, v in d.state_dict().items()}}
    for k, v in after.items():  # weights and BN running statistics untouched
        assert torch.equal(v, state[k]), k
    assert g.encoder.stages[0].conv1.weight.is_contiguous()  # memory format untouched too


def test_empty_image_set_scores_to_empty_arrays() -> None:
    g, d = _networks()
    scores = score_images(g, d, _uint8(0), WEIGHT, FAST)
    assert scores.score.shape == scores.recon.shape == scores.latent.shape == (0,)


# --- the runtime ------------------------------------------------------------------------------


def test_prepare_scales_to_unit_range_in_the_chosen_memory_format() -> None:
    images = _uint8(2)
    fast, plain = FAST.prepare(images), REFERENCE.prepare(images)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert plain.is_contiguous()
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)
    assert plain.min() >= -1.0 and plain.max() <= 1.0


@pytest.mark.parametrize(
    ("setting", "device", "work", "expected"),
    [
        (True, "cpu", 0, True),
        (False, "cuda", 10**9, False),
        ("auto", "cuda", 99, False),
        ("auto", "cuda", 100, True),
        ("auto", "cpu", 10**9, False),  # measured: never repaid its compile time on CPU
    ],
)
def test_compile_is_obeyed_or_chosen_by_device_and_job_length(
    setting, device: str, work: int, expected: bool
) -> None:
    assert compile_pays_off(setting, device, work, min_work=100) is expected


@pytest.mark.parametrize(
    ("setting", "cpus", "expected"),
    [("auto", 1, None), ("auto", 2, None), ("auto", 16, None), (3, 2, 3), (1, 64, 1)],
)
def test_threads_are_obeyed_or_chosen_by_machine_size(setting, cpus: int, expected) -> None:
    assert resolve_threads(setting, cpus) == expected


def test_intra_op_threads_are_restored_after_the_block() -> None:
    before = torch.get_num_threads()
    other = 1 if before > 1 else 2
    with intra_op_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), intra_op_threads(other):
        raise RuntimeError("restored on errors too")
    assert torch.get_num_threads() == before
    with intra_op_threads(None):  # None leaves the setting alone
        assert torch.get_num_threads() == before


def test_scoring_and_training_give_the_same_results_on_one_thread_and_on_two() -> None:
    g, d = _networks()
    images = _uint8(8, seed=4)
    one, two = (dataclasses.replace(FAST, threads=n) for n in (1, 2))
    np.testing.assert_allclose(
        _as_array(score_images(g, d, images, WEIGHT, one, batch_size=4)),
        _as_array(score_images(g, d, images, WEIGHT, two, batch_size=4)),
        rtol=1e-5,
    )
    x = to_model_input(_uint8(8, seed=5))
    _assert_same_step(_trainer(one, False), _trainer(two, False), x)


# --- channels_last training -----------------------------------------------------------------


def _trainer(runtime: Runtime, compile: bool, size: int = 32) -> GanTrainer:
    """A trainer on freshly built (DCGAN-initialised) networks, as ``fit`` starts."""
    torch.manual_seed(0)
    g = build_generator(
        "nested", 3, size, base_width=4, depth=4 if size >= 32 else 2, latent_dim=16
    )
    return GanTrainer(g, build_discriminator(3, size, 4), TrainConfig(), runtime, compile=compile)


def _assert_same_step(a: GanTrainer, b: GanTrainer, x: torch.Tensor) -> None:
    """One step of each from identical weights: the same losses, gradients (to fp32 rounding,
    1e-3 of each tensor's largest entry), BN running statistics and updated weights (to a
    tenth of Adam's first step, which moves every weight by about lr)."""
    la = a.step(x.contiguous(memory_format=a.runtime.memory_format))
    lb = b.step(x.contiguous(memory_format=b.runtime.memory_format))
    for k in la:
        torch.testing.assert_close(lb[k], la[k], rtol=1e-5, atol=1e-7, msg=k)
    lr = a.cfg.lr
    for net in ("generator", "discriminator"):
        pa = dict(getattr(a, net).named_parameters())
        for name, p in getattr(b, net).named_parameters():
            ref = pa[name]

            def where(m: str, w: str = f"{net}.{name}") -> str:
                return f"{w}: {m}"

            torch.testing.assert_close(
                p.grad, ref.grad, rtol=0, atol=1e-3 * ref.grad.abs().max(), msg=where
            )
            torch.testing.assert_close(p, ref, rtol=0, atol=0.1 * lr, msg=where)
        ba = dict(getattr(a, net).named_buffers())
        for name, buf in getattr(b, net).named_buffers():
            torch.testing.assert_close(buf, ba[name], rtol=1e-5, atol=1e-6, msg=name)


def test_channels_last_training_step_equals_the_reference_step() -> None:
    x = to_model_input(_uint8(8, seed=5))
    _assert_same_step(_trainer(REFERENCE, False), _trainer(FAST, False), x)


# --- compiled paths (inductor compiles for tens of seconds even for tiny models) -----------


@pytest.mark.compile
def test_compiled_training_step_equals_the_eager_step() -> None:
    x = to_model_input(_uint8(8, size=16, seed=6))
    _assert_same_step(_trainer(FAST, False, size=16), _trainer(FAST, True, size=16), x)


@pytest.mark.compile
def test_compiled_scoring_matches_the_reference_and_follows_new_weights() -> None:
    from torch._dynamo.utils import counters

    g, d = _networks(size=16, width=4)
    images = _uint8(11, size=16, seed=7)  # 11 = 2 full batches of 4 and a padded one of 3
    compiled = dataclasses.replace(FAST, compile=True)
    got = _as_array(score_images(g, d, images, WEIGHT, compiled, batch_size=4))
    np.testing.assert_allclose(got, _reference_scores(g, d, images), rtol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    _randomise(g, seed=11)  # the next epoch's weights: picked up without a recompile
    got = _as_array(score_images(g, d, images, WEIGHT, compiled, batch_size=4))
    np.testing.assert_allclose(got, _reference_scores(g, d, images), rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


def test_scoring_batches_are_capped_in_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    import components.detector.score as scoring

    assert scoring.images_per_batch(256, 1000, 128 * 128) == 256
    assert scoring.images_per_batch(256, 1000, 256 * 256) == 64
    assert scoring.images_per_batch(256, 10, 256 * 256) == 10
    assert scoring.images_per_batch(256, 1000, 10**9) == 1
    g, d = _networks()
    images = _uint8(10, seed=4)
    reference = _as_array(score_images(g, d, images, WEIGHT, FAST, batch_size=len(images)))
    calls = []
    plain = scoring.score_and_map

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        return plain(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_and_map", counted)
    monkeypatch.setattr(scoring, "MAX_BATCH_PIXELS", 4 * images.shape[-1] * images.shape[-2])
    got = _as_array(score_images(g, d, images, WEIGHT, FAST, batch_size=len(images)))
    assert calls == [4, 4, 2]
    np.testing.assert_allclose(got, reference, rtol=1e-6)
