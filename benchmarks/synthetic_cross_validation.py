"""Compare trained restoration detectors on each other's synthetic validation sets.

    .venv/bin/python benchmarks/synthetic_cross_validation.py --seed 1 \
        --model hard=RUN_A/detector.pt --model feather=RUN_B/detector.pt \
        --variant hard=train.synthetic.feather=0 --variant feather=train.synthetic.feather=2

Two generator settings make two synthetic validation sets, so each run's own
synthetic-validation figure is measured on a different yardstick. This scores every model on
every variant's set (validation normals of the seed's split plus one synthetic anomaly each,
seed ``train.synthetic.val_seed``; no test data is read) with the map settings stored in
the model file, and prints image and pixel AUROC per (model, set). The models must come
from runs with the same ``data.seed`` (the same validation split).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.config import load_params  # noqa: E402
from components.data.splits import load_splits  # noqa: E402
from components.detector.package import load_detector  # noqa: E402
from components.detector.score import score_images  # noqa: E402
from components.detector.synthetic_validation import (  # noqa: E402
    make_synthetic_validation,
    synthetic_validation_report,
)
from components.errors import NestadError  # noqa: E402
from components.runtime import resolve_runtime  # noqa: E402

SOURCE = "../shared/datasets/magnetic-tile.tar.gz"


def _pairs(values: list[str], option: str) -> dict[str, str]:
    bad = [v for v in values if "=" not in v or not v.split("=", 1)[0]]
    if bad:
        raise NestadError(f"{option} {bad[0]!r}: expected NAME=VALUE")
    return dict(v.split("=", 1) for v in values)


def main() -> None:
    try:
        _run()
    except NestadError as exc:
        sys.exit(f"error: {exc}")


def _run() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, required=True, help="data.seed of the runs")
    ap.add_argument("--model", action="append", required=True, help="NAME=path/to/detector.pt")
    ap.add_argument("--variant", action="append", required=True,
                    help="NAME=key=value[,key=value]: overrides making one synthetic set")
    args = ap.parse_args()
    base = [f"data.source={SOURCE}", "data.channels=1", f"data.seed={args.seed}"]
    runtime = resolve_runtime("cpu", "fp32", False, False, "auto")
    models = _pairs(args.model, "--model")
    for path in models.values():  # every file checked before the slow part
        if not Path(path).exists():
            raise NestadError(f"--model {path}: no such file")
    sets = {}
    for name, overrides in _pairs(args.variant, "--variant").items():
        params = load_params(ROOT / "params.yaml", profile="industrial",
                             overrides=[*base, *overrides.split(",")])
        val = load_splits(params.data, include=("val",)).val
        sets[name] = make_synthetic_validation(val.images, params.train.synthetic)
    table = []
    for model_name, path in models.items():
        detector, _ = load_detector(Path(path))
        for set_name, data in sets.items():
            scored = score_images(detector.generator, detector.discriminator, data.images,
                                  detector.weight, runtime, settings=detector.settings,
                                  with_maps=True)
            found = synthetic_validation_report(scored.score, scored.maps, data)
            table.append({"model": model_name, "synthetic_set": set_name,
                          "image_auroc": round(found.image_auroc, 4),
                          "pixel_auroc": round(found.pixel_auroc, 4),
                          "criterion": round(found.criterion, 4)})
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
