"""Adversarial training of a generator/discriminator pair on normal images only.

Per batch, as in the GANomaly / Skip-GANomaly reference code: update G, then D.
  G loss = w_adv * BCE(D(G(x)), real) + w_con * smoothL1(G(x), x)
         + w_lat * smoothL1(f(G(x)), f(x)) [+ w_enc * MSE(z, z_hat) for GANomaly]
  D loss = (BCE(D(x), real) + BCE(D(G(x)), fake)) / 2
Adam with lambda decay: the learning rate falls linearly to 0 from ``lr_decay_start``.

``nested_restore`` (``restore``): G sees x~ = x with a synthetic anomaly (``synthetic``)
and must output x; the segmentation head predicts the anomaly's mask from [x~, G(x~)].
  G loss += w_ssim * (1 - SSIM(G(x~), x)) + w_seg * (focal + Dice)(S, mask)
D still judges G(x~) against real normals. The checkpoint is chosen on the synthetic
validation set (``select_on: synthetic``, ``synthetic_validation``).

Schedules: ``epochs`` passes over the data, or ``steps`` optimiser steps (small datasets
need many more updates than 15 epochs give); then an "epoch" for the callbacks,
checkpoints and the validation choice is an interval of ``eval_every`` steps, and the
learning rate decays per step, linearly to 0 from ``lr_decay_from`` of the steps.
``crop`` trains on random crops (the networks are fully convolutional; D is built for the
crop); ``augment`` applies the configured label-preserving transforms.

Weight average: with ``ema`` set, an exponential moving average of G's weights
(``weight_average``) is what is validated, kept in ``best.pt`` and scored; the raw weights
train on, and ``last.pt`` holds both, so a resumed run continues the same average.

D collapse: when D's loss falls below ``reinit_d_below`` it has won outright and gives G
no signal, so D is re-initialised (the reference code's rule) and the event counted.

Checkpoints: ``last.pt`` after every epoch (weights, optimisers, schedulers, RNG states,
history), written atomically; ``best.pt`` holds the weights chosen on validation normals
(lowest mean reconstruction error R), never on test data. Both load with
``weights_only=True``. A resumed run on CPU reaches the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.config import ModelConfig, TrainConfig
from components.data.splits import ImageSet
from components.detector.augment import augment_batch, random_crop
from components.detector.checkpoints import CHECKPOINT_FORMAT, load_checkpoint, save_atomic
from components.detector.distributed import (
    DistContext,
    barrier,
    broadcast_module,
    broadcast_object,
    gather_objects,
    local_batch,
    mean_over_ranks,
    prepare_module,
    shard,
    wrap_ddp,
)
from components.detector.losses import dice_loss, focal_loss, ssim
from components.detector.model import init_weights
from components.detector.networks import build_networks
from components.detector.optimiser_groups import generator_param_groups
from components.detector.precise_bn import recompute_batchnorm
from components.detector.restore import NestedRestoreGenerator
from components.detector.score import MapSettings, score_images
from components.detector.synthetic import synthesize_anomalies
from components.detector.synthetic_validation import (
    make_synthetic_validation,
    synthetic_validation_report,
)
from components.detector.weight_average import WeightAverage
from components.errors import ModelFileError, TrainingError
from components.runtime import (
    COMPILE_MIN_TRAIN_STEPS,
    Runtime,
    compile_pays_off,
    intra_op_threads,
    resolve_runtime,
)

# seed offsets of a rank's own random streams (rank 0's are the single-process streams)
RANK_STREAM_STRIDE = 1_000_003
EPOCH_STREAM_STRIDE = 7_919


@dataclass
class EpochReport:
    """What one epoch did; passed to ``on_epoch`` and kept in the checkpoint history."""

    epoch: int  # 1-based
    loss_d: float
    loss_g: float
    loss_adv: float
    loss_con: float
    loss_lat: float
    loss_enc: float
    lr: float
    d_reinits: int
    val_recon: float  # mean R on validation normals: the checkpoint criterion
    val_score: float  # mean A on validation normals
    seconds: float
    images_per_s: float
    loss_ssim: float = 0.0  # nested_restore only
    loss_seg: float = 0.0  # nested_restore only
    val_synthetic_auroc: float | None = None  # image AUROC on the synthetic validation set
    val_synthetic_pixel_auroc: float | None = None
    steps: int = 0  # optimiser steps so far


@dataclass
class BatchStats:
    epoch: int
    batch: int
    batches: int
    loss_d: float
    loss_g: float


@dataclass
class TrainResult:
    """The kept (validation-chosen) networks and how training went."""

    generator: nn.Module
    discriminator: nn.Module
    best_epoch: int
    history: list[EpochReport]
    runtime: Runtime
    checkpoint_dir: Path
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def lr_factor(epoch: int, epochs: int, decay_start: int) -> float:
    """Lambda decay: 1 until ``decay_start``, then linearly towards 0 at ``epochs``."""
    if epoch < decay_start:
        return 1.0
    return 1.0 - (epoch - decay_start) / float(max(1, epochs - decay_start + 1))


class GanTrainer:
    """Holds the networks, optimisers and the training step; ``fit`` drives it.

    ``compile`` runs G and D through ``torch.compile`` inside ``step`` (same math, fused
    kernels); by default only when ``runtime.compile`` is True. ``generator`` and
    ``discriminator`` stay the plain modules, so checkpoints are unchanged.

    ``dist`` (a data-parallel run, ``distributed``): G and D train under
    DistributedDataParallel on this process's share of each batch, the losses are averaged
    over processes, and this rank draws its own synthetic-anomaly and augmentation streams
    (rank 0's are the single-process ones).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        cfg: TrainConfig,
        runtime: Runtime,
        compile: bool | None = None,
        dist: DistContext | None = None,
    ) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.dist = dist
        fmt = runtime.memory_format
        if dist is not None:
            generator, discriminator = prepare_module(generator, dist), prepare_module(
                discriminator, dist)
        self.generator = generator.to(runtime.device, memory_format=fmt)
        self.discriminator = discriminator.to(runtime.device, memory_format=fmt)
        if compile is None:
            compile = runtime.compile is True
        # The compiled wrappers share the modules' parameters; dynamic=False: every
        # training batch has the same shape (fit drops the ragged one).
        g_run, d_run = self.generator, self.discriminator
        if dist is not None:
            g_run = wrap_ddp(self.generator, runtime.device, dist)
            d_run = wrap_ddp(self.discriminator, runtime.device, dist)
        self._g: nn.Module = torch.compile(g_run, dynamic=False) if compile else g_run
        self._d: nn.Module = torch.compile(d_run, dynamic=False) if compile else d_run
        # G's update reads D without updating it. Under DDP it reads the plain module: D's
        # gradients are not wanted there (only its input's), and a DDP forward would wait
        # for them.
        self._d_frozen: nn.Module = self._d
        if dist is not None:
            self._d_frozen = (torch.compile(self.discriminator, dynamic=False) if compile
                              else self.discriminator)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(generator_param_groups(self.generator, cfg), lr=cfg.lr,
                                      betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr, betas=betas)

        def factor(epoch: int) -> float:
            return lr_factor(epoch, cfg.epochs, cfg.lr_decay_start)

        if cfg.steps is not None:  # decay per optimiser step, from lr_decay_from of them

            def factor(step: int) -> float:
                start = cfg.lr_decay_from * cfg.steps
                if step < start:
                    return 1.0
                return max(0.0, 1.0 - (step - start) / (cfg.steps - start + 1))

        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, factor)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, factor)
        self.d_reinits = 0
        self.restores = isinstance(generator, NestedRestoreGenerator)
        self.average = WeightAverage(self.generator, cfg.ema) if cfg.ema else None
        self.synthetic_rng = torch.Generator()
        self.augment_rng = torch.Generator()
        self.seed_streams(0 if dist is None else dist.rank)

    def seed_streams(self, rank: int, epoch: int = 0) -> None:
        """Seed the synthetic-anomaly and augmentation streams of ``rank`` (rank 0, epoch 0:
        the single-process streams; ``epoch``: a fresh start for a rank resumed without
        its own saved streams)."""
        base = self.cfg.seed + RANK_STREAM_STRIDE * rank + EPOCH_STREAM_STRIDE * epoch
        self.synthetic_rng.manual_seed(base + 1)
        self.augment_rng.manual_seed(base + 2)

    def rng_streams(self) -> dict[str, Tensor]:
        """This process's own random streams (what differs between ranks)."""
        return {"synthetic": self.synthetic_rng.get_state(),
                "augment": self.augment_rng.get_state()}

    def step(self, x: Tensor) -> dict[str, Tensor]:
        """One G update then one D update on a float batch ``x`` (B, C, H, W) in [-1, 1]."""
        with intra_op_threads(self.runtime.threads):
            return self._step(x)

    def _step(self, x: Tensor) -> dict[str, Tensor]:
        cfg, g, d, d_frozen = self.cfg, self._g, self._d, self._d_frozen
        # --- generator: D's parameters need no gradient here, only its input does.
        # f(x) is computed again, with gradients, in the D update below; one shared pass
        # would save ~1% of the step's FLOPs but change how often BN's running
        # statistics are updated, so the two passes stay.
        d.requires_grad_(False)
        mask = None
        x_in = x
        if self.restores:  # restoration: G sees x~ and must give back x
            x_in, mask = synthesize_anomalies(x, cfg.synthetic, self.synthetic_rng)
            x_in = x_in.contiguous(memory_format=self.runtime.memory_format)
        with self.runtime.autocast():
            out = g(x_in)
            fake = out.image  # (B, C, H, W)
            logit_fake, feat_fake = d_frozen(fake)  # (B,), (B, F, 4, 4)
            with torch.no_grad():
                _, feat_real = d_frozen(x)
        loss_adv = F.binary_cross_entropy_with_logits(
            logit_fake.float(), torch.ones_like(logit_fake.float())
        )
        loss_con = F.smooth_l1_loss(fake.float(), x.float())
        loss_lat = F.smooth_l1_loss(feat_fake.float(), feat_real.float())
        loss_enc = (
            F.mse_loss(out.latent_out.float(), out.latent_in.float())
            if out.latent_in is not None
            else torch.zeros((), device=x.device)
        )
        loss_g = (
            cfg.w_adv * loss_adv
            + cfg.w_con * loss_con
            + cfg.w_lat * loss_lat
            + cfg.w_enc * loss_enc
        )
        extra: dict[str, Tensor] = {}
        if mask is not None and out.map_logits is not None:
            logits = out.map_logits.float()
            extra["loss_ssim"] = 1.0 - ssim(fake.float(), x.float())
            extra["loss_seg"] = focal_loss(logits, mask) + dice_loss(logits, mask)
            loss_g = loss_g + cfg.w_ssim * extra["loss_ssim"] + cfg.w_seg * extra["loss_seg"]
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        if self.average is not None:
            self.average.update(self.generator)
        d.requires_grad_(True)
        # --- discriminator: real vs the (detached) reconstruction.
        with self.runtime.autocast():
            logit_real, _ = d(x)
            logit_fake, _ = d(fake.detach())
        loss_d = 0.5 * (
            F.binary_cross_entropy_with_logits(
                logit_real.float(), torch.ones_like(logit_real.float())
            )
            + F.binary_cross_entropy_with_logits(
                logit_fake.float(), torch.zeros_like(logit_fake.float())
            )
        )
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        losses = mean_over_ranks({  # the global batch's losses: every rank decides alike
            "loss_g": loss_g.detach(),
            "loss_d": loss_d.detach(),
            "loss_adv": loss_adv.detach(),
            "loss_con": loss_con.detach(),
            "loss_lat": loss_lat.detach(),
            "loss_enc": loss_enc.detach(),
            **{k: v.detach() for k, v in extra.items()},
        }, self.dist)
        if losses["loss_d"].item() < cfg.reinit_d_below:
            init_weights(self.discriminator)
            broadcast_module(self.discriminator, self.dist)
            self.d_reinits += 1
        return losses

    @property
    def kept_generator(self) -> nn.Module:
        """The G that is validated, kept and scored: the weight average when there is one."""
        return self.average.net if self.average is not None else self.generator

    # --- checkpoints -------------------------------------------------------------------

    def state(
        self,
        epoch: int,
        shuffle_rng: torch.Generator,
        history: list[EpochReport],
        best: dict[str, Any],
    ) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "rng_shuffle": shuffle_rng.get_state(),
            "rng_synthetic": self.synthetic_rng.get_state(),
            "rng_augment": self.augment_rng.get_state(),
            "d_reinits": self.d_reinits,
            "history": [asdict(h) for h in history],
            "best": best,
            **({"generator_average": self.average.state_dict()} if self.average else {}),
        }

    def load_state(self, state: dict[str, Any], shuffle_rng: torch.Generator) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        torch.set_rng_state(state["rng_torch"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        shuffle_rng.set_state(state["rng_shuffle"])
        if "rng_synthetic" in state:  # checkpoints written before restoration training
            self.synthetic_rng.set_state(state["rng_synthetic"])
            self.augment_rng.set_state(state["rng_augment"])
        self.d_reinits = state["d_reinits"]
        if self.average is not None:  # KeyError: a run without the average (a config change)
            self.average.load_state_dict(state["generator_average"])


def _restore_rank_streams(trainer: GanTrainer, state: dict[str, Any],
                          dist: DistContext) -> None:
    """After ``load_state`` (rank 0's streams): this rank's own saved streams when the
    checkpoint came from a run of the same world size; else rank 0 keeps the saved ones and
    the others start fresh streams (the run goes on, but will not match an uninterrupted
    one)."""
    saved = state.get("rng_ranks")
    if saved is not None and state.get("world_size") == dist.world_size:
        trainer.synthetic_rng.set_state(saved[dist.rank]["synthetic"])
        trainer.augment_rng.set_state(saved[dist.rank]["augment"])
    elif dist.rank > 0:
        trainer.seed_streams(dist.rank, epoch=state["epoch"])


def fit(
    train: ImageSet,
    val: ImageSet,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    checkpoint_dir: Path,
    score_weight: float = 0.9,
    resume: bool = False,
    on_epoch: Callable[[EpochReport], None] | None = None,
    on_batch: Callable[[BatchStats], None] | None = None,
    stop_after: int | None = None,
    inspect_epoch: Callable[[int, nn.Module, nn.Module], None] | None = None,
    map_settings: MapSettings = MapSettings(),
    dist: DistContext | None = None,
) -> TrainResult:
    """Train on ``train`` (normal images only), choose the kept epoch on ``val``.

    ``dist``: one process of a data-parallel run (``distributed``; every process calls
    ``fit`` with the same data and config). ``cfg.batch_size`` stays the global batch, the
    steps are the single-process run's; rank 0 alone validates, writes the checkpoints and
    calls ``on_epoch``/``on_batch``/``inspect_epoch``. The other ranks return their final
    networks, ``best_epoch`` 0 and no history.

    ``inspect_epoch(epoch, G, D)`` lets a benchmark look at each epoch's networks (e.g. to
    measure the reference code's best-epoch-on-test protocol); nothing it does feeds back
    into training or the checkpoint choice, and the networks' modes are restored after it.

    ``stop_after`` ends the run after that many epochs, as an interruption would (tests).
    Raises TrainingError on a non-finite loss; the last good checkpoint is kept.
    """
    if train.is_anomaly.any() or val.is_anomaly.any():
        raise TrainingError("train and val must hold normal images only")
    if len(train) < 2:
        raise TrainingError(f"need at least 2 training images, got {len(train)}")
    runtime = resolve_runtime(
        cfg.device, cfg.precision, cfg.channels_last, cfg.compile, cfg.threads
    )
    torch.manual_seed(cfg.seed)
    _, channels, height, _ = train.images.shape
    crop = cfg.crop if cfg.crop is not None and cfg.crop < height else None
    generator, discriminator = build_networks(model_cfg, channels, crop or height)
    main = dist is None or dist.is_main
    batch = min(cfg.batch_size, len(train))
    if dist is not None:
        local_batch(cfg.batch_size, dist)  # refuses a batch that does not divide evenly
        batch -= batch % dist.world_size  # fewer images than one batch: whole shares
        local_batch(batch, dist)
    if cfg.steps is not None:  # intervals of eval_every steps stand for epochs
        epochs = math.ceil(cfg.steps / cfg.eval_every)
        steps = cfg.steps
    else:
        epochs = cfg.epochs
        steps = (len(train) // batch) * cfg.epochs
    synthetic_val = None
    if cfg.select_on == "synthetic":
        if not isinstance(generator, NestedRestoreGenerator):
            raise TrainingError(f"train.select_on=synthetic needs model.name=nested_restore, "
                                f"not {model_cfg.name!r} (its score is not a map)")
        if main:
            synthetic_val = make_synthetic_validation(val.images, cfg.synthetic)
    compiled = compile_pays_off(cfg.compile, runtime.device.type, steps, COMPILE_MIN_TRAIN_STEPS)
    trainer = GanTrainer(generator, discriminator, cfg, runtime, compile=compiled, dist=dist)
    shuffle_rng = torch.Generator().manual_seed(cfg.seed)
    history: list[EpochReport] = []
    best: dict[str, Any] = {"epoch": 0, "val_recon": math.inf, "criterion": -math.inf}
    start_epoch = 0
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    state = None
    if resume and main and last_path.is_file():
        state = load_checkpoint(last_path)
    state = broadcast_object(state, dist)  # rank 0 reads; every rank resumes from it
    if state is not None:
        try:
            trainer.load_state(state, shuffle_rng)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ModelFileError(f"{last_path}: does not match this model config ({exc})") from None
        if dist is not None:
            _restore_rank_streams(trainer, state, dist)
        history = [EpochReport(**h) for h in state["history"]]
        best = state["best"]
        start_epoch = state["epoch"]
    resumed_from = start_epoch

    for epoch in range(start_epoch, epochs):
        if stop_after is not None and epoch - resumed_from >= stop_after:
            break
        trainer.generator.train()
        trainer.discriminator.train()
        if cfg.steps is not None:
            batches = min(cfg.eval_every, cfg.steps - epoch * cfg.eval_every)
            # whole shuffled passes, as many as this interval needs
            passes = math.ceil(batches * batch / len(train))
            order = torch.cat([torch.randperm(len(train), generator=shuffle_rng)
                               for _ in range(passes)])
        else:
            batches = len(train) // batch  # drop the ragged last batch: BN needs > 1 sample
            order = torch.randperm(len(train), generator=shuffle_rng)
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        for b in range(batches):
            idx = shard(order[b * batch : (b + 1) * batch], dist)  # this process's share
            images = train.images[idx]
            if crop is not None:
                images = random_crop(images, crop, trainer.augment_rng)
            x = runtime.prepare(images)
            if cfg.augment != type(cfg.augment)():  # something switched on
                x = augment_batch(x, cfg.augment, trainer.augment_rng).contiguous(
                    memory_format=runtime.memory_format)
            losses = trainer.step(x)
            if cfg.steps is not None:
                trainer.sched_g.step()
                trainer.sched_d.step()
            values = {k: v.item() for k, v in losses.items()}
            if not all(math.isfinite(v) for v in values.values()):
                raise TrainingError(
                    f"non-finite loss at epoch {epoch + 1}, batch {b + 1} ({values}); the "
                    f"last good checkpoint is kept at {last_path}"
                )
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            if on_batch and main:
                on_batch(BatchStats(epoch + 1, b + 1, batches, values["loss_d"], values["loss_g"]))
        seconds = time.perf_counter() - t0
        lr = trainer.opt_g.param_groups[0]["lr"]
        if cfg.steps is None:
            trainer.sched_g.step()
            trainer.sched_d.step()
        sync_bn = dist is not None and dist.sync_batchnorm
        kept = trainer.kept_generator  # validated and kept: the weight average, if any
        if trainer.restores and (main or sync_bn):  # BN statistics of these weights
            recompute_batchnorm(kept, train.images, cfg, runtime, seed=epoch,
                                dist=dist if sync_bn else None)
        streams = gather_objects(trainer.rng_streams(), dist) if dist is not None else None
        if not main:  # rank 0 validates and writes; wait for its checkpoint
            barrier(dist)
            continue
        # the map settings only change the restoration detector's score
        by_map = {"settings": map_settings} if trainer.restores else {}
        val_scores = score_images(
            kept, trainer.discriminator, val.images, score_weight, runtime, **by_map
        )
        synthetic = {}
        if synthetic_val is not None:
            scored = score_images(kept, trainer.discriminator,
                                  synthetic_val.images, score_weight, runtime,
                                  settings=map_settings, with_maps=True)
            found = synthetic_validation_report(scored.score, scored.maps, synthetic_val)
            synthetic = {"val_synthetic_auroc": found.image_auroc,
                         "val_synthetic_pixel_auroc": found.pixel_auroc}
        report = EpochReport(
            epoch=epoch + 1,
            lr=lr,
            d_reinits=trainer.d_reinits,
            seconds=seconds,
            images_per_s=batches * batch / max(seconds, 1e-9),
            val_recon=float(val_scores.recon.mean()),
            val_score=float(val_scores.score.mean()),
            steps=(history[-1].steps if history else 0) + batches,
            **synthetic,
            **{k: sums[k] / batches for k in sums},
        )
        history.append(report)
        criterion = -math.inf
        if synthetic:  # the mean of the synthetic image and pixel AUROCs
            criterion = 0.5 * sum(synthetic.values())
        if (
            cfg.select_on == "last"
            or (cfg.select_on == "val_recon" and report.val_recon < best["val_recon"])
            or (cfg.select_on == "synthetic" and criterion > best.get("criterion", -math.inf))
        ):
            best = {"epoch": report.epoch, "val_recon": report.val_recon,
                    "criterion": criterion}
            save_atomic(
                {
                    "format": CHECKPOINT_FORMAT,
                    "epoch": report.epoch,
                    "generator": kept.state_dict(),
                    "discriminator": trainer.discriminator.state_dict(),
                },
                best_path,
            )
        state = trainer.state(epoch + 1, shuffle_rng, history, best)
        if dist is not None:  # every rank's own streams, for an exact resume
            state |= {"world_size": dist.world_size, "rng_ranks": streams}
        save_atomic(state, last_path)
        barrier(dist)
        if inspect_epoch:
            inspect_epoch(report.epoch, kept, trainer.discriminator)
            kept.train()
            trainer.discriminator.train()
        if on_epoch:
            on_epoch(report)

    if not main:
        return TrainResult(trainer.generator.eval(), trainer.discriminator.eval(), 0, [],
                           runtime, checkpoint_dir, resumed_from)
    if not best_path.is_file():
        raise TrainingError(f"{checkpoint_dir}: no epoch finished, nothing to keep")
    kept = load_checkpoint(best_path)
    trainer.generator.load_state_dict(kept["generator"])
    trainer.discriminator.load_state_dict(kept["discriminator"])
    return TrainResult(
        trainer.generator.eval(),
        trainer.discriminator.eval(),
        kept["epoch"],
        history,
        runtime,
        checkpoint_dir,
        resumed_from,
    )
