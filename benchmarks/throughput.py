"""Benchmark: training and scoring throughput of the nested model, against an fp32 reference.

    .venv/bin/python benchmarks/throughput.py --json            # default width, ~3-6 min on 2 CPUs
    .venv/bin/python benchmarks/throughput.py --quick --json    # 2 repeats, fewer paths
    .venv/bin/python benchmarks/throughput.py --compile --json  # + torch.compile (minutes more)
    .venv/bin/python benchmarks/throughput.py --device cuda --compile --repeats 10

Measures, in one process and from one set of weights:

- **training** img/s: full ``GanTrainer.step`` calls (G update, then D update) on uint8
  batches prepared as ``fit`` prepares them;
- **scoring** img/s: ``score_images`` calls over uint8 images;

for these paths:

- ``reference``: plain fp32, eager, contiguous, PyTorch's default thread count: the step as
  ``GanTrainer`` runs it with nothing switched on, and a bare ``score_batch`` loop under
  no_grad;
- ``eager``: the project's default path (``resolve_runtime`` from params.yaml):
  channels_last, ``train.threads`` intra-op threads, BN folded and inference_mode for
  scoring, bf16 autocast where the hardware has fast bf16;
- ``eager_default_threads``: the same at PyTorch's thread count (when that differs), to
  separate what the thread setting gives from the rest;
- ``compiled`` (``--compile``): the eager path plus ``torch.compile``, which ``fit`` turns on
  for long runs on CUDA (``train.compile: auto``). Its compile time is the ``first_call_s``.

All paths take turns within every repeat, so load from other processes hits them alike;
speedups are medians of the per-repeat ratios to the reference. First calls (oneDNN set-up,
compilation) are excluded from the timings and reported. The headline ``train_*`` figures
are for the path ``fit`` would use on this device for the paper's full CIFAR-10 run.

FLOP utilisation = model FLOPs per image (torch's FlopCounterMode over one eager training
step, forward and backward of G and every D pass; G + 2 D forwards for scoring) x img/s /
peak FLOP/s. The peak is the best of square-matmul samples timed in turn with the paths (at
both thread counts), in bf16 where the hardware has fast bf16 (CUDA, AMX / AVX-512-BF16
CPUs), else fp32; the JSON says which, with the median rates beside it.

Model sizes come from params.yaml (``model``, ``data.image_size``, ``data.channels``,
``train.batch_size``); ``--width`` etc. override them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from components.config import load_params  # noqa: E402
from components.data.images import to_model_input  # noqa: E402
from components.detector.model import count_flops  # noqa: E402
from components.detector.networks import build_networks  # noqa: E402
from components.detector.score import score_batch, score_images  # noqa: E402
from components.detector.train import GanTrainer  # noqa: E402
from components.runtime import (  # noqa: E402
    COMPILE_MIN_TRAIN_STEPS,
    Runtime,
    compile_pays_off,
    cpu_has_fast_bf16,
    intra_op_threads,
    resolve_runtime,
)

SCORE_WEIGHT = 0.9
# Training steps of the paper's CIFAR-10 protocol: 45000 normals, 10% held out for
# validation, batch 64, 15 epochs. Decides (as fit does) whether the headline is compiled.
PAPER_RUN_STEPS = (45_000 * 9 // 10 // 64) * 15


# --- timing ------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _interleaved(
    jobs: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each job, the jobs taking turns within every repeat."""
    seconds: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            seconds[name].append(_timed(job, device))
    return seconds


def _speedup(reference: list[float], other: list[float]) -> float:
    """Median over repeats of reference time / other time (paired, so drift cancels)."""
    return statistics.median(r / o for r, o in zip(reference, other, strict=True))


# --- peak matmul rate --------------------------------------------------------------------


