"""The process torchrun starts for ``nestad train --nproc-per-node N`` (one per rank):

    python -m components.cli.train_worker --out DIR --error-dir DIR [--params P]
        [--profile NAME] [-s KEY=VALUE ...] [--resume] [--evaluate]

Each rank joins the process group (gloo on CPU, nccl on CUDA, ``components.detector.
distributed``), loads the data and runs ``train_stage`` with its share of every batch.
Rank 0 alone prints one line per epoch (standard output), writes the checkpoints and
``train_history.json`` and, with ``--evaluate``, evaluates. A group that torchrun
restarts (``train.distributed.max_restarts``) resumes from ``last.pt``. A ``NestadError``
becomes one line in ``ERROR_DIR/rank<R>.txt``, for the launcher's message, and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from components.errors import NestadError

ERROR_FILE = "rank{rank}.txt"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.cli.train_worker")
    parser.add_argument("--params", "-p", type=Path, default=Path("params.yaml"))
    parser.add_argument("--profile")
    parser.add_argument("--set", "-s", action="append", default=[], dest="overrides")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--error-dir", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--evaluate", action="store_true")
    return parser


def _print_epoch(epochs: int):
    def report(r) -> None:
        figure = (f"synthetic AUROC {r.val_synthetic_auroc:.3f}/{r.val_synthetic_pixel_auroc:.3f}"
                  if r.val_synthetic_auroc is not None else f"val R {r.val_recon:.4f}")
        print(f"epoch {r.epoch}/{epochs}: D {r.loss_d:.3f}  G {r.loss_g:.3f}  {figure}  "
              f"{r.images_per_s:.0f} img/s (all processes)", flush=True)

    return report


def run(args: argparse.Namespace) -> None:
    """Train (and evaluate) as one rank of the group torchrun started."""
    from components.config import load_params
    from components.data.splits import load_splits
    from components.detector.distributed import (
        close_distributed,
        context_from_env,
        init_distributed,
    )
    from components.detector.evaluate import require_both_classes
    from components.pipeline.stages import evaluate_stage, train_stage
    from components.runtime import resolve_runtime

    cfg = load_params(args.params, args.overrides, args.profile)
    tc, dc = cfg.train, cfg.train.distributed
    ctx = context_from_env(dc.sync_batchnorm)
    device = resolve_runtime(tc.device, tc.precision, tc.channels_last, tc.compile,
                             tc.threads).device
    init_distributed(ctx, device.type, dc.timeout_s)
    try:
        # a restarted group goes on from the last finished epoch
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        resume = args.resume or restarts > 0
        evaluate = args.evaluate and ctx.is_main
        splits = load_splits(cfg.data, include=("train", "val", "test") if evaluate
                             else ("train", "val"))
        if evaluate:  # refused before training writes anything
            require_both_classes(splits.test.is_anomaly, cfg.data)
        if ctx.is_main:
            world = ctx.world_size
            print(f"rank 0 of {world}: train {len(splits.train)} · val {len(splits.val)} "
                  f"normal images; global batch {tc.batch_size} ({tc.batch_size // world} "
                  f"per process) on {device.type}"
                  + (f"; restart {restarts}, resuming" if restarts else ""), flush=True)
        intervals = -(-tc.steps // tc.eval_every) if tc.steps else tc.epochs
        result = train_stage(cfg, args.out, splits=splits, resume=resume,
                             on_epoch=_print_epoch(intervals) if ctx.is_main else None,
                             dist=ctx)
    finally:
        close_distributed()
    if not ctx.is_main:
        return
    print(f"kept epoch {result.best_epoch}; checkpoints in {args.out / 'checkpoints'}",
          flush=True)
    if evaluate:
        report = evaluate_stage(cfg, args.out, splits=splits)
        lf = report.leak_free
        print(f"leak-free AUROC {lf['auroc']:.4f}  AUPRC {lf['auprc']:.4f}; metrics: "
              f"{args.out / 'metrics.json'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except NestadError as exc:
        rank = os.environ.get("RANK", "0")
        args.error_dir.mkdir(parents=True, exist_ok=True)
        (args.error_dir / ERROR_FILE.format(rank=rank)).write_text(f"{exc}\n")
        print(f"error: rank {rank}: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
