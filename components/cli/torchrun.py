"""Launching data-parallel training: ``nestad train --nproc-per-node N`` runs PyTorch's
elastic launcher (``python -m torch.distributed.run``) as a subprocess, which starts the
workers (``components.cli.train_worker``), watches them and, on a failure, stops the group
(and restarts it ``train.distributed.max_restarts`` times; a restart resumes from
``last.pt``).

A subprocess, never ``multiprocessing``: this also runs inside a Prefect task (the
training flow's train stage), where spawned or forked children break (Prefect loads flow
code under another module name). torchrun's own messages and the workers' standard error
go to ``OUT/logs/torchrun.log``; rank 0's progress lines to standard output. A failed run
is one line: the failing rank's own error, or which rank died and how.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from components.config import DistributedConfig
from components.errors import TrainingError

WORKER_MODULE = "components.cli.train_worker"
LOG_DIR = "logs"
LOG_FILE = "torchrun.log"
ERROR_DIR = "errors"


def torchrun_command(dc: DistributedConfig, worker_args: list[str],
                     python: str = sys.executable) -> list[str]:
    """The launcher's command line: ``--standalone`` on one node without an endpoint (a
    local rendezvous on a free port), else a c10d rendezvous at ``rdzv_endpoint``."""
    if dc.nproc_per_node is None:
        raise ValueError("train.distributed.nproc_per_node is not set")
    cmd = [python, "-m", "torch.distributed.run",
           "--nproc-per-node", str(dc.nproc_per_node), "--nnodes", str(dc.nnodes),
           "--max-restarts", str(dc.max_restarts)]
    if dc.rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", dc.rdzv_endpoint,
                "--rdzv-id", dc.rdzv_id]
    return [*cmd, "-m", WORKER_MODULE, *worker_args]


def worker_arguments(params: Path, profile: str | None, overrides: list[str], out: Path,
                     resume: bool, evaluate: bool) -> list[str]:
    """What every worker is told: the same params, profile and overrides as this command
    (so each reads the same config), the run folder and where errors go."""
    args = ["--params", str(params), "--out", str(out),
            "--error-dir", str(out / LOG_DIR / ERROR_DIR)]
    if profile:
        args += ["--profile", profile]
    for item in overrides:
        args += ["-s", item]
    return args + (["--resume"] if resume else []) + (["--evaluate"] if evaluate else [])


_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def failure_message(returncode: int, log_text: str, error_dir: Path, out: Path,
                    log: Path, restarts: int) -> str:
    """One line for a failed run: the first rank's own error when it wrote one, else the
    root cause torchrun reports (which rank, its exit code or signal)."""
    kept = (f"the last finished epoch is kept in {out / 'checkpoints'} (continue with "
            f"--resume); torchrun log: {log}")
    tried = f" after {restarts} restart(s)" if restarts else ""
    errors = sorted(error_dir.glob("rank*.txt"), key=lambda p: int(p.stem[4:] or 0))
    if errors:
        rank = errors[0].stem[4:]
        message = errors[0].read_text().strip().splitlines()[0]
        return f"distributed training failed{tried}: rank {rank}: {message}"
    found = _ROOT_CAUSE.search(log_text)
    if found:
        rank, code = found.group(1), int(found.group(2))
        how = f"exited with code {code}"
        if code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        return f"distributed training failed{tried}: worker rank {rank} {how}; {kept}"
    return f"distributed training failed{tried}: torchrun exited with code {returncode}; {kept}"


def launch(cmd: list[str], out: Path, restarts: int = 0) -> float:
    """Run torchrun's ``cmd``; its start time (for finding what rank 0 wrote). Raises
    TrainingError with one line when the run fails."""
    logs = out / LOG_DIR
    errors = logs / ERROR_DIR
    errors.mkdir(parents=True, exist_ok=True)
    for stale in errors.glob("rank*.txt"):
        stale.unlink()
    log = logs / LOG_FILE
    started = time.time()
    with log.open("a") as fh:  # appended: a resumed run keeps the failed one's log
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stderr=fh)
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # torchrun stops its workers on SIGTERM
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
    if code != 0:
        raise TrainingError(failure_message(code, log.read_text(errors="replace"), errors,
                                            out, log, restarts))
    return started


def quoted(value: object) -> str:
    """A value as a YAML scalar for a ``-s key=value`` override (strings quoted: ``a:1``
    must stay a string)."""
    return json.dumps(value)


def train_distributed(cfg, params: Path, profile: str | None, overrides: list[str], out: Path,
                      resume: bool, evaluate: bool) -> None:
    """``nestad train`` with ``train.distributed.nproc_per_node`` set: check what can be
    checked here, launch torchrun, summarise what rank 0 wrote (``cfg``: the Params)."""
    import torch

    from components.cli.common import console
    from components.errors import ConfigError
    from components.runtime import resolve_runtime

    tc, dc = cfg.train, cfg.train.distributed
    device = resolve_runtime(tc.device, tc.precision, tc.channels_last, tc.compile,
                             tc.threads).device
    if dc.sync_batchnorm and device.type != "cuda":
        raise ConfigError("train.distributed.sync_batchnorm: PyTorch's SyncBatchNorm runs on "
                          "CUDA only; on CPU each process normalises its own batch")
    if device.type == "cuda" and dc.nproc_per_node > torch.cuda.device_count():
        raise ConfigError(f"train.distributed.nproc_per_node={dc.nproc_per_node}: this node "
                          f"has {torch.cuda.device_count()} CUDA device(s), one per process")
    world = dc.nproc_per_node * dc.nnodes
    out.mkdir(parents=True, exist_ok=True)
    cmd = torchrun_command(dc, worker_arguments(params, profile, overrides, out, resume,
                                                evaluate))
    backend = "nccl" if device.type == "cuda" else "gloo"
    console.print(f"torchrun: {world} process(es) ({dc.nproc_per_node} per node x "
                  f"{dc.nnodes} node(s)), {backend}; global batch {tc.batch_size} = "
                  f"{tc.batch_size // world} per process; log {out / LOG_DIR / LOG_FILE}",
                  highlight=False, soft_wrap=True)
    started = launch(cmd, out, dc.max_restarts)
    history = out / "train_history.json"
    if history.is_file() and history.stat().st_mtime >= started - 1:
        kept = json.loads(history.read_text())
        console.print(f"kept epoch {kept['best_epoch']} on {kept['device']}, "
                      f"{kept['precision']}, {world} processes; checkpoints in "
                      f"{out / 'checkpoints'}", highlight=False, soft_wrap=True)
    else:
        console.print("this node's workers finished; rank 0 (another node) wrote the "
                      "checkpoints", highlight=False)
