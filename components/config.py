"""The one place that reads ``params.yaml`` into typed, validated config.

Each step's component receives only its own section (``DataConfig``, ``ModelConfig``
...). Unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming
the key. CLI overrides use dotted keys: ``train.epochs=2``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where the images come from and how they are split."""

    source: str = "../shared/datasets/cifar10-jpeg.tar.gz"
    layout: Literal["classes", "industrial", "manifest"] = "classes"
    anomalous_class: str | None = "airplane"
    image_size: int = Field(32, ge=16, le=1024)
    channels: Literal[1, 3] = 3
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    seed: int = Field(0, ge=0)
    max_train_images: int | None = Field(None, ge=1)
    max_test_images: int | None = Field(None, ge=1)
    min_image_size: int = Field(8, ge=1)
    # width x height, read from the header before decoding (components.data.images):
    # above the 5-65 MP of common industrial area-scan cameras, below Pillow's bomb error
    max_image_pixels: int = Field(100_000_000, ge=1)
    decode_workers: int = Field(2, ge=1, le=64)
    # identical images in two splits or under two labels: an error (fail) or a warning (warn)
    duplicates: Literal["fail", "warn"] = "fail"

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.image_size % 16:
            raise ValueError(f"image_size={self.image_size} is not a multiple of 16")
        if self.layout == "classes" and not self.anomalous_class:
            raise ValueError("anomalous_class is required for the 'classes' layout")
        return self


class ModelConfig(_Section):
    """Which network and how wide."""

    name: Literal["nested", "ganomaly", "skip_ganomaly", "nested_restore"] = "nested"
    base_width: int = Field(32, ge=4, le=512)
    depth: int = Field(4, ge=2, le=4)
    disc_width: int = Field(64, ge=4, le=512)
    latent_dim: int = Field(100, ge=8, le=4096)
    seg_width: int = Field(8, ge=4, le=256)  # nested_restore's segmentation head
    seg_depth: int = Field(3, ge=2, le=4)


class AugmentConfig(_Section):
    """Label-preserving augmentation of normal training images; each off unless the part
    allows it (a flipped or rotated part must still be a normal part). Seeded."""

    hflip: bool = False
    vflip: bool = False
    rot90: bool = False  # random multiples of 90 degrees (square inputs only)
    shift: float = Field(0.0, ge=0.0, le=0.5)  # max translation, fraction of the side
    brightness: float = Field(0.0, ge=0.0, le=1.0)  # max additive change, in [-1, 1] units
    contrast: float = Field(0.0, ge=0.0, le=1.0)  # max relative contrast change


class SyntheticConfig(_Section):
    """Synthetic anomalies made from normal images (``nested_restore`` only; ``synthetic``)."""

    probability: float = Field(0.5, ge=0.0, le=1.0)  # share of training images corrupted
    min_area: float = Field(0.005, gt=0.0, le=1.0)  # Perlin mask area, log-uniform
    max_area: float = Field(0.5, gt=0.0, le=1.0)
    max_cells: Literal[1, 2, 4, 8, 16, 32, 64] = 8  # Perlin lattice cells per side, at most
    scratch_fraction: float = Field(0.25, ge=0.0, le=1.0)  # masks that are thin polylines
    opacity_min: float = Field(0.3, gt=0.0, le=1.0)
    opacity_max: float = Field(1.0, gt=0.0, le=1.0)
    feather: float = Field(2.0, ge=0.0, le=16.0)  # max Gaussian sigma (px) of the blend's edge
    textures: tuple[Literal["noise", "colour", "stripes", "patch", "shade"], ...] = (
        "noise", "colour", "stripes", "patch", "shade")
    val_seed: int = Field(20_240_601, ge=0)  # the validation anomalies' fixed seed

    @model_validator(mode="after")
    def _check(self) -> SyntheticConfig:
        if self.min_area > self.max_area:
            raise ValueError(f"min_area={self.min_area} > max_area={self.max_area}")
        if self.opacity_min > self.opacity_max:
            raise ValueError(f"opacity_min={self.opacity_min} > opacity_max={self.opacity_max}")
        if not self.textures:
            raise ValueError("textures must name at least one texture")
        return self


