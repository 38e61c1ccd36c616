"""The generator's weight average (``train.ema``): the update rule, what training keeps,
and an exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from components.detector.train import fit, load_checkpoint
from components.detector.weight_average import WeightAverage


def test_the_average_follows_the_update_rule_with_its_warm_up() -> None:
    net = nn.Linear(3, 2)
    average = WeightAverage(net, decay=0.9)
    start = average.net.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    average.update(net)  # t = 1: d = min(0.9, 2 / 11)
    d = 2 / 11
    assert torch.allclose(average.net.weight, d * start + (1 - d) * net.weight)
    for _ in range(200):
        average.update(net)
    assert average.current_decay() == 0.9  # the warm-up is over
    assert torch.allclose(average.net.weight, net.weight, atol=1e-6)  # constant weights: reached
    assert not any(p.requires_grad for p in average.net.parameters())


def test_the_decay_must_lie_strictly_between_0_and_1() -> None:
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="decay"):
            WeightAverage(nn.Linear(1, 1), bad)


def test_training_keeps_the_average_and_resumes_it_exactly(synth, tiny_params,
                                                            tmp_path: Path) -> None:
    params = tiny_params(**{"train.epochs": 2, "train.lr_decay_start": 1,
                            "train.ema": 0.5, "train.select_on": "last"})
    train, val = synth.image_set(16), synth.image_set(6, seed=100)
    whole = fit(train, val, params.model, params.train, tmp_path / "whole")
    last = load_checkpoint(tmp_path / "whole" / "last.pt")
    best = load_checkpoint(tmp_path / "whole" / "best.pt")
    average = last["generator_average"]["net"]
    # the kept (and returned) weights are the average, not the raw weights training ended on
    for key, value in best["generator"].items():
        if value.is_floating_point() and "running" not in key:
            assert torch.equal(value, average[key]), key
    assert any(not torch.equal(last["generator"][k], average[k])
               for k in average if average[k].is_floating_point())
    for key, value in whole.generator.state_dict().items():
        assert torch.equal(value, best["generator"][key]), key

    fit(train, val, params.model, params.train, tmp_path / "parts", stop_after=1)
    resumed = fit(train, val, params.model, params.train, tmp_path / "parts", resume=True)
    again = load_checkpoint(tmp_path / "parts" / "last.pt")
    assert again["generator_average"]["updates"] == last["generator_average"]["updates"]
    for key, value in average.items():
        assert torch.equal(value, again["generator_average"]["net"][key]), key
    for key, value in whole.generator.state_dict().items():
        assert torch.equal(value, resumed.generator.state_dict()[key]), key
