"""Benchmark: ingest and validate the full CIFAR-10 copy into a temporary folder.

    .venv/bin/python benchmarks/ingest.py            # human-readable
    .venv/bin/python benchmarks/ingest.py --json     # one JSON object

Uses params.yaml (ingest, validation and data sections) with the dataset written to a
temporary folder. The time covers everything a user waits for: reading the archive,
hashing, decoding and storing every image, the manifest, and the full validation
(re-hashing every stored file, the Great Expectations suite including its import, and
Data Docs).
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
sys.path.insert(0, str(ROOT))

from components.config import load_params  # noqa: E402
from components.data.ingest import ingest  # noqa: E402
from components.data.validate import validate_dataset  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="dataset source [default: params ingest.source]")
    parser.add_argument("--workers", type=int, help="decode processes [default: params]")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    params = load_params(ROOT / "params.yaml")
    cfg = params.ingest
    if args.workers:
        cfg = cfg.model_copy(update={"workers": args.workers})
    source = args.source or params.ingest.source
    if not source.startswith("s3://") and not Path(source).is_absolute():
        source = str(ROOT / source)

    with tempfile.TemporaryDirectory(prefix="nestad-bench-") as tmp:
        started = time.perf_counter()
        cpu_started = os.times()
        ingested = ingest(source, cfg, params.data, target=Path(tmp) / "data" / cfg.name)
        ingest_s = time.perf_counter() - started
        validated = validate_dataset(
            ingested.dataset,
            params.validation,
            params.data,
            report_dir=Path(tmp) / "reports",
            workers=cfg.workers,
        )
        seconds = time.perf_counter() - started
        cpu = os.times()
    cpu_s = sum(cpu[:4]) - sum(cpu_started[:4])  # user + system, this process and children
    result = {
        "images": ingested.seen,
        "stored": sum(ingested.totals.values()),
        "seconds": round(seconds, 2),
        "images_per_s": round(ingested.seen / seconds, 1),
        "ingest_seconds": round(ingest_s, 2),
        "validate_seconds": round(seconds - ingest_s, 2),
        "cpu_seconds": round(cpu_s, 2),
        "validation_passed": validated.success,
        "splits": ingested.totals,
        "workers": cfg.workers,
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['images']:,} images ingested + validated in {seconds:.1f} s "
            f"({result['images_per_s']:,.0f} images/s): ingest {ingest_s:.1f} s, "
            f"validate {seconds - ingest_s:.1f} s; CPU {cpu_s:.1f} s on {result['cpus']} "
            f"cores (load average {result['load_average_1m']})"
        )
        print(f"splits {ingested.totals}; validation {'passed' if validated.success else 'FAILED'}")
        for outcome in validated.failures:
            print(f"  {outcome.describe()}")
    return 0 if validated.success else 1


if __name__ == "__main__":
    sys.exit(main())
