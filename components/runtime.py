"""Where and how the networks run: device, precision, threads, whether to compile.

Shared by training and scoring (below both), so neither imports the other for set-up.
Imports torch and ``components.data.images`` (to prepare a batch); nothing here knows
about models.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from components.data.images import to_model_input

# ``compile="auto"`` compiles on CUDA only, and only jobs at least this long. On the 2-core
# AVX2 CPU this was measured on (benchmarks/throughput.py), inductor took 2.5-5 minutes to
# compile the default model (seconds with a warm cache) and was then no faster than the
# eager path (channels_last, one thread, BN folded for scoring) within the noise, ±10%.
# On CUDA, where the eager step is bound by many small memory-bound kernels that inductor
# fuses, compiling is the usual win for long runs; that side is not measured here.
COMPILE_MIN_TRAIN_STEPS = 5000
COMPILE_MIN_SCORE_IMAGES = 1_000_000


@dataclass(frozen=True)
class Runtime:
    """Where and how to run a network.

    ``compile`` is True, False or ``"auto"``: whether the training step and the scorer run
    through ``torch.compile`` (inductor); see :func:`compile_pays_off`. ``threads`` is the
    number of intra-op CPU threads for training and scoring (None: PyTorch's default).
    """

    device: torch.device
    amp_dtype: torch.dtype | None  # None = full fp32
    channels_last: bool
    compile: bool | str = False
    threads: int | None = None

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):  # noqa: ANN201 - a context manager
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, images: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> float [-1, 1] on the device, in the chosen memory format.

        On CUDA the uint8 batch (4x smaller than floats) goes from page-locked memory,
        asynchronously, and is converted on the GPU.
        """
        if self.device.type == "cuda" and images.device.type == "cpu":
            images = images.pin_memory()
        x = to_model_input(images.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def compile_pays_off(setting: bool | str, device_type: str, work: int, min_work: int) -> bool:
    """Whether to ``torch.compile`` a job of ``work`` units (training steps, images).

    True / False are obeyed; ``"auto"`` compiles on CUDA when ``work >= min_work``, the
    length from which faster steps repay the compilation; never on CPU, where it did not pay.
    """
    if setting == "auto":
        return device_type == "cuda" and work >= min_work
    return bool(setting)


def resolve_threads(setting: int | str, cpus: int) -> int | None:
    """Intra-op CPU threads for a setting: a number is obeyed; ``"auto"`` is None (PyTorch's
    default, one per CPU this process may use).

    Measured here on an idle 2-core AVX2 CPU (benchmarks/throughput.py), two threads trained
    1.8x and scored 1.7x faster than one. On a machine shared with other busy processes one
    thread can win (the second spin-waits at every barrier for a core others hold): set a
    number. ``cpus`` is kept for callers that size other pools from it.
    """
    del cpus
    if setting == "auto":
        return None
    return int(setting)


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (None: as set), then restore them."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may run on
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX or AVX-512 bf16 units (where bf16 autocast pays off)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_runtime(device: str = "auto", precision: str = "auto",
                    channels_last: bool = True, compile: bool | str = "auto",
                    threads: int | str = "auto") -> Runtime:
    """CUDA when present (or asked for), else CPU; bf16 autocast where the hardware has it.

    On CUDA cuDNN may pick the fastest convolution algorithms (``cudnn.benchmark``): runs
    there are not bit-for-bit repeatable; runs on CPU are.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from components.errors import ConfigError

        raise ConfigError("train.device: cuda was asked for but no CUDA device is available")
    dev = torch.device(device)
    if precision == "auto":
        fast = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_has_fast_bf16()
        precision = "bf16" if fast else "fp32"
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each conv once
    return Runtime(dev, torch.bfloat16 if precision == "bf16" else None, channels_last, compile,
                   resolve_threads(threads, _cpus()))
