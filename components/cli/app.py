"""The ``nestad`` app: ``train``, ``evaluate`` and ``score`` (thin glue over the stage
functions in ``components.pipeline.stages``), plus the data and registry commands.

Every command reads ``params.yaml`` through ``components.config`` (``--profile`` and
``-s KEY=VALUE`` override it) and turns a ``NestadError`` into one red line and exit
code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from components.cli.common import (
    OutOpt,
    ParamsOpt,
    ProfileOpt,
    SetOpt,
    _params,
    console,
    friendly_errors,
)
from components.errors import NestadError

app = typer.Typer(
    name="nestad",
    help="Leak-free GAN anomaly detection (fully-nested encoder-decoder, Zhang 2022).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def _print_metrics(report, out: Path) -> None:
    table = Table(title="Test metrics (threshold-free AUROC/AUPRC; F1 etc. at the threshold)")
    table.add_column("protocol")
    for key in ("auroc", "auprc", "f1", "precision", "recall", "threshold"):
        table.add_column(key, justify="right")
    lf = report.leak_free
    thr = report.norm.threshold(lf["threshold_used"])
    table.add_row(f"leak-free (threshold {lf['threshold_used']})",
                  *(f"{lf[k]:.4f}" for k in ("auroc", "auprc", "f1", "precision", "recall")),
                  f"{thr:.4f}")
    pc = report.paper_compatible
    table.add_row("paper-compatible (test min-max, 0.2)",
                  *(f"{pc[k]:.4f}" for k in ("auroc", "auprc", "f1", "precision", "recall",
                                             "threshold")))
    Console().print(table)
    pixel, synthetic = report.extra.get("pixel"), report.extra.get("synthetic_validation")
    if pixel:
        console.print(f"pixel (test masks): AUROC {pixel['auroc']:.4f}  AUPRO {pixel['aupro']:.4f}")
    if synthetic:
        console.print(f"synthetic validation (no test data): image AUROC "
                      f"{synthetic['image_auroc']:.4f}  pixel AUROC {synthetic['pixel_auroc']:.4f}")
    hot = report.extra.get("validation_normals")
    if hot:
        console.print(f"validation normals above {hot['level']:g} on the map: "
                      f"{hot['images_above']:.0%} of images, {hot['pixels_above']:.3%} of pixels")
    per_defect = report.extra.get("per_defect") or {}
    if len(per_defect) > 1:  # one type is the overall figure already
        console.print("per defect type (against the test normals): " + "; ".join(
            f"{name} ({row['count']}) image {row['image_auroc']:.3f}"
            + (f" pixel {row['pixel_auroc']:.3f}" if "pixel_auroc" in row else "")
            for name, row in per_defect.items()))
    if (out / "plots" / "overlays.png").is_file():
        console.print(f"overlays: {out / 'plots' / 'overlays.png'}")
    if (out / "report" / "index.html").is_file():
        console.print(f"report:  {out / 'report' / 'index.html'} (open in a browser)")
    console.print(f"metrics: {out / 'metrics.json'}\nplots:   {out / 'plots'}\n"
                  f"model:   {out / 'model' / 'detector.pt'}\nscores:  {out / 'test_scores.csv'}")


@app.command()
@friendly_errors
def train(
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    out: OutOpt = Path("outputs"),
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/last.pt "
                                                 "(none there: a notice, then epoch 1).")] = False,
    evaluate: Annotated[bool, typer.Option(help="Evaluate right after training.")] = False,
    nproc_per_node: Annotated[int | None, typer.Option(
        "--nproc-per-node", help="Data-parallel: torchrun starts N processes on this node "
        "(one per GPU; gloo on CPU); train.batch_size stays the global batch.")] = None,
    nnodes: Annotated[int | None, typer.Option(
        "--nnodes", help="Nodes of a multi-node run, each running this command.")] = None,
    rdzv_endpoint: Annotated[str | None, typer.Option(
        "--rdzv-endpoint", help="HOST:PORT of the rendezvous, the same on every node.")] = None,
) -> None:
    """Train on normal images; keep the epoch chosen on validation normals."""
    from rich.markup import escape as _escape

    from components.data.splits import load_splits
    from components.detector.evaluate import require_both_classes
    from components.pipeline.stages import evaluate_stage, train_stage

    overrides: list = list(set_ or [])  # the launch options are train.distributed keys
    for flag, key, value in (("--nproc-per-node", "nproc_per_node", nproc_per_node),
                             ("--nnodes", "nnodes", nnodes),
                             ("--rdzv-endpoint", "rdzv_endpoint", rdzv_endpoint)):
        if value is not None:
            overrides.append((f"{flag} {value}", f"train.distributed.{key}={json.dumps(value)}"))
    cfg = _params(params, profile, overrides)
    last = out / "checkpoints" / "last.pt"
    if resume and not last.is_file():  # training starts fresh, as fit does without one
        console.print(f"[yellow]notice:[/] --resume: no checkpoint {last}; training starts "
                      "from epoch 1", highlight=False, soft_wrap=True)
    if cfg.train.distributed.nproc_per_node is not None:  # torchrun, as a subprocess
        from components.cli.torchrun import train_distributed

        worker_overrides = [o if isinstance(o, str) else o[1] for o in overrides]
        train_distributed(cfg, params, profile, worker_overrides, out, resume, evaluate)
        return
    with _progress() as bar:
        task = bar.add_task("decoding images", total=None, info="")
        include = ("train", "val", "test") if evaluate else ("train", "val")
        splits = load_splits(cfg.data, progress=lambda n: bar.advance(task, n), include=include)
        for line in splits.warnings:  # identical copies kept once (data.duplicates)
            console.print(f"[yellow]warning:[/] {_escape(line)}", highlight=False,
                          soft_wrap=True)
        if evaluate:  # refused before training writes anything to the run folder
            require_both_classes(splits.test.is_anomaly, cfg.data)
        bar.update(task, total=bar.tasks[task].completed)
        console.print(f"train {len(splits.train)} · val {len(splits.val)} normal images"
                      + (f" · test {len(splits.test)}" if evaluate else ""))
        tc = cfg.train
        intervals = -(-tc.steps // tc.eval_every) if tc.steps else tc.epochs
        epochs = bar.add_task("intervals" if tc.steps else "epochs", total=intervals, info="")
        batches = bar.add_task("batches", total=None, info="")

        def on_batch(s) -> None:
            bar.update(batches, completed=s.batch, total=s.batches,
                       description=f"epoch {s.epoch}", info=f"D {s.loss_d:.3f}  G {s.loss_g:.3f}")

        def on_epoch(r) -> None:
            figure = (f"synthetic AUROC {r.val_synthetic_auroc:.3f}/"
                      f"{r.val_synthetic_pixel_auroc:.3f}" if r.val_synthetic_auroc is not None
                      else f"val R {r.val_recon:.4f}")
            bar.update(epochs, completed=r.epoch, info=f"{figure}  {r.images_per_s:.0f} img/s")

        result = train_stage(cfg, out, splits=splits, resume=resume, on_epoch=on_epoch,
                             on_batch=on_batch)
    rule = {"val_recon": "lowest validation reconstruction error",
            "synthetic": "best synthetic-validation AUROC, image and pixel",
            "last": "the last"}[cfg.train.select_on]
    console.print(f"kept epoch {result.best_epoch} ({rule}) "
                  f"on {result.runtime.device}, "
                  f"{'bf16' if result.runtime.amp_dtype else 'fp32'}; "
                  f"checkpoints in {out / 'checkpoints'}")
    if evaluate:
        _print_metrics(evaluate_stage(cfg, out, splits=splits), out)


@app.command("evaluate")
@friendly_errors
def evaluate_cmd(
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    out: OutOpt = Path("outputs"),
) -> None:
    """Fit normalisation on validation normals, then score the sealed test split once."""
    from components.pipeline.stages import evaluate_stage

    cfg = _params(params, profile, set_)
    with console.status("scoring validation and test images"):
        report = evaluate_stage(cfg, out)
    _print_metrics(report, out)


@app.command()
@friendly_errors
def score(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Model file, run folder's "
                                        "model/ directory, or a registered model "
                                        "models:/<name>@<alias> | models:/<name>/<version>.")
                     ] = Path("outputs/model"),
    output: Annotated[Path | None, typer.Option("--output", help="CSV to write "
                                                "(default: standard output).")] = None,
    threshold: Annotated[str | None, typer.Option(help="fpr | fixed (default: the model's).")
                         ] = None,
    maps: Annotated[Path | None, typer.Option("--maps", help="Folder for heat-map overlays: "
                                              "DIR/<stem>_map.png per image, at the source "
                                              "image's size (a repeated stem gets -2, -3...); "
                                              "adds a 'map' column.")] = None,
    backend: Annotated[str, typer.Option("--backend", help="torch | onnx | openvino: the "
                                         "detector, or its verified export (--model: an "
                                         "export folder, or a run folder or registered "
                                         "model carrying one).")] = "torch",
    report: Annotated[Path | None, typer.Option("--report", help="Folder for an inspection "
                                                "report of the batch: DIR/index.html (static; "
                                                "flagged images first, thresholds drawn).")
                      ] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Score in parallel on a "
                                                "local Dask cluster of N workers (the batch "
                                                "scoring flow; an s3:// source implies 2); "
                                                "adds an 'error' column.")] = None,
    dask_address: Annotated[str | None, typer.Option("--dask-address", help="Score on an "
                                                     "existing Dask cluster (tcp://host:8786)."
                                                     )] = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Images per parallel task."
                                            )] = 64,
) -> None:
    """Score images with a saved model: CSV of path, score, normalised_score, is_anomaly
    (and map, with --maps; an HTML inspection report with --report)."""
    import csv

    from components.pipeline.stages import score_paths

    if threshold not in (None, "fpr", "fixed"):
        raise NestadError(f"--threshold: {threshold!r} is not 'fpr' or 'fixed'")
    if backend not in ("torch", "onnx", "openvino"):
        raise NestadError(f"--backend: {backend!r} is not torch, onnx or openvino")
    if str(model).startswith("models:/"):  # registry (params.yaml here): downloaded, cached
        from components.registry.download import resolve_model_uri

        model = resolve_model_uri(str(model))
    from components.cli import batch

    if batch.wants_parallel(paths, workers, dask_address):  # s3://, --workers, --dask-address
        batch.score_batch(paths, model, output, threshold, workers, dask_address, chunk_size,
                          {"--maps": maps, "--report": report, "--backend": backend != "torch"})
        return
    rows = score_paths(model, paths, output, threshold=threshold, maps_dir=maps,
                       backend=backend, report_dir=report)
    if output is None:
        columns = ["path", "score", "normalised_score", "is_anomaly"] + (["map"] if maps else [])
        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    else:
        flagged = sum(r["is_anomaly"] for r in rows)
        console.print(f"scored {len(rows)} images, {flagged} flagged anomalous -> {output}"
                      + (f"; maps in {maps}" if maps else "")
                      + (f"; report {report / 'index.html'}" if report else ""))


def _register_extensions() -> None:
    """Commands of other areas (data, registry) register themselves here; the flows' own
    (``run``, ``schedule``) are added by ``flows.cli``, the console script."""
    from components.cli import data, monitor, registry

    for module in (data, registry, monitor):
        module.register(app)
    from components.cli import export

    export.register(app)
    _registered.append(True)


_registered: list[bool] = []


def get_app() -> typer.Typer:
    """The app with every area's commands registered (once)."""
    if not _registered:
        _register_extensions()
    return app


def main() -> None:
    get_app()()
