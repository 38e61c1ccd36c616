"""params.yaml -> typed config: defaults, profiles, overrides and one clear error per bad key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from components.config import Params, flatten_params, load_params
from components.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def _yaml() -> dict:
    return yaml.safe_load(PARAMS.read_text())


def _as_plain(value: object) -> object:
    if isinstance(value, dict):  # nested sections (train.augment, train.synthetic)
        return {k: _as_plain(v) for k, v in value.items()}
    return [_as_plain(v) for v in value] if isinstance(value, tuple) else value


def test_every_value_in_params_yaml_reaches_its_section() -> None:
    params = load_params(PARAMS)
    tree = _yaml()
    checked = 0
    for section, values in tree.items():
        if section == "profiles":
            continue
        loaded = getattr(params, section).model_dump()
        for key, value in values.items():
            assert _as_plain(loaded[key]) == value, f"{section}.{key}"
            checked += 1
    assert checked > 30  # the whole file, not an empty tree


def test_missing_params_file_gives_the_typed_defaults(tmp_path: Path) -> None:
    assert load_params(tmp_path / "absent.yaml") == Params()


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_profile_applies_its_overrides(profile: str) -> None:
    params = load_params(PARAMS, profile=profile)
    overrides = _yaml()["profiles"][profile]
    assert overrides, "profile should override something"
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        assert getattr(getattr(params, section), key) == value, dotted


def test_profile_changes_only_its_keys() -> None:
    base = flatten_params(load_params(PARAMS))
    quick = flatten_params(load_params(PARAMS, profile="quick"))
    touched = set(_yaml()["profiles"]["quick"])
    assert {k for k in base if base[k] != quick[k]} <= touched
    assert any(base[k] != quick[k] for k in touched)


def test_overrides_parse_yaml_values_and_win_over_profile() -> None:
    params = load_params(
        PARAMS,
        overrides=[
            "train.epochs=2",
            "train.lr=1e-3",
            "data.anomalous_class=cat",
            "data.max_train_images=null",
            "evaluate.quantiles=[0.5, 0.75]",
            "train.channels_last=false",
            "model.base_width=8",
        ],
        profile="quick",
    )
    assert params.train.epochs == 2  # the profile says 3; the override wins
    assert params.train.lr == pytest.approx(1e-3)
    assert params.data.anomalous_class == "cat"
    assert params.data.max_train_images is None  # the profile says 10000
    assert params.evaluate.quantiles == (0.5, 0.75)
    assert params.train.channels_last is False
    assert params.model.base_width == 8


def test_later_override_wins() -> None:
    params = load_params(PARAMS, overrides=["train.epochs=2", "train.epochs=5"])
    assert params.train.epochs == 5


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epoch=2", "train.epoch"),  # unknown key
        ("trian.epochs=2", "trian"),  # unknown section
        ("train.epochs=two", "train.epochs"),  # wrong type
        ("train.epochs=2.5", "train.epochs"),  # wrong type (not an integer)
        ("data.channels=2", "data.channels"),  # not an allowed value
        ("data.val_fraction=0.9", "data.val_fraction"),  # out of range
        ("train.lr=0", "train.lr"),  # out of range
        ("evaluate.score_weight=1.5", "evaluate.score_weight"),  # out of range
        ("data.image_size=40", "image_size"),  # not a multiple of 16
        ("train.device=tpu", "train.device"),  # not a choice
    ],
)
def test_bad_override_raises_config_error_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_params(PARAMS, overrides=[override])
    message = str(info.value)
    assert key in message
    assert "\n" not in message  # one line


def test_image_size_not_multiple_of_16_says_why() -> None:
    with pytest.raises(ConfigError, match=r"image_size.*40.*multiple of 16"):
        load_params(PARAMS, overrides=["data.image_size=40"])


def test_unknown_key_in_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 2\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_params(path)


def test_unknown_profile_names_it_and_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"profiles\.turbo.*quick"):
        load_params(PARAMS, profile="turbo")


@pytest.mark.parametrize("item", ["train.epochs", "=3"])
def test_malformed_override_is_refused(item: str) -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_params(PARAMS, overrides=[item])


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train: [epochs: 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)


def test_override_value_that_is_not_yaml_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"evaluate\.quantiles"):
        load_params(PARAMS, overrides=["evaluate.quantiles=[0.5, 0.9"])


# --- where a bad value came from --------------------------------------------------------


def test_bad_override_is_named_as_the_override_not_the_file() -> None:
    with pytest.raises(ConfigError, match=r"^-s train\.lr=-1: train\.lr: "):
        load_params(PARAMS, overrides=["train.lr=-1"])


def test_bad_value_in_the_file_is_named_by_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: train\.lr: "):
        load_params(path, overrides=["train.epochs=2"])


def test_an_override_that_fixes_the_file_wins(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: -1\n")
    assert load_params(path, overrides=["train.lr=0.001"]).train.lr == 0.001


def test_a_later_bad_value_for_the_same_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: -1\nprofiles:\n  quick:\n    train.lr: -2\n")
    with pytest.raises(ConfigError, match=r"^profile quick \(.*\): train\.lr: "):
        load_params(path, profile="quick")
    with pytest.raises(ConfigError, match=r"^-s train\.lr=-3: train\.lr: "):
        load_params(path, overrides=["train.lr=-3"], profile="quick")


def test_a_section_check_is_named_by_the_value_that_broke_it(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  image_size: 40\n")
    # an unrelated override in the same section does not take the blame
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: data: image_size=40"):
        load_params(path, overrides=["data.seed=3"])
    with pytest.raises(ConfigError, match=r"^-s data\.image_size=56: data: image_size=56"):
        load_params(PARAMS, overrides=["data.image_size=56"])


def test_an_option_override_is_named_by_its_label() -> None:
    with pytest.raises(ConfigError, match=r"^--name a b: ingest\.name: "):
        load_params(PARAMS, overrides=[("--name a b", "ingest.name=a b")])


def test_a_profile_override_does_not_leak_into_the_profile(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("profiles:\n  p:\n    train.augment: {hflip: true}\n")
    params = load_params(path, overrides=["train.augment.vflip=true"], profile="p")
    assert params.train.augment.hflip and params.train.augment.vflip
    assert params.profiles["p"] == {"train.augment": {"hflip": True}}