def matmul_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has fast bf16 units, else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def matmul_job(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> Callable[[], None]:
    """``reps`` (n x n) @ (n x n) matmuls, 2 n^3 FLOPs each, warmed up."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    (a @ b).sum().item()

    def job() -> None:
        for _ in range(reps):
            a @ b

    return job


# --- FLOPs per image ---------------------------------------------------------------------


def train_flops_per_image(
    generator: nn.Module,
    discriminator: nn.Module,
    cfg: Any,
    shape: tuple[int, int, int],
    device: torch.device,
) -> int:
    """FLOPs of one eager fp32 training step (forward and backward of every pass), per image,
    counted on copies over a batch of 4 (FLOPs scale linearly with the batch)."""
    trainer = GanTrainer(
        copy.deepcopy(generator),
        copy.deepcopy(discriminator),
        cfg,
        Runtime(device, None, False),
        compile=False,
    )
    x = torch.rand(4, *shape, device=device) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        trainer.step(x)
    return counter.get_total_flops() // 4


# --- the measured paths ------------------------------------------------------------------


def _uint8_images(n: int, shape: tuple[int, int, int], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


def _reference_scores(
    generator: nn.Module, discriminator: nn.Module, images: Tensor, device: torch.device, batch: int
) -> Tensor:
    """Plain fp32 eager contiguous scoring: the score_batch loop with no optimisation."""
    generator.eval()
    discriminator.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = to_model_input(images[start : start + batch].to(device))
            out.append(score_batch(generator, discriminator, x, SCORE_WEIGHT)[0])
    return torch.cat(out).cpu()


def _train_job(trainer: GanTrainer, images: Tensor, batches: int) -> Callable[[], None]:
    batch = len(images) // batches

    def job() -> None:
        for b in range(batches):
            losses = trainer.step(trainer.runtime.prepare(images[b * batch : (b + 1) * batch]))
            losses["loss_g"].item()  # as fit reads the losses every batch

    return job


def run(args: argparse.Namespace) -> dict[str, Any]:
    params = load_params(ROOT / "params.yaml")
    model_cfg = params.model.model_copy(
        update={
            k: v
            for k, v in {
                "base_width": args.width,
                "depth": args.depth,
                "disc_width": args.disc_width,
            }.items()
            if v is not None
        }
    )
    cfg = params.train
    batch = args.batch or cfg.batch_size
    size = args.image_size or params.data.image_size
    channels = params.data.channels
    shape = (channels, size, size)
    project = resolve_runtime(
        args.device,
        args.precision,
        cfg.channels_last,
        compile=False,
        threads=args.threads or cfg.threads,
    )
    device = project.device
    default_threads = torch.get_num_threads()  # PyTorch's: one per CPU
    reference_rt = Runtime(device, None, False, compile=False, threads=None)
    # the project's eager path at PyTorch's thread count, to separate the threads' share
    all_threads = dataclasses.replace(project, threads=None)
    threads_differ = project.threads not in (None, default_threads)
    with_compile = args.compile
    repeats = args.repeats or (2 if args.quick else 3)

    torch.manual_seed(0)
    generator, discriminator = build_networks(model_cfg, channels, size)
    flops_g = count_flops(generator, (1, *shape))
    flops_d = count_flops(discriminator, (1, *shape))
    flops_train = train_flops_per_image(generator, discriminator, cfg, shape, device)
    flops_score = flops_g + 2 * flops_d

    # the peak matmul is timed inside both interleaved loops, under the same load
    mm_dtype = matmul_dtype(device)
    mm_size = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    mm_reps = 50 if device.type == "cuda" else 4
    mm_call = matmul_job(device, mm_dtype, mm_size, mm_reps)

    def mm_project() -> None:
        with intra_op_threads(project.threads):
            mm_call()

    # peak = the best sample, at PyTorch's thread count or the project's: the hardware's
    # rate when the load from other processes was lightest (so utilisation is not flattered)
    mm_jobs = {"matmul": mm_call, "matmul_project": mm_project}

    # --- training: one trainer per path, all from the same weights ---------------------
    paths = {"reference": (reference_rt, False), "eager": (project, False)}
    if threads_differ and not args.quick:
        paths["eager_default_threads"] = (all_threads, False)
    if with_compile:
        paths["compiled"] = (project, True)
    train_images = _uint8_images(batch * args.batches, shape, seed=1)
    trainers = {
        name: GanTrainer(
            copy.deepcopy(generator), copy.deepcopy(discriminator), cfg, rt, compile=compiled
        )
        for name, (rt, compiled) in paths.items()
    }
    jobs = {name: _train_job(t, train_images, args.batches) for name, t in trainers.items()}
    first_losses: dict[str, dict[str, float]] = {}
    warmup_s: dict[str, float] = {}
    for name, trainer in trainers.items():  # first step from identical weights: same losses?
        x = trainer.runtime.prepare(train_images[:batch])
        start = time.perf_counter()
        first_losses[name] = {k: v.item() for k, v in trainer.step(x).items()}
        warmup_s[name] = time.perf_counter() - start
        for _ in range(args.warmup):
            jobs[name]()
    loss_diff = {
        name: max(
            abs(losses[k] - v) / abs(v) for k, v in first_losses["reference"].items() if v != 0.0
        )
        for name, losses in first_losses.items()
    }
    train_s = _interleaved({**jobs, **mm_jobs}, repeats, device)
    mm_s = {k: train_s.pop(k) for k in mm_jobs}

    # --- scoring ---------------------------------------------------------------------
    score_imgs = _uint8_images(batch * args.score_batches, shape, seed=2)
    g_eval, d_eval = copy.deepcopy(generator).to(device), copy.deepcopy(discriminator).to(device)
    score_jobs: dict[str, Callable[[], Any]] = {
        "reference": lambda: _reference_scores(g_eval, d_eval, score_imgs, device, batch),
        "eager": lambda: score_images(g_eval, d_eval, score_imgs, SCORE_WEIGHT, project, batch),
    }
    if threads_differ and not args.quick:
        score_jobs["eager_default_threads"] = lambda: score_images(
            g_eval, d_eval, score_imgs, SCORE_WEIGHT, all_threads, batch
        )
    if with_compile:
        compiled_rt = dataclasses.replace(project, compile=True)
        score_jobs["compiled"] = lambda: score_images(
            g_eval, d_eval, score_imgs, SCORE_WEIGHT, compiled_rt, batch
        )
    reference_scores = score_jobs["reference"]().double()
    score_warmup_s: dict[str, float] = {}
    score_diff: dict[str, float] = {}
    for name, job in score_jobs.items():
        start = time.perf_counter()
        out = job()
        score_warmup_s[name] = time.perf_counter() - start
        scores = torch.as_tensor(out.score if name != "reference" else out).double()
        score_diff[name] = ((scores - reference_scores).abs() / reference_scores.abs()).max().item()
        for _ in range(args.warmup):
            job()
    score_s = _interleaved({**score_jobs, **mm_jobs}, repeats, device)
    mm_samples = {k: v + score_s.pop(k) for k, v in mm_s.items()}
    mm_flops = 2 * mm_size**3 * mm_reps
    mm = mm_flops / min(min(v) for v in mm_samples.values())

    n_train = batch * args.batches
    fit_compiles = compile_pays_off(
        cfg.compile, device.type, PAPER_RUN_STEPS, COMPILE_MIN_TRAIN_STEPS
    )
    headline = "compiled" if with_compile and fit_compiles else "eager"
    result: dict[str, Any] = {
        "train_img_s": n_train / statistics.median(train_s[headline]),
        "train_speedup": _speedup(train_s["reference"], train_s[headline]),
        "score_img_s": len(score_imgs) / statistics.median(score_s["eager"]),
        "score_speedup": _speedup(score_s["reference"], score_s["eager"]),
        "flop_utilisation": None,
        "train_path": headline,
        "score_path": "eager",
    }
    result["flop_utilisation"] = flops_train * result["train_img_s"] / mm
    result["score_flop_utilisation"] = flops_score * result["score_img_s"] / mm
    result.update(
        {
            "device": str(device),
            "device_name": (
                torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else platform.processor() or platform.machine()
            ),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_fast_bf16": cpu_has_fast_bf16(),
            "threads": project.threads or default_threads,
            "reference_threads": default_threads,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "precision": "bf16 autocast" if project.amp_dtype is not None else "fp32",
            "optimisations": {
                "intra_op_threads": project.threads or default_threads,
                "channels_last": project.channels_last,
                "bf16_autocast": project.amp_dtype is not None,
                "score_bn_folded": True,
                "score_inference_mode": True,
                "compiled_paths_measured": with_compile,
            },
            "model": {
                "name": model_cfg.name,
                "base_width": model_cfg.base_width,
                "depth": model_cfg.depth,
                "disc_width": model_cfg.disc_width,
                "image_shape": list(shape),
                "batch": batch,
            },
            "flops_per_image": {
                "generator_forward": flops_g,
                "discriminator_forward": flops_d,
                "train_step": flops_train,
                "score": flops_score,
            },
            "matmul": {
                "dtype": str(mm_dtype).removeprefix("torch."),
                "flop_s": mm,
                "flop_s_median_default_threads": mm_flops / statistics.median(mm_samples["matmul"]),
                "flop_s_median_project_threads": mm_flops
                / statistics.median(mm_samples["matmul_project"]),
                "size": mm_size,
            },
            "repeats": repeats,
            "timed_batches_per_repeat": {"train": args.batches, "score": args.score_batches},
            "train": _path_figures(train_s, n_train, warmup_s, flops_train, mm),
            "score": _path_figures(score_s, len(score_imgs), score_warmup_s, flops_score, mm),
            "train_first_step_loss_max_rel_diff": loss_diff,
            "score_max_rel_diff": score_diff,
        }
    )
    return result


def _path_figures(
    seconds: dict[str, list[float]], images: int, warmup: dict[str, float], flops: int, mm: float
) -> dict[str, Any]:
    ref = seconds["reference"]
    return {
        name: {
            "img_s": images / statistics.median(s),
            "speedup": _speedup(ref, s),
            "flop_utilisation": flops * images / statistics.median(s) / mm,
            "seconds": [round(v, 4) for v in s],
            # the first call: compilation for the compiled path, oneDNN set-up for the others
            "first_call_s": round(warmup[name], 2),
        }
        for name, s in seconds.items()
    }


def _print_table(r: dict[str, Any]) -> None:
    print(
        f"{r['device_name']} ({r['device']}, {r['cpu_capability']}, {r['threads']} threads, "
        f"reference {r['reference_threads']}), "
        f"torch {r['torch']}, {r['precision']}; model {r['model']}"
    )
    print(f"matmul peak ({r['matmul']['dtype']}): {r['matmul']['flop_s'] / 1e9:.1f} GFLOP/s")
    for job in ("train", "score"):
        for name, f in r[job].items():
            print(
                f"{job:5s} {name:9s} {f['img_s']:8.2f} img/s  x{f['speedup']:.2f}  "
                f"util {f['flop_utilisation']:.1%}  first call {f['first_call_s']:.1f} s"
            )
    print(
        f"headline: train x{r['train_speedup']:.2f} ({r['train_path']}), "
        f"score x{r['score_speedup']:.2f} ({r['score_path']}), "
        f"FLOP utilisation {r['flop_utilisation']:.1%}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--quick", action="store_true", help="2 repeats; no thread-count comparison path"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also measure the torch.compile paths (minutes of compilation on CPU)",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--width", type=int, help="model.base_width (default: params.yaml)")
    parser.add_argument("--depth", type=int, help="model.depth")
    parser.add_argument("--disc-width", type=int, help="model.disc_width")
    parser.add_argument("--image-size", type=int, help="data.image_size")
    parser.add_argument("--batch", type=int, help="train.batch_size (default 64)")
    parser.add_argument("--batches", type=int, default=1, help="timed training batches per repeat")
    parser.add_argument(
        "--score-batches", type=int, default=2, help="batches per timed score_images call"
    )
    parser.add_argument("--repeats", type=int, help="timed repeats (default 3, quick 2)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed calls after the first")
    parser.add_argument(
        "--threads", type=int, help="the project's intra-op threads (default: train.threads)"
    )
    parser.add_argument("--matmul-size", type=int, help="n of the n x n peak matmul")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
