"""Benchmark: CPU scoring img/s of the exported graphs against the PyTorch path, in one run.

    .venv/bin/python benchmarks/export_throughput.py --json
    .venv/bin/python benchmarks/export_throughput.py --model outputs --images 512
    .venv/bin/python benchmarks/export_throughput.py --name nested_restore --width 8 --quick

One detector (``--model``: a run folder or detector.pt; default: an untrained one built from
params.yaml's ``model`` section with ``--width`` / ``--image-size`` overrides) is exported to
ONNX and OpenVINO in a temporary folder (each export verified against PyTorch, as
``nestad export`` does), then these paths score the same uint8 images, scores and maps, in
batches of ``--batch``:

- ``torch_reference``: ``AnomalyDetector.score_with_maps``, fp32 eager, contiguous;
- ``torch_project``: ``score_images`` as ``nestad evaluate`` runs it on this CPU (BN folded,
  channels_last, inference_mode, the project's precision), with maps;
- ``onnx``: onnxruntime, CPU execution provider, fp32;
- ``openvino``: OpenVINO CPU, fp32 weights and ``INFERENCE_PRECISION_HINT=f32``.

Every backend runs at the same intra-op thread count (``--threads``, default PyTorch's).
The paths take turns within every repeat, so load from other processes hits them alike;
img/s are medians over repeats, speedups medians of per-repeat ratios to
``torch_reference``. FLOP utilisation = FLOPs per image (``FlopCounterMode`` over the
export graph's forward, batch 1: convolutions and matmuls) x img/s / peak fp32 FLOP/s, the
best of 1024^3 matmul samples timed in turn with the paths.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from components.data.images import to_model_input  # noqa: E402
from components.detector.evaluate import NormStats  # noqa: E402
from components.detector.package import build_detector, load_detector  # noqa: E402
from components.detector.score import score_images  # noqa: E402
from components.export.equivalence import synthetic_check_images  # noqa: E402
from components.export.exporter import export_detector  # noqa: E402
from components.export.graph import ExportGraph  # noqa: E402
from components.export.onnx import onnx_runner  # noqa: E402
from components.export.openvino import openvino_runner  # noqa: E402
from components.runtime import resolve_runtime  # noqa: E402


def _detector(args: argparse.Namespace):
    """(detector, model-file metadata) from --model, or an untrained one."""
    if args.model:
        path = Path(args.model)
        path = path / "model" if (path / "model" / "detector.pt").is_file() else path
        return load_detector(path)
    from components.config import load_params

    params = load_params(ROOT / "params.yaml")
    update = {"name": args.name or params.model.name}
    if args.width:
        update["base_width"] = args.width
    model_cfg = params.model.model_copy(update=update)
    size, channels = args.image_size or params.data.image_size, params.data.channels
    torch.manual_seed(0)
    detector = build_detector(model_cfg, channels, size, params.evaluate.score_weight)
    norm = NormStats(0.0, 1.0, {}, 0, 0.2, 0.5, 0.05)
    detector.set_statistics(norm.score_min, norm.score_max, norm.threshold_fixed)
    meta = {"model": model_cfg.model_dump(), "image_size": size, "channels": channels,
            "threshold": "fixed", "norm": norm, "map_settings": {}}
    return detector.eval(), meta


def flops_per_image(detector, size: int, channels: int) -> int:
    graph = ExportGraph(detector)
    x = torch.zeros((1, size, size, channels), dtype=torch.uint8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        graph(x)
    return counter.get_total_flops()


def _timed(job: Callable[[], None]) -> float:
    start = time.perf_counter()
    job()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="run folder or detector.pt (default: untrained)")
    ap.add_argument("--name", help="model.name of the untrained detector")
    ap.add_argument("--width", type=int, help="model.base_width of the untrained detector")
    ap.add_argument("--image-size", type=int, help="data.image_size of the untrained one")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="2 repeats of 128 images")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.images = 2, 128
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    detector, meta = _detector(args)
    size, channels = meta["image_size"], meta["channels"]
    images = synthetic_check_images(size, channels, args.images, seed=1)  # (N, C, H, W)
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    runtime = resolve_runtime("cpu", "auto", True, False, threads)

    with tempfile.TemporaryDirectory(prefix="nestad-bench-") as tmp:
        export_s, checks = {}, {}
        for backend in ("onnx", "openvino"):
            start = time.perf_counter()
            result = export_detector(detector, meta, backend, Path(tmp) / backend,
                                     images[:32], "32 seeded synthetic images")
            export_s[backend] = time.perf_counter() - start
            checks[backend] = result.report.max_abs
        ort = onnx_runner(Path(tmp) / "onnx" / "model.onnx", threads)
        ov = openvino_runner(Path(tmp) / "openvino" / "model.xml", threads)

        def batches(run: Callable[[np.ndarray], object]) -> Callable[[], None]:
            return lambda: [run(nhwc[s : s + args.batch]) for s in range(0, len(nhwc),
                                                                            args.batch)]

        @torch.no_grad()
        def reference() -> None:
            for s in range(0, len(images), args.batch):
                detector.score_with_maps(to_model_input(images[s : s + args.batch]))

        def project() -> None:
            score_images(detector.generator, detector.discriminator, images, detector.weight,
                         runtime, args.batch, detector.settings, with_maps=True)

        paths = {"torch_reference": reference, "torch_project": project,
                 "onnx": batches(ort), "openvino": batches(ov)}
        a = torch.randn(1024, 1024)
        b = torch.randn(1024, 1024)

        def matmul() -> None:
            for _ in range(8):
                a @ b

        first = {name: _timed(job) for name, job in paths.items()}  # warm-up, excluded
        matmul()
        samples: dict[str, list[float]] = {name: [] for name in paths}
        mm: list[float] = []
        for _ in range(args.repeats):
            for name, job in paths.items():
                samples[name].append(_timed(job))
            mm.append(_timed(matmul))
    peak = 8 * 2 * 1024**3 / min(mm)
    flops = flops_per_image(detector, size, channels)
    img_s = {n: len(images) / statistics.median(t) for n, t in samples.items()}
    ref = samples["torch_reference"]
    result = {
        "model": meta["model"]["name"], "base_width": meta["model"]["base_width"],
        "image_size": size, "channels": channels, "images": len(images), "batch": args.batch,
        "repeats": args.repeats, "threads": threads, "precision_project": (
            "bf16" if runtime.amp_dtype else "fp32"),
        "cpu": platform.processor() or platform.machine(),
        "img_s": img_s,
        "speedup_vs_torch_reference": {
            n: statistics.median(r / o for r, o in zip(ref, t, strict=True))
            for n, t in samples.items()},
        "flops_per_image": flops,
        "peak_matmul_fp32_flop_s": peak,
        "flop_utilisation": {n: flops * v / peak for n, v in img_s.items()},
        "first_call_s": first, "export_s": export_s, "equivalence_max_abs": checks,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']} width {result['base_width']}, {size} px x {channels}, "
          f"{len(images)} images, batch {args.batch}, {threads} threads, "
          f"{flops / 1e6:.1f} MFLOP/image, peak fp32 matmul {peak / 1e9:.1f} GFLOP/s")
    for name in paths:
        speedup = result["speedup_vs_torch_reference"][name]
        print(f"  {name:16s} {img_s[name]:8.1f} img/s  x{speedup:.2f}"
              f"  FLOP utilisation {result['flop_utilisation'][name]:.1%}")


if __name__ == "__main__":
    main()
