"""The ``nestad`` command line: help, train --evaluate, score, and one clear line per error."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from cli_support import assert_one_line_error
from typer.testing import CliRunner

from components.cli.app import get_app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _invoke(*args: object):
    return CliRunner().invoke(get_app(), [str(a) for a in args])


def _train_args(synth, source: Path, out: Path, **overrides: object) -> list[object]:
    """``train`` with the repo's params.yaml and tiny ``-s`` overrides."""
    sets = synth.overrides(
        **{
            "data.source": str(source),
            "data.layout": "industrial",
            "evaluate.plots": True,
            **overrides,
        }
    )
    args: list[object] = ["train", "-p", synth.repo / "params.yaml", "-o", out]
    for key, value in sets.items():
        args += ["-s", f"{key}={json.dumps(value) if isinstance(value, bool) else value}"]
    return args




@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synth):
    """``nestad train --evaluate`` once on a tiny industrial dataset: (result, out, source)."""
    root = tmp_path_factory.mktemp("cli")
    source = synth.dataset(root / "data", "industrial", n_train=12, n_test=4, n_defect=4)
    out = root / "run"
    result = _invoke(*_train_args(synth, source, out), "--evaluate")
    return result, out, source


# --- help -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("train", ["--params", "--profile", "--set", "--out", "--resume", "--evaluate"]),
        ("evaluate", ["--params", "--profile", "--set", "--out"]),
        ("score", ["--model", "--output", "--threshold", "--maps", "paths"]),
    ],
)
def test_help_lists_each_commands_options(command: str, options: list[str]) -> None:
    result = _invoke(command, "--help")
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.output


def test_no_arguments_shows_the_commands() -> None:
    result = _invoke()
    for command in ("train", "evaluate", "score"):
        assert command in result.output


# --- train --evaluate and evaluate ------------------------------------------------------------


