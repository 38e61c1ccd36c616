"""The saved model: one file with weights, normalisation statistics and what built it.

No pickled classes: the file holds tensors and plain containers, is loaded with
``weights_only=True``, and the networks are rebuilt from the stored model config.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from components.config import ModelConfig
from components.data.images import ImageRules, image_rules
from components.detector.checkpoints import load_state_file, save_atomic
from components.detector.evaluate import NormStats
from components.detector.networks import build_networks
from components.detector.score import AnomalyDetector, MapSettings
from components.errors import ModelFileError

MODEL_FORMAT = "nestad-model/1"
MODEL_FILE = "detector.pt"


def build_detector(
    model_cfg: ModelConfig, channels: int, image_size: int, score_weight: float,
    settings: MapSettings = MapSettings(),
    disc_image_size: int | None = None,
) -> AnomalyDetector:
    generator, discriminator = build_networks(model_cfg, channels, image_size, disc_image_size)
    return AnomalyDetector(generator, discriminator, score_weight, settings)


def save_detector(
    path: Path,
    detector: AnomalyDetector,
    model_cfg: ModelConfig,
    channels: int,
    image_size: int,
    norm: NormStats,
    threshold: str,
    provenance: dict[str, Any] | None = None,
    disc_image_size: int | None = None,
    monitoring: dict[str, Any] | None = None,
    rules: ImageRules | None = None,
) -> None:
    """Write the model file atomically; the statistics also sit in the detector's buffers.
    ``monitoring``: the drift reference of ``components.detector.drift`` (plain data).
    ``rules``: the image rules training applied (default: the config's defaults), which
    ``nestad score`` and the REST scorer apply to what they score."""
    detector.set_statistics(norm.score_min, norm.score_max, norm.threshold(threshold))
    save_atomic(
        {
            "format": MODEL_FORMAT,
            "model": model_cfg.model_dump(),
            "channels": channels,
            "image_size": image_size,
            "disc_image_size": disc_image_size or image_size,
            "score_weight": detector.weight,
            "map_settings": asdict(detector.settings),
            "threshold": threshold,
            "norm": asdict(norm),
            "state_dict": {k: v.detach().cpu() for k, v in detector.state_dict().items()},
            "provenance": provenance or {},
            "monitoring_reference": monitoring or {},
            "image_rules": asdict(rules or image_rules()),
        },
        path,
    )


def load_detector(path: Path) -> tuple[AnomalyDetector, dict[str, Any]]:
    """Rebuild the detector (eval mode, CPU) and return it with the file's metadata."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    meta = load_state_file(
        path, MODEL_FORMAT, "model", "no model file (run `nestad evaluate` first)"
    )
    try:
        detector = build_detector(
            ModelConfig(**meta["model"]), meta["channels"], meta["image_size"],
            meta["score_weight"], MapSettings(**meta.get("map_settings", {})),
            meta.get("disc_image_size"),
        )
        # Files written before maps existed lack the map statistics: they keep (0, 1).
        missing, unexpected = detector.load_state_dict(meta.pop("state_dict"), strict=False)
        if unexpected or set(missing) - set(AnomalyDetector.MAP_BUFFERS):
            raise RuntimeError(f"missing keys {missing}, unexpected keys {unexpected}")
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: incompatible model file ({exc})") from None
    meta["norm"] = NormStats(**meta["norm"])
    stored = meta.get("image_rules")  # files written before it was stored: the defaults
    try:
        meta["image_rules"] = ImageRules(**stored) if stored else image_rules()
    except TypeError as exc:
        raise ModelFileError(f"{path}: incompatible model file (image_rules: {exc})") from None
    return detector.eval(), meta
