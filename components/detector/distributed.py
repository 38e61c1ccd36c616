"""Data-parallel training across processes (DistributedDataParallel), as ``fit`` uses it.

Who this process is (:class:`DistContext`, from the variables torchrun sets), its share of
each global batch, and the few collectives the trainer needs. The launch itself (torchrun
as a subprocess) is the CLI's (``components.cli.torchrun``); nothing here starts processes.

The rules, each chosen so that the world size is an implementation detail:

- ``train.batch_size`` is the **global** batch: each of the W processes takes B / W images
  of every global batch, so the optimiser steps, the schedule and the learning rate are
  those of a single-process run with batch B.
- Every process draws the same global order from the same seeded shuffle stream (restored
  from the checkpoint on resume) and takes positions ``rank, rank + W, ...`` of each batch:
  DistributedSampler's ``rank::num_replicas`` rule applied to the trainer's own order.
  (DistributedSampler reshuffles with ``seed + epoch``, which would give a different order
  from the single-process run, so it is not used itself.) The union of the shards of step
  b is exactly the single-process batch b.
- Losses are batch means, and DDP averages the gradients over processes: with equal
  shards that is the gradient of the global batch's mean loss, except where BatchNorm
  normalises each shard with its own statistics (below). The reported losses are
  averaged over processes, so every process takes the same decisions (non-finite loss, D
  collapse) at the same step.
- BatchNorm: per process by default (``train.distributed.sync_batchnorm: false``). It is
  the DCGAN / GANomaly behaviour (statistics of the batch a network sees, D's real and
  fake passes normalised apart) and costs no collective inside the G and D passes; with
  B / W >= 16 images the shard's statistics are close to the batch's. SyncBatchNorm
  (PyTorch's; CUDA only) normalises with the global batch's statistics, which makes the
  forward passes those of the single-process run: use it when per-process batches are
  small (paper profile on 8 GPUs: 8 images each).
- Rank 0 alone writes checkpoints, runs the validation choice and reports per epoch; the
  others wait at a barrier.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from components.errors import TrainingError


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel run."""

    rank: int  # global rank, 0 .. world_size - 1
    world_size: int
    local_rank: int  # rank on this node: the CUDA device index
    sync_batchnorm: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env(sync_batchnorm: bool = False,
                     env: Mapping[str, str] | None = None) -> DistContext:
    """The context torchrun describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``."""
    env = os.environ if env is None else env
    try:
        rank, world, local = (int(env[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise TrainingError("not started by torchrun: RANK, WORLD_SIZE and LOCAL_RANK must "
                            "be set (use nestad train --nproc-per-node N)") from None
    return DistContext(rank, world, local, sync_batchnorm)


def backend_for(device_type: str) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(ctx: DistContext, device_type: str, timeout_s: float) -> None:
    """Join the process group torchrun set up (``MASTER_ADDR``/``PORT`` in the environment);
    on CUDA, bind this process to GPU ``local_rank`` first."""
    if ctx.sync_batchnorm and device_type != "cuda":
        raise TrainingError("train.distributed.sync_batchnorm: PyTorch's SyncBatchNorm runs "
                            "on CUDA only; on CPU each process normalises its own batch")
    if device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend_for(device_type), store=_attempt_store(ctx, timeout),
                            rank=ctx.rank, world_size=ctx.world_size, timeout=timeout)


def _attempt_store(ctx: DistContext, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store torchrun set up (``MASTER_ADDR``/``MASTER_PORT``), under a
    prefix of this attempt (``TORCHELASTIC_RESTART_COUNT``). Measured with torch 2.13: a
    restarted group reuses the agent's store, and without the prefix a fast rank reads
    the previous attempt's gloo addresses ("Connection refused") and fails the restart."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts it
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          ctx.world_size, is_master=not agent and ctx.rank == 0,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"nestad/attempt_{attempt}", store)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_batch(global_batch: int, ctx: DistContext) -> int:
    """Images per process of a global batch; it must divide evenly and, with per-process
    BatchNorm, leave at least 2 images (BN needs more than one sample)."""
    share, rest = divmod(global_batch, ctx.world_size)
    if rest:
        raise TrainingError(f"train.batch_size={global_batch} is the global batch; it must "
                            f"divide evenly over {ctx.world_size} processes")
    if share < 2 and not ctx.sync_batchnorm:
        raise TrainingError(f"train.batch_size={global_batch} over {ctx.world_size} "
                            f"processes leaves {share} image per process; BatchNorm needs 2 "
                            "(a larger batch, or train.distributed.sync_batchnorm on CUDA)")
    return share


def shard(indices: Tensor, ctx: DistContext | None) -> Tensor:
    """This process's share of a global batch: positions rank, rank + W, ... (all of it in
    a single-process run)."""
    if ctx is None:
        return indices
    return indices[ctx.rank :: ctx.world_size]


def prepare_module(module: nn.Module, ctx: DistContext) -> nn.Module:
    """The module as training uses it: BatchNorm layers swapped for SyncBatchNorm in place
    when asked (same parameters and buffers, same state-dict keys)."""
    if ctx.sync_batchnorm:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def wrap_ddp(module: nn.Module, device: torch.device, ctx: DistContext) -> nn.Module:
    """``module`` under DistributedDataParallel (rank 0's weights broadcast on the way in;
    rank 0's BN buffers broadcast at every forward)."""
    ids = [ctx.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def mean_over_ranks(values: dict[str, Tensor], ctx: DistContext | None) -> dict[str, Tensor]:
    """Each scalar averaged over all processes (one all-reduce); unchanged in a
    single-process run."""
    if ctx is None or not values:
        return values
    keys = list(values)
    stacked = torch.stack([values[k].float().reshape(()) for k in keys])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= ctx.world_size
    return {k: stacked[i] for i, k in enumerate(keys)}


def broadcast_module(module: nn.Module, ctx: DistContext | None) -> None:
    """Rank 0's parameters and buffers to every process (after a change only rank 0 may
    have made identically, e.g. re-initialising D)."""
    if ctx is None:
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


def broadcast_object(obj: Any, ctx: DistContext | None) -> Any:
    """Rank 0's ``obj`` (picklable) on every process."""
    if ctx is None:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, ctx: DistContext | None) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if ctx is None:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext | None) -> None:
    if ctx is not None:
        dist.barrier()