class DistributedConfig(_Section):
    """Data-parallel training (``nestad train --nproc-per-node N``): torchrun starts the
    worker processes, DistributedDataParallel trains; ``nproc_per_node: null`` is one
    process and no launcher. ``train.batch_size`` stays the global batch (each process
    takes batch_size / (nproc_per_node x nnodes) of it)."""

    nproc_per_node: int | None = Field(None, ge=1, le=1024)  # workers on this node (GPUs)
    nnodes: int = Field(1, ge=1, le=4096)
    rdzv_endpoint: str | None = Field(None, pattern=r"^[^\s:]+:[0-9]{1,5}$")  # HOST:PORT
    rdzv_id: str = Field("nestad", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    max_restarts: int = Field(0, ge=0, le=100)  # group restarts after a failure (resume)
    sync_batchnorm: bool = False  # CUDA only; default: each process normalises its shard
    timeout_s: int = Field(1800, ge=10)  # collectives (rank 0 validating, others waiting)

    @model_validator(mode="after")
    def _check(self) -> DistributedConfig:
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"nnodes={self.nnodes} needs rdzv_endpoint (HOST:PORT of the "
                             "rendezvous, the same on every node)")
        return self


class TrainConfig(_Section):
    """Optimisation, precision and checkpoint choice."""

    epochs: int = Field(15, ge=1, le=10_000)
    steps: int | None = Field(None, ge=1)  # a schedule in optimiser steps instead of epochs
    eval_every: int = Field(250, ge=1)  # steps per evaluation interval when ``steps`` is set
    lr_decay_from: float = Field(0.5, ge=0.0, le=1.0)  # steps schedule: linear decay from here
    crop: int | None = Field(None, ge=16)  # train on random crops of this side (full at test)
    batch_size: int = Field(64, ge=2, le=8192)
    lr: float = Field(2e-4, gt=0.0, le=1.0)
    beta1: float = Field(0.5, ge=0.0, lt=1.0)
    beta2: float = Field(0.999, ge=0.0, lt=1.0)
    lr_decay_start: int = Field(8, ge=0)
    w_adv: float = Field(1.0, ge=0.0)
    w_con: float = Field(20.0, ge=0.0)
    w_lat: float = Field(1.0, ge=0.0)
    w_enc: float = Field(1.0, ge=0.0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    compile: bool | Literal["auto"] = "auto"
    threads: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = "auto"
    seed: int = Field(0, ge=0)
    select_on: Literal["val_recon", "synthetic", "last"] = "val_recon"
    reinit_d_below: float = Field(1e-5, ge=0.0)
    ema: float | None = Field(None, gt=0.0, lt=1.0)  # decay of G's weight average (kept, scored)
    w_ssim: float = Field(1.0, ge=0.0)  # nested_restore: structural term of the restoration
    w_seg: float = Field(1.0, ge=0.0)  # nested_restore: focal + Dice of the segmentation head
    seg_beta1: float | None = Field(None, ge=0.0, lt=1.0)  # the head's Adam beta1; None: beta1
    augment: AugmentConfig = AugmentConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _check_crop(self) -> TrainConfig:
        if self.crop is not None and self.crop % 16:
            raise ValueError(f"crop={self.crop} is not a multiple of 16")
        dc = self.distributed
        if dc.nproc_per_node is not None and self.batch_size % (dc.nproc_per_node * dc.nnodes):
            raise ValueError(f"batch_size={self.batch_size} is the global batch; it must "
                             f"divide evenly over nproc_per_node x nnodes = "
                             f"{dc.nproc_per_node * dc.nnodes} processes")
        return self


class EvaluateConfig(_Section):
    """Scoring, normalisation and thresholds (all fitted on validation normals)."""

    score_weight: float = Field(0.9, ge=0.0, le=1.0)
    fixed_threshold: float = Field(0.2, ge=0.0, le=1.0)
    target_fpr: float = Field(0.05, gt=0.0, lt=1.0)
    threshold: Literal["fixed", "fpr"] = "fpr"
    batch_size: int = Field(256, ge=1, le=65536)
    quantiles: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99)
    plots: bool = True
    grid_images: int = Field(16, ge=0, le=256)
    # Gaussian smoothing of anomaly maps (px) and the nested_restore score's top share of the
    # map; "auto": chosen on the synthetic validation set (never on test data)
    map_sigma: Annotated[float, Field(ge=0.0, le=64.0)] | Literal["auto"] = 2.0
    map_top_k: Annotated[float, Field(gt=0.0, le=1.0)] | Literal["auto"] = 0.01
    overlay_images: int = Field(16, ge=0, le=256)  # highest-scoring test images in the grid


