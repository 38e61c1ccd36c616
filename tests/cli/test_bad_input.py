"""Bad input a user meets at the command line (issue 12, items 5 and 6): a test split with
one class, a missing ``-p`` file, bad values named with where they came from, ``--resume``
without a checkpoint. Each error: exit code 2, one line naming the file or key, no
traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from cli_support import assert_one_line_error
from typer.testing import CliRunner

from components.cli.app import get_app


def _invoke(*args: object):
    return CliRunner().invoke(get_app(), [str(a) for a in args])


def _train_args(synth, source: Path, out: Path, command: str = "train",
                params: Path | None = None) -> list[object]:
    """``command`` with the repo's params.yaml (or ``params``) and tiny ``-s`` overrides."""
    sets = synth.overrides(**{"data.source": str(source), "data.layout": "industrial"})
    args: list[object] = [command, "-p", params or synth.repo / "params.yaml", "-o", out]
    for key, value in sets.items():
        args += ["-s", f"{key}={json.dumps(value) if isinstance(value, bool) else value}"]
    return args




def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _one_class(make_dataset, missing: str) -> Path:
    """An industrial dataset whose test split lacks ``missing`` ("anomalous" | "normal")."""
    source = make_dataset("industrial", name=f"no_{missing}")
    shutil.rmtree(source / "test" / ("square" if missing == "anomalous" else "good"))
    return source


# --- item 5: evaluation needs both classes ----------------------------------------------------


@pytest.mark.parametrize(("missing", "hint"), [("anomalous", "test/<defect type>/"),
                                               ("normal", "test/good/")])
def test_train_evaluate_refuses_a_test_split_with_one_class(make_dataset, synth, tmp_path,
                                                            missing: str, hint: str) -> None:
    source = _one_class(make_dataset, missing)
    out = tmp_path / "run"
    result = _invoke(*_train_args(synth, source, out), "--evaluate")
    assert_one_line_error(result, f"{source}: the test split has no {missing} images",
                           "needs both classes", hint)
    assert not out.exists()  # refused before training: no checkpoint, metrics or model


@pytest.fixture(scope="module")
def trained_only(tmp_path_factory, synth):
    """A run folder trained (not evaluated) on a tiny dataset with both classes."""
    root = tmp_path_factory.mktemp("bad_input")
    source = synth.dataset(root / "data", "industrial", n_train=12, n_test=4, n_defect=4)
    out = root / "run"
    result = _invoke(*_train_args(synth, source, out))
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("missing", ["anomalous", "normal"])
def test_evaluate_refuses_a_test_split_with_one_class(trained_only, make_dataset, synth,
                                                      missing: str) -> None:
    before = _files(trained_only)
    source = _one_class(make_dataset, missing)
    result = _invoke(*_train_args(synth, source, trained_only, command="evaluate"))
    assert_one_line_error(result, str(source), f"no {missing} images")
    assert _files(trained_only) == before  # no metrics.json, model, scores or plots
    assert not (trained_only / "metrics.json").exists()


# --- item 6: config -------------------------------------------------------------------------


def _commands_with_params() -> list[str]:
    group = typer.main.get_command(get_app())
    return sorted(name for name, cmd in group.commands.items()
                  if any(p.name == "params" for p in cmd.params))


def test_every_data_train_and_registry_command_takes_params() -> None:
    assert {"train", "evaluate", "ingest", "validate", "register", "promote"} <= set(
        _commands_with_params())


@pytest.mark.parametrize("command", _commands_with_params())
@pytest.mark.parametrize("flag", ["-p", "--params"])
def test_missing_params_file_given_explicitly_is_an_error(command: str, flag: str, tmp_path,
                                                          monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = _invoke(command, flag, "missing.yaml")
    assert_one_line_error(result, "--params missing.yaml: no such file")
    assert _files(tmp_path) == []  # no run folder, mlflow.db, data/ or .dvc


def test_params_that_is_a_folder_is_an_error(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    assert_one_line_error(_invoke("train", "-p", "conf"), "--params conf: not a file")
    assert _files(tmp_path) == ["conf"]


def test_bad_set_override_names_the_override(make_dataset, synth, tmp_path) -> None:
    out = tmp_path / "run"
    args = _train_args(synth, make_dataset("industrial"), out)
    assert_one_line_error(_invoke(*args, "-s", "train.lr=-1"),
                           "-s train.lr=-1: train.lr: Input should be greater than 0")
    assert not out.exists()


def test_bad_value_in_the_params_file_names_the_file(make_dataset, synth, tmp_path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: -1\n")
    out = tmp_path / "run"
    args = _train_args(synth, make_dataset("industrial"), out, params=params)
    assert_one_line_error(_invoke(*args), f"{params}: train.lr: Input should be greater than 0")
    assert not out.exists()


def test_bad_value_set_by_a_profile_names_the_profile(make_dataset, synth, tmp_path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("profiles:\n  quick:\n    train.epochs: 1\n    train.lr: -1\n")
    out = tmp_path / "run"
    args = _train_args(synth, make_dataset("industrial"), out, params=params)
    assert_one_line_error(_invoke(*args, "--profile", "quick"),
                           f"profile quick ({params}): train.lr: Input should be greater than 0")
    assert not out.exists()


def test_bad_ingest_name_names_the_option(tmp_path, synth, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = _invoke("ingest", "--name", "a b", "-p", synth.repo / "params.yaml", "--no-track")
    assert_one_line_error(result, "--name a b: ingest.name")
    assert _files(tmp_path) == []


def test_resume_without_a_checkpoint_says_it_starts_fresh(make_dataset, synth, tmp_path) -> None:
    out = tmp_path / "run"
    result = _invoke(*_train_args(synth, make_dataset("industrial"), out), "--resume")
    assert result.exit_code == 0, result.output
    notices = [line for line in result.output.splitlines() if line.startswith("notice:")]
    assert notices == [f"notice: --resume: no checkpoint {out / 'checkpoints' / 'last.pt'}; "
                       "training starts from epoch 1"], result.output
    assert json.loads((out / "train_history.json").read_text())["resumed_from"] == 0
