"""``pipeline.profile``: the profile the DVC pipeline applies, validated and settable in
place (comments kept) so that DVC sees the change."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import load_params, parse_params, set_pipeline_profile
from components.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

PARAMS = """\
train:
  epochs: 15               # paper value
pipeline:                  # what dvc.yaml applies
  profile: quick           # quick | paper
  min_new_normal_images: 1
profiles:
  quick:
    train.epochs: 3
  paper:
    train.epochs: 15
"""


def test_the_repository_pipeline_uses_a_known_profile():
    params = load_params(REPO / "params.yaml")
    assert params.pipeline.profile in params.profiles
    assert params.pipeline.min_new_normal_images >= 1


def test_pipeline_profile_is_recorded_but_not_applied_by_load_params(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    assert load_params(path).train.epochs == 15  # commands apply --profile explicitly
    assert load_params(path, profile="quick").train.epochs == 3


def test_unknown_pipeline_profile_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"pipeline\.profile='turbo'.*paper, quick"):
        parse_params({"pipeline": {"profile": "turbo"}, "profiles": {"quick": {}, "paper": {}}})
    with pytest.raises(ConfigError, match=r"min_new_normal_images"):
        parse_params({"pipeline": {"min_new_normal_images": 0}})


def test_set_pipeline_profile_edits_one_line_and_keeps_comments(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    assert set_pipeline_profile(path, "paper") is True
    assert path.read_text() == PARAMS.replace("profile: quick  ", "profile: paper  ")
    assert load_params(path).pipeline.profile == "paper"
    assert set_pipeline_profile(path, "paper") is False  # already set: file untouched


def test_set_pipeline_profile_refuses_unknown_profiles_and_missing_entries(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    with pytest.raises(ConfigError, match="turbo"):
        set_pipeline_profile(path, "turbo")
    assert path.read_text() == PARAMS  # nothing written
    path.write_text("train:\n  epochs: 2\nprofiles:\n  quick: {}\n")
    with pytest.raises(ConfigError, match="no pipeline.profile entry"):
        set_pipeline_profile(path, "quick")
    with pytest.raises(ConfigError, match="cannot read"):
        set_pipeline_profile(tmp_path / "absent.yaml", "quick")