class IngestConfig(_Section):
    """What ``nestad ingest`` reads, where it writes and what it refuses.

    The layout, anomalous class, seed and val_fraction of the split come from ``data``.
    """

    source: str = "../shared/datasets/cifar10-jpeg.tar.gz"
    data_root: str = "data"
    name: str = Field("cifar10", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    workers: int = Field(2, ge=1, le=64)
    on_bad_image: Literal["fail", "skip"] = "fail"
    max_members: int = Field(1_000_000, ge=1)
    max_member_bytes: int = Field(256 * 2**20, ge=1)
    max_total_bytes: int = Field(64 * 2**30, ge=1)
    track: bool = True
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_workers: int = Field(16, ge=1, le=256)
    s3_max_attempts: int = Field(5, ge=1, le=20)
    s3_retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"
    s3_page_size: int = Field(1000, ge=1, le=1000)
    s3_timeout_s: float = Field(30.0, gt=0.0)


class ExpectedCounts(_Section):
    """Images per split the protocol promises; ``None`` leaves a count unchecked."""

    train_val_normal: int | None = Field(None, ge=0)
    test_normal: int | None = Field(None, ge=0)
    test_anomalous: int | None = Field(None, ge=0)


class ValidateConfig(_Section):
    """What ``nestad validate`` requires of an ingested dataset before any training."""

    report_dir: str = "reports/validation"
    labels: tuple[str, ...] | None = None
    min_size: int | None = Field(None, ge=1)
    expected_counts: ExpectedCounts = ExpectedCounts()
    verify_files: bool = True
    data_docs: bool = True
    examples: int = Field(5, ge=1, le=100)


class RegistryConfig(_Section):
    """MLflow tracking, the model registry and the promotion gate (``components.registry``).

    Tracking URI: ``tracking_uri`` when set, else ``$MLFLOW_TRACKING_URI``, else an
    embedded SQLite store ``sqlite:///<project>/mlflow.db`` (no server needed).
    """

    tracking_uri: str | None = None
    artifact_location: str | None = None  # new experiment's artefact root
    experiment: str = Field("nestad", min_length=1)
    model_name: str = Field("nestad-detector", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    gate_metric: str = Field("leak_free.auroc",
                             pattern=r"^(leak_free|paper_compatible)\.[A-Za-z0-9_.]+$")
    gate_higher_is_better: bool = True
    gate_margin: float = Field(0.0, ge=0.0)
    http_max_retries: int = Field(3, ge=0, le=10)
    http_backoff_factor: int = Field(1, ge=0, le=60)
    http_timeout_s: int = Field(30, ge=1, le=3600)
    lock_timeout_s: float = Field(60.0, gt=0.0)
    lock_ttl_s: float = Field(300.0, gt=0.0)


class ServeConfig(_Section):
    """``nestad serve``: the REST scorer (MLflow's scoring server behind nestad's limits).

    The limits also apply, with these defaults, when ``mlflow models serve`` serves the
    model (each row's image is checked before it is decoded; the body itself only by
    ``nestad serve``, before it is read)."""

    host: str = Field("127.0.0.1", min_length=1)  # loopback unless told otherwise
    port: int = Field(5000, ge=1, le=65535)
    max_image_bytes: int = Field(64 * 2**20, ge=1)  # one image file (image_b64 decoded, path)
    max_request_bytes: int = Field(256 * 2**20, ge=1)  # the HTTP body; the images' total too


class PipelineConfig(_Section):
    """What the DVC pipeline (``dvc.yaml``, ``nestad run``) and the retraining flow apply.

    ``profile`` is passed as ``--profile`` by every pipeline stage and declared by the
    stages that read profiled keys, so DVC sees both the choice and the profile's values
    (a ``--profile`` typed on a command line would be invisible to it).
    """

    profile: str | None = None
    min_new_normal_images: int = Field(1, ge=1)  # retrain when at least this many arrive
    # Flows run the stages' `nestad ...` commands in their own interpreter (DVC still
    # decides, caches and records); false: a child process per stage, as `dvc repro` does.
    in_process: bool = True


class MonitorConfig(_Section):
    """``nestad monitor``: the limits past which a batch of incoming images counts as
    drifted (exit code 3, and a retraining trigger), and where the report goes."""

    # fewer are refused: PSI's noise on like data is about (psi_bins - 1) * (1/n + 1/n_val)
    min_images: int = Field(100, ge=2)
    min_ks_pvalue: float = Field(0.01, ge=0.0, le=1.0)  # scores vs validation normals (KS)
    max_psi: float = Field(0.25, ge=0.0)  # population stability index of the scores
    psi_bins: int = Field(10, ge=2, le=100)  # quantile bins of the validation normals
    max_flagged_fraction: float = Field(0.2, ge=0.0, le=1.0)  # share at the model threshold
    max_brightness_shift: float = Field(20.0, ge=0.0, le=255.0)  # |mean shift|, grey levels
    max_contrast_change: float = Field(0.3, ge=0.0)  # |relative change of the mean contrast|
    max_size_mismatch: float = Field(0.05, ge=0.0, le=1.0)  # share of sizes never trained on
    max_channel_mismatch: float = Field(0.05, ge=0.0, le=1.0)  # share of other band counts
    report_dir: str = "reports/monitoring"
    track: bool = True  # log the figures as an MLflow run (registry.* store)


class Params(_Section):
    """All sections of params.yaml.

    ``profiles`` maps a profile name (``quick``, ``paper``) to dotted overrides that
    ``load_params(profile=...)`` applies before the CLI's own overrides.
    """

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    ingest: IngestConfig = IngestConfig()
    validation: ValidateConfig = ValidateConfig()
    registry: RegistryConfig = RegistryConfig()
    pipeline: PipelineConfig = PipelineConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_pipeline_profile(self) -> Params:
        name = self.pipeline.profile
        if name is not None and name not in self.profiles:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise ValueError(f"pipeline.profile={name!r} is not in profiles (known: {known})")
        return self


def _set_dotted(tree: dict[str, Any], key: str, value: Any, origin: str = "override") -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)  # never shared with the profile or another tree


def _parse_override(item: str, origin: str | None = None) -> tuple[str, Any]:
    """``"train.epochs=2"`` -> ``("train.epochs", 2)``; the value is read as YAML."""
    origin = origin or f"-s {item}"
    key, sep, raw = item.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"{origin}: expected KEY=VALUE, e.g. train.epochs=2")
    try:
        return key, yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        raise ConfigError(f"{origin}: {key}: value {raw!r} is not valid YAML") from None


