"""Benchmark: parallel batch scoring, images/s with 1 and with 2 Dask workers on the same
folder, in one run (``nestad score --workers N``'s flow, a local threaded Dask cluster).

    .venv/bin/python benchmarks/batch_scoring.py                 # human-readable
    .venv/bin/python benchmarks/batch_scoring.py --json          # one JSON object

The model is the default nested detector (params.yaml's model section, untrained: speed
does not depend on the weights) at ``--size`` px; the folder holds ``--images`` synthetic
PNGs. Each worker count is timed twice after one warm-up run (the embedded Prefect server
start and the first model load are paid there); ``images_per_s`` is the faster run:
listing, reading, decoding, scoring and writing the CSV. The threads of torch are split
between the workers (cores // workers each), so 1 worker uses every core too: the ratio
measures what the flow's chunk parallelism adds over one worker's intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _model(folder: Path, size: int) -> Path:
    import torch

    from components.config import load_params
    from components.detector.evaluate import NormStats
    from components.detector.package import build_detector, save_detector

    params = load_params(ROOT / "params.yaml")
    torch.manual_seed(0)
    detector = build_detector(params.model, 3, size, params.evaluate.score_weight)
    path = folder / "detector.pt"
    save_detector(path, detector, params.model, 3, size,
                  NormStats(0.0, 1.0, {}, 1, 0.2, 0.5, 0.05), "fixed")
    return path


def _images(folder: Path, count: int, size: int) -> Path:
    from synthetic_support import synthetic_image

    images = folder / "images"
    images.mkdir()
    for i in range(count):
        pattern = ("gradient", "blob", "stripes")[i % 3]
        synthetic_image(pattern, i, size=size).save(images / f"{i:05d}.png")
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nestad-batch-"))
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    from flows.scoring import score_in_parallel

    model, folder = _model(tmp, args.size), _images(tmp, args.images, args.size)
    score_in_parallel([str(folder)], model, tmp / "warmup.csv", workers=1,
                      chunk_size=args.chunk_size)
    result: dict = {"images": args.images, "size": args.size, "chunk_size": args.chunk_size,
                    "cores": os.cpu_count(), "runs": {}}
    for workers in (1, 2):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            report = score_in_parallel([str(folder)], model, tmp / f"w{workers}.csv",
                                       workers=workers, chunk_size=args.chunk_size)
            times.append(time.perf_counter() - start)
            assert report.failed == 0 and len(report.rows) == args.images
        result["runs"][workers] = {"seconds": times,
                                   "images_per_s": args.images / min(times)}
    one, two = (result["runs"][w]["images_per_s"] for w in (1, 2))
    result["ratio_2_over_1"] = two / one
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.images} images of {args.size} px, chunks of {args.chunk_size}, "
          f"{os.cpu_count()} cores")
    for workers, run in result["runs"].items():
        print(f"  {workers} worker(s): {run['images_per_s']:8.1f} images/s  "
              f"(runs: {', '.join(f'{t:.2f} s' for t in run['seconds'])})")
    print(f"  2 workers / 1 worker: {result['ratio_2_over_1']:.2f}x")


if __name__ == "__main__":
    main()
