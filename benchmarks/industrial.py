"""Benchmark: the detectors on the shared magnetic-tile set (real parts, pixel masks).

    .venv/bin/python benchmarks/industrial.py                      # all four models, seed 0
    .venv/bin/python benchmarks/industrial.py --models nested_restore --seeds 0 1 2 --json
    .venv/bin/python benchmarks/industrial.py --gallery results/synthetic_gallery.png

Every model runs through the stage functions users run (``train_stage`` then
``evaluate_stage``), on the same split (``train/good`` minus a seeded validation share;
``test/*`` sealed) and the same seeds. Settings are ``params.yaml`` plus, per model, the
overrides in ``MODEL_OVERRIDES`` (printed and stored with the figures):

- ``nested_restore``: the ``industrial`` profile (128 px, step schedule, synthetic
  anomalies, checkpoint chosen on the synthetic validation set);
- ``nested`` (the paper), ``skip_ganomaly``, ``ganomaly``: the paper's losses and
  validation-reconstruction checkpoint choice, at ``--baseline-size`` px, for
  ``--baseline-epochs`` epochs, base width ``--baseline-width`` (CPU-sized;
  ``--baseline-size 128 --baseline-width 32`` on a GPU).

Per run: image AUROC / AUPRC (leak-free protocol), pixel AUROC and AUPRO (maps against the
ground-truth masks at the model input size), the synthetic-validation AUROCs (image and
pixel; validation normals + synthetic anomalies, no test data), training seconds, device.
Writes ``results/industrial.json`` and ``results/industrial.md`` (mean ± std over seeds)
and each run to ``results/industrial_runs/<model>-<seed>.json`` (``--reuse`` takes those
instead of running again, e.g. to add seeds);
``--json`` prints the JSON object. The test split chooses nothing: it is scored once per
run, after training and evaluation statistics are fixed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from components.config import load_params  # noqa: E402
from components.data.images import to_model_input  # noqa: E402
from components.data.splits import load_splits  # noqa: E402
from components.detector.synthetic import synthesize_anomalies  # noqa: E402
from components.pipeline.stages import evaluate_stage, train_stage  # noqa: E402

SOURCE = "../shared/datasets/magnetic-tile.tar.gz"
MODELS = ("nested_restore", "nested", "skip_ganomaly", "ganomaly")
LABELS = {"nested_restore": "nested_restore (restoration + segmentation)",
          "nested": "nested (the paper)", "skip_ganomaly": "Skip-GANomaly",
          "ganomaly": "GANomaly"}
FIGURES = ("image_auroc", "image_auprc", "pixel_auroc", "aupro", "synthetic_image_auroc",
           "synthetic_pixel_auroc", "hot_normal_pixels", "train_seconds")


def model_overrides(model: str, baseline_size: int, baseline_epochs: int,
                    baseline_width: int = 16) -> tuple[str | None, list[str]]:
    """(profile, overrides) for one model; the data source and layout are shared."""
    common = [f"data.source={SOURCE}", "data.layout=industrial", "data.anomalous_class=null",
              "data.channels=1"]
    if model == "nested_restore":
        return "industrial", common
    return None, [*common, f"model.name={model}", f"data.image_size={baseline_size}",
                  f"model.base_width={baseline_width}",
                  f"train.epochs={baseline_epochs}",
                  f"train.lr_decay_start={max(1, baseline_epochs // 2)}"]


def run_one(model: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    profile, overrides = model_overrides(model, args.baseline_size, args.baseline_epochs,
                                         args.baseline_width)
    overrides += [f"train.seed={seed}", f"data.seed={seed}", *args.set]
    params = load_params(ROOT / "params.yaml", overrides=overrides, profile=profile)
    out = work / f"{model}-{seed}"
    splits = load_splits(params.data)
    t0 = time.perf_counter()
    result = train_stage(params, out, splits)
    seconds = time.perf_counter() - t0
    evaluate_stage(params, out, splits)
    metrics = json.loads((out / "metrics.json").read_text())
    if args.keep:
        keep = Path(args.keep) / f"{model}-{seed}"
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.json", "train_history.json", "test_scores.csv"):
            (keep / name).write_text((out / name).read_text())
        (keep / "detector.pt").write_bytes((out / "model" / "detector.pt").read_bytes())
        if (out / "plots" / "overlays.png").is_file():
            (keep / "overlays.png").write_bytes((out / "plots" / "overlays.png").read_bytes())
    pixel = metrics.get("pixel", {})
    synthetic = metrics.get("synthetic_validation", {})
    hot = metrics.get("validation_normals", {})
    return {
        "model": model, "seed": seed, "profile": profile, "overrides": overrides,
        "image_size": params.data.image_size,
        "image_auroc": metrics["leak_free"]["auroc"],
        "image_auprc": metrics["leak_free"]["auprc"],
        "pixel_auroc": pixel.get("auroc"), "aupro": pixel.get("aupro"),
        "synthetic_image_auroc": synthetic.get("image_auroc"),
        "synthetic_pixel_auroc": synthetic.get("pixel_auroc"),
        "hot_normal_pixels": hot.get("pixels_above"),  # validation normals' map > 0.5
        "train_seconds": round(seconds, 1), "best_epoch": result.best_epoch,
        "device": str(result.runtime.device),
        "precision": "bf16" if result.runtime.amp_dtype else "fp32",
        "threads": result.runtime.threads or torch.get_num_threads(),
        "counts": metrics["counts"],
        "per_defect": metrics.get("per_defect"),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model]
        row: dict[str, Any] = {"seeds": [r["seed"] for r in mine],
                               "image_size": mine[0]["image_size"]}
        for key in FIGURES:
            values = [r[key] for r in mine if r.get(key) is not None]  # older runs lack some
            if values:
                row[key] = {"mean": statistics.fmean(values), "n": len(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        by_type = [r["per_defect"] for r in mine if r.get("per_defect")]
        if by_type:  # runs cached before per-defect figures existed have none
            row["per_defect"] = {
                name: {key: {"mean": statistics.fmean(v), "std": statistics.stdev(v)
                             if len(v) > 1 else 0.0, "n": len(v)}
                       for key in ("image_auroc", "pixel_auroc")
                       if (v := [t[name][key] for t in by_type if key in t.get(name, {})])}
                for name in sorted({n for t in by_type for n in t})}
        table[model] = row
    return table


def _cell(row: dict[str, Any], key: str, digits: int = 3) -> str:
    if key not in row:
        return "–"
    m, s = row[key]["mean"], row[key]["std"]
    return _spread(f"{m:.{digits}f}", f"{s:.{digits}f}", row, key)


def _spread(mean: str, std: str, row: dict[str, Any], key: str) -> str:
    """``mean ± std`` over the runs that have the figure; ``mean (n of N runs)`` where
    older runs lack it; the mean alone for one run."""
    n = row[key].get("n", len(row["seeds"]))
    if n < len(row["seeds"]):
        return f"{mean} ({n} of {len(row['seeds'])} runs)"
    return f"{mean} ± {std}" if n > 1 else mean


def _percent(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return "–"
    m, s = 100 * row[key]["mean"], 100 * row[key]["std"]
    return _spread(f"{m:.2f}", f"{s:.2f}", row, key)


def write_markdown(path: Path, table: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    lines = [
        "# Magnetic tiles: image and pixel figures (leak-free)",
        "",
        f"Measured {meta['date']} on {meta['machine']} ({meta['device']}), seeds "
        f"{meta['seeds']}. Test split sealed: scored once per run; checkpoints, statistics "
        "and thresholds come from validation normals (and, for nested_restore, synthetic "
        "anomalies made from them). `benchmarks/industrial.py` wrote this file. "
        "Mean ± std where a model has several seeds (column `seeds`).",
        "",
        "| model | seeds | px | image AUROC | image AUPRC | pixel AUROC | AUPRO | synthetic-val "
        "image AUROC | synthetic-val pixel AUROC | val-normal pixels > 0.5 (%) | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, row in table.items():
        lines.append(
            f"| {LABELS.get(model, model)} | {len(row['seeds'])} | {row['image_size']} | "
            f"{_cell(row, 'image_auroc')} | "
            f"{_cell(row, 'image_auprc')} | {_cell(row, 'pixel_auroc')} | "
            f"{_cell(row, 'aupro')} | {_cell(row, 'synthetic_image_auroc')} | "
            f"{_cell(row, 'synthetic_pixel_auroc')} | {_percent(row, 'hot_normal_pixels')} | "
            f"{_cell(row, 'train_seconds', 0)} |")
    typed = {m: r["per_defect"] for m, r in table.items() if r.get("per_defect")}
    if typed:
        names = sorted({n for t in typed.values() for n in t})
        lines += ["", "Per defect type, each against the test normals: image AUROC / pixel "
                  "AUROC (mean over the runs that have the figure; it chooses nothing).", "",
                  "| model | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]
        for model, types in typed.items():
            cells = []
            for name in names:
                fig = types.get(name, {})
                cells.append(" / ".join(f"{fig[k]['mean']:.3f}" if k in fig else "–"
                                        for k in ("image_auroc", "pixel_auroc")))
            lines.append(f"| {LABELS.get(model, model)} | " + " | ".join(cells) + " |")
    lines += ["", "Settings per model (on top of params.yaml):", ""]
    for model, (profile, overrides) in meta["settings"].items():
        lines.append(f"- {model}: profile `{profile}`, overrides `{' '.join(overrides)}`")
    path.write_text("\n".join(lines) + "\n")


def write_gallery(path: Path, params_profile: str = "industrial", n: int = 8) -> None:
    """What the restoration detector is taught: normal tiles, corrupted, and the masks."""
    params = load_params(ROOT / "params.yaml", profile=params_profile,
                         overrides=[f"data.source={SOURCE}", "data.channels=1"])
    splits = load_splits(params.data, include=("train",))
    x = to_model_input(splits.train.images[:n])
    cfg = params.train.synthetic.model_copy(update={"probability": 1.0})
    x_tilde, mask = synthesize_anomalies(x, cfg, torch.Generator().manual_seed(0))

    def row(t: torch.Tensor) -> np.ndarray:
        return np.concatenate([((img[0] + 1) * 127.5).round().byte().numpy() for img in t], 1)

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([row(x), row(x_tilde), row(mask * 2 - 1)], 0)).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--baseline-size", type=int, default=64)
    ap.add_argument("--baseline-epochs", type=int, default=15)
    ap.add_argument("--baseline-width", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], help="extra key=value for all")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--keep", default=None,
                    help="folder to keep metrics, test scores, the model and overlay grids")
    ap.add_argument("--gallery", default=None, help="write a synthetic-anomaly gallery PNG")
    ap.add_argument("--reuse", action="store_true",
                    help="take runs already in <out>/industrial_runs/<model>-<seed>.json")
    ap.add_argument("--cached-only", action="store_true",
                    help="train nothing: summarise the runs already cached (seeds may differ "
                         "per model)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.gallery:
        write_gallery(Path(args.gallery))
        if not args.json:
            print(f"gallery: {args.gallery}")
    runs = []
    cache = Path(args.out) / "industrial_runs"
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for model in args.models:
                cached = cache / f"{model}-{seed}.json"
                if (args.reuse or args.cached_only) and cached.is_file():  # measured before
                    run = json.loads(cached.read_text())
                elif args.cached_only:
                    continue
                else:
                    run = run_one(model, seed, args, Path(tmp))
                    cache.mkdir(parents=True, exist_ok=True)
                    cached.write_text(json.dumps(run, indent=2) + "\n")
                runs.append(run)
                if not args.json:
                    print(json.dumps(run), flush=True)
    table = summarise(runs)
    device = runs[0]["device"] if runs else "cpu"
    # runs cached before the thread count was recorded: the train.threads they were given
    threads = sorted({r.get("threads") or next((int(o.split("=")[1]) for o in r["overrides"]
                                                if o.startswith("train.threads=")),
                                               torch.get_num_threads()) for r in runs})
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
            f"training threads: {'/'.join(map(str, threads))}",
            "device": device, "seeds": args.seeds,
            "settings": {m: model_overrides(m, args.baseline_size, args.baseline_epochs,
                                            args.baseline_width) for m in args.models}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "summary": table, "runs": runs}
    (out / "industrial.json").write_text(json.dumps(document, indent=2) + "\n")
    write_markdown(out / "industrial.md", table, meta)
    print(json.dumps(document) if args.json else (out / "industrial.md").read_text())


if __name__ == "__main__":
    main()