def _describe(err: Any, origin: str) -> str:
    """One line for a pydantic error: ``origin: key: what is wrong``."""
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{origin}: {key}: {msg}"


def parse_params(tree: dict[str, Any] | None, origin: str = "params.yaml") -> Params:
    """Validate a params tree; raise ConfigError naming the first bad key."""
    try:
        return Params.model_validate(tree or {})
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0], origin)) from None


def _signature(err: Any) -> tuple[Any, ...]:
    """What identifies one validation error across trees: where, what and (for a plain
    value) the offending value; a section's own check names its values in the message."""
    value = err.get("input")
    return (tuple(err["loc"]), err["type"], err["msg"],
            None if isinstance(value, dict | list) else repr(value))


def _origin_of(err: Any, tree: dict[str, Any],
               layers: list[tuple[str, list[tuple[str, Any]]]], file_origin: str) -> str:
    """The first layer (the file, the profile, then each override in order) after which the
    error appears: where the bad value came from."""
    wanted = _signature(err)
    current = copy.deepcopy(tree)
    for origin, pairs in [(file_origin, []), *layers]:
        for key, value in pairs:
            _set_dotted(current, key, value, origin)
        try:
            Params.model_validate(current)
        except ValidationError as exc:
            if any(_signature(e) == wanted for e in exc.errors()):
                return origin
    return file_origin