def test_train_evaluate_writes_metrics_plots_model_and_scores(trained_run) -> None:
    result, out, _ = trained_run
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert str(out / "metrics.json") in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["leak_free"]["auroc"] <= 1.0
    assert metrics["counts"]["test_normal"] == 4 and metrics["counts"]["test_anomalous"] == 4
    assert metrics["paper_compatible"]["protocol"].startswith("paper-compatible")
    for name in ("roc_pr.png", "score_histogram.png", "reconstructions.png"):
        assert (out / "plots" / name).read_bytes().startswith(PNG_MAGIC), name
    assert (out / "model" / "detector.pt").stat().st_size > 0
    assert (out / "checkpoints" / "last.pt").is_file()
    with (out / "test_scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8
    assert {r["label"] for r in rows} == {"good", "square"}
    assert all(0.0 <= float(r["normalised_score"]) <= 1.0 for r in rows)
    history = json.loads((out / "train_history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1]


def test_evaluate_command_rewrites_metrics_from_the_checkpoint(trained_run, synth) -> None:
    result, out, source = trained_run
    before = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").unlink()
    args = _train_args(synth, source, out)
    args[0] = "evaluate"
    again = _invoke(*args)
    assert again.exit_code == 0, again.output
    after = json.loads((out / "metrics.json").read_text())
    assert after["normalisation"] == before["normalisation"]
    assert after["leak_free"]["auroc"] == pytest.approx(before["leak_free"]["auroc"])


# --- score --------------------------------------------------------------------------------------


def test_score_folder_writes_csv_with_the_documented_columns(trained_run, tmp_path) -> None:
    _, out, source = trained_run
    target = tmp_path / "scores.csv"
    result = _invoke("score", source / "test", "-m", out / "model", "--output", target)
    assert result.exit_code == 0, result.output
    with target.open() as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["path", "score", "normalised_score", "is_anomaly"]
    assert len(rows) == 8
    assert all(Path(r["path"]).is_file() for r in rows)
    assert all(0.0 <= float(r["normalised_score"]) <= 1.0 for r in rows)
    assert {r["is_anomaly"] for r in rows} <= {"True", "False"}
    # the same images keep the scores the evaluation gave them
    with (out / "test_scores.csv").open() as fh:
        evaluated = {r["path"]: float(r["score"]) for r in csv.DictReader(fh)}
    for row in rows:
        key = Path(row["path"]).relative_to(source).as_posix()
        assert float(row["score"]) == pytest.approx(evaluated[key], rel=1e-5)


def test_score_without_output_prints_csv_and_threshold_choice_applies(trained_run) -> None:
    _, out, source = trained_run
    files = sorted((source / "test" / "square").glob("*.png"))[:2]
    printed = {}
    for threshold in ("fixed", "fpr"):
        result = _invoke(
            "score", *files, "-m", out / "model" / "detector.pt", "--threshold", threshold
        )
        assert result.exit_code == 0, result.output
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        assert [r["path"] for r in rows] == [str(f) for f in files]
        printed[threshold] = rows
    metrics = json.loads((out / "metrics.json").read_text())["normalisation"]
    for threshold, key in (("fixed", "threshold_fixed"), ("fpr", "threshold_fpr")):
        for row in printed[threshold]:
            expected = float(row["normalised_score"]) >= metrics[key]
            assert row["is_anomaly"] == str(expected)


def test_score_maps_writes_one_overlay_per_image_at_the_source_size(trained_run, tmp_path,
                                                                     synth) -> None:
    import numpy as np
    from PIL import Image

    from components.data.images import to_model_input
    from components.detector.map_metrics import upsample_maps
    from components.detector.overlay import overlay
    from components.detector.package import load_detector

    _, out, _ = trained_run
    sources = []
    for folder, seed in (("a", 0), ("b", 1)):  # the same stem in two folders
        (tmp_path / folder).mkdir()
        sources.append(tmp_path / folder / "part.png")
        synth.image("blob", seed, 48, defect=bool(seed)).resize((40, 24)).save(sources[-1])
    target, maps = tmp_path / "scores.csv", tmp_path / "maps"
    result = _invoke("score", *sources, "-m", out / "model", "--output", target, "--maps", maps)
    assert result.exit_code == 0, result.output
    with target.open() as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["path", "score", "normalised_score", "is_anomaly", "map"]
    assert [r["map"] for r in rows] == [str(maps / "part_map.png"), str(maps / "part_map-2.png")]
    assert sorted(p.name for p in maps.iterdir()) == ["part_map-2.png", "part_map.png"]

    detector, meta = load_detector(out / "model")
    size = meta["image_size"]
    for source, row in zip(sources, rows, strict=True):
        picture = Image.open(row["map"])
        assert picture.format == "PNG" and picture.size == (40, 24) and picture.mode == "RGB"
        # the PyTorch path: the model-size input, its normalised map, upsampled to 40x24
        small = np.array(Image.open(source).convert("RGB").resize((size, size),
                                                                  Image.Resampling.BILINEAR))
        x = to_model_input(torch.from_numpy(small).permute(2, 0, 1)[None])
        score, _, _, map01 = detector.score_with_maps(x)
        assert float(row["score"]) == pytest.approx(float(score[0]), rel=1e-9)
        expected = overlay(np.asarray(Image.open(source).convert("RGB")),
                           upsample_maps(map01, (24, 40))[0, 0].numpy())
        diff = np.abs(np.asarray(picture, np.int16) - np.asarray(expected, np.int16))
        assert diff.max() <= 1

    printed = _invoke("score", sources[0], "-m", out / "model", "--maps", tmp_path / "m2")
    assert printed.exit_code == 0, printed.output
    assert printed.stdout.splitlines()[0] == "path,score,normalised_score,is_anomaly,map"
    assert (tmp_path / "m2" / "part_map.png").is_file()


# --- bad input: exit code 2 and one line, never a traceback -------------------------------------


def test_score_missing_file(trained_run, tmp_path) -> None:
    _, out, _ = trained_run
    assert_one_line_error(
        _invoke("score", tmp_path / "absent.png", "-m", out / "model"), "absent.png", "no such file"
    )


def test_score_missing_model(tmp_path, synth) -> None:
    image = tmp_path / "one.png"
    synth.image("blob", 0, 16).save(image)
    assert_one_line_error(_invoke("score", image, "-m", tmp_path / "nomodel"), "nomodel")


def test_score_truncated_image(trained_run, tmp_path, synth) -> None:
    _, out, _ = trained_run
    broken = tmp_path / "broken.png"
    synth.image("blob", 0, 32).save(broken)
    broken.write_bytes(broken.read_bytes()[:60])
    assert_one_line_error(_invoke("score", broken, "-m", out / "model"), "broken.png")


def test_score_unknown_threshold(trained_run, tmp_path, synth) -> None:
    _, out, _ = trained_run
    image = tmp_path / "one.png"
    synth.image("blob", 0, 16).save(image)
    assert_one_line_error(
        _invoke("score", image, "-m", out / "model", "--threshold", "median"), "--threshold"
    )


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.epoch=2", "train.epoch"),  # unknown key
        ("train.epochs=two", "train.epochs"),  # wrong type
        ("data.image_size=40", "image_size"),  # not a multiple of 16
        ("evaluate.quantiles=[0.5", "evaluate.quantiles"),  # not YAML
    ],
)
def test_train_bad_override(make_dataset, synth, tmp_path, override: str, needle: str) -> None:
    args = _train_args(synth, make_dataset("industrial"), tmp_path / "run")
    assert_one_line_error(_invoke(*args, "-s", override), needle)


def test_train_unknown_profile(make_dataset, synth, tmp_path) -> None:
    args = _train_args(synth, make_dataset("industrial"), tmp_path / "run")
    assert_one_line_error(_invoke(*args, "--profile", "turbo"), "turbo")


def test_train_missing_source(synth, tmp_path) -> None:
    args = _train_args(synth, tmp_path / "no_such_data", tmp_path / "run")
    assert_one_line_error(_invoke(*args), "no_such_data")


def test_train_truncated_image(make_dataset, synth, tmp_path) -> None:
    source = make_dataset("industrial")
    victim = sorted((source / "train" / "good").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:60])
    result = _invoke(*_train_args(synth, source, tmp_path / "run"))
    assert_one_line_error(result, victim.name)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "cmd",
    [
        "python -c 'print(1)'",  # another program
        "nestad ingest && rm -rf data",  # shell syntax: the shell must run it
        "nestad train > log.txt",
        "nestad train -s data.source=$DATA",
        "",
    ],
)
def test_in_process_stage_runner_declines_what_only_a_shell_can_run(cmd: str, tmp_path) -> None:
    from components.cli.stage_runner import run_nestad_command

    assert run_nestad_command(cmd, tmp_path) is None


def test_in_process_stage_runner_gives_the_commands_exit_status(tmp_path, capsys) -> None:
    from components.cli.stage_runner import run_nestad_command

    (tmp_path / "params.yaml").write_text("train:\n  epochs: 0\n")  # out of range
    assert run_nestad_command("nestad --help", tmp_path) == 0
    assert "train" in capsys.readouterr().out
    # Runs in ``cwd``: the relative --params resolves there, and the error names the key.
    assert run_nestad_command("nestad train --params params.yaml --out 'run dir'", tmp_path) == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and "Traceback" not in err
    assert not (tmp_path / "run dir").exists()
    assert run_nestad_command("nestad no-such-command", tmp_path) == 2