Override = str | tuple[str, str]


def load_params(
    path: str | Path = "params.yaml",
    overrides: list[Override] | None = None,
    profile: str | None = None,
) -> Params:
    """Read params.yaml (missing file = all defaults), apply a profile, then ``key=value``
    overrides; later ones win. An override is ``"key=value"`` (named ``-s key=value`` in
    errors) or ``(label, "key=value")`` (named ``label``, e.g. a CLI option).

    A bad value is named with where it came from: ``params.yaml: train.lr: ...``,
    ``profile quick (params.yaml): train.lr: ...`` or ``-s train.lr=-1: train.lr: ...``.
    """
    path = Path(path)
    tree: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        tree = loaded or {}
    layers: list[tuple[str, list[tuple[str, Any]]]] = []
    if profile:
        profiles = tree.get("profiles") or {}
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(f"{path}: profiles.{profile}: unknown profile (known: {known})")
        if not isinstance(profiles[profile], dict):
            raise ConfigError(f"{path}: profiles.{profile}: must be a mapping of dotted keys")
        layers.append((f"profile {profile} ({path})", list(profiles[profile].items())))
    for item in overrides or []:
        label, text = item if isinstance(item, tuple) else (f"-s {item}", item)
        layers.append((label, [_parse_override(text, label)]))
    full = copy.deepcopy(tree)
    for origin, pairs in layers:
        for key, value in pairs:
            _set_dotted(full, key, value, origin)
    try:
        return Params.model_validate(full)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(_describe(err, _origin_of(err, tree, layers, str(path)))) from None


def project_path(root: Path, value: str | Path) -> Path:
    """A path from params.yaml: ``~`` expanded, a relative one read from the project root
    (the folder holding params.yaml)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(root) / path


def flatten_params(params: Params) -> dict[str, Any]:
    """``{"train.epochs": 15, ...}`` for trackers and lineage."""
    flat: dict[str, Any] = {}
    for section, values in params.model_dump(exclude={"profiles"}).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


_PROFILE_LINE = re.compile(r"^(?P<indent>[ \t]+)profile:[ \t]*(?P<value>[^#\r\n]*?)"
                           r"(?P<rest>[ \t]*(?:#[^\r\n]*)?\r?\n?)$")


def set_pipeline_profile(path: str | Path, profile: str) -> bool:
    """Set ``pipeline.profile`` in params.yaml in place, comments kept (as ``dvc exp run
    -S`` edits params); True when the file changed. The new file is validated first."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines(keepends=True)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    section, found = None, None
    for i, line in enumerate(lines):
        if line.strip() and not line[0].isspace() and not line.startswith("#"):
            section = line.split(":", 1)[0].strip()  # a top-level key
        elif section == "pipeline" and (match := _PROFILE_LINE.match(line)):
            found = i
            lines[i] = f"{match['indent']}profile: {profile}{match['rest']}"
            break
    if found is None:
        raise ConfigError(f"{path}: no pipeline.profile entry to set; add a 'pipeline:' "
                          "section with a 'profile:' line")
    text = "".join(lines)
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: profile {profile!r} would make invalid YAML ({exc})") from None
    if parse_params(tree, origin=str(path)).pipeline.profile != profile:
        raise ConfigError(f"{path}: could not set pipeline.profile to {profile!r}")
    if text == path.read_text():
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True
