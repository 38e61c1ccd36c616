"""Data-parallel training on CPU: torchrun, gloo, 2 processes, a tiny model and data.

What is equal to a single-process run and what is not:

- Equal: the global batches (the union of the two shards of step b is the single-process
  batch b), the schedule (steps, learning rate), the loss averaging and the gradient
  averaging. With BatchNorm's statistics fixed (eval mode), two DDP steps on 2 x 4 images
  give the single-process weights of two steps on the 8 images to float rounding
  (``test_ddp_steps_equal_single_process_steps_on_the_whole_batch``).
- Not equal: in train mode each process's BatchNorm normalises its own 4 images (the
  default, ``train.distributed.sync_batchnorm: false``; PyTorch's SyncBatchNorm, which
  would use the global batch's statistics, runs on CUDA only), so the forward passes, and
  from step 1 the weights, differ from the single-process run's. The whole run is
  compared within a stated tolerance.
- Equal again: a distributed run that is killed and resumed (by ``--resume`` or by a
  torchrun restart) reaches the uninterrupted distributed run's weights exactly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from distributed_support import STEP_PARAMS, two_steps

from components.cli.torchrun import WORKER_MODULE, failure_message
from components.config import parse_params
from components.data.splits import load_splits
from components.detector.distributed import DistContext, local_batch, shard
from components.detector.networks import build_networks
from components.detector.train import fit, load_checkpoint
from components.errors import TrainingError

pytestmark = pytest.mark.slow
SUPPORT = Path(__file__).resolve().parents[1] / "distributed_support.py"
EPOCHS = 5
LAUNCH_TIMEOUT_S = 300  # a launch starts 3 interpreters (torchrun, 2 workers)


def _tree(data: Path) -> dict:
    return {"data": {"source": str(data), "layout": "industrial", "anomalous_class": None,
                     "image_size": 16, "val_fraction": 0.25, "decode_workers": 1,
                     "min_image_size": 8},
            "model": {"base_width": 4, "disc_width": 8},
            "train": {"epochs": EPOCHS, "batch_size": 8, "lr_decay_start": 3,
                      "device": "cpu", "precision": "fp32", "channels_last": False,
                      "threads": 1},
            "evaluate": {"batch_size": 64, "plots": False}}


@pytest.fixture(scope="module")
def project(tmp_path_factory, synth) -> Path:
    """A tiny industrial dataset (24 normal training images: 18 train, 6 val) and its
    params.yaml."""
    root = tmp_path_factory.mktemp("ddp")
    data = synth.dataset(root / "data", "industrial", n_train=24, n_test=4, n_defect=4,
                         size=16)
    (root / "params.yaml").write_text(yaml.safe_dump(_tree(data)))
    return root


def _start(project: Path, out: Path, *extra: str) -> subprocess.Popen:
    """``nestad train --nproc-per-node 2 ...`` in a child process (the console script's app)."""
    cmd = [sys.executable, "-c", "from components.cli.app import main; main()", "train",
           "-p", str(project / "params.yaml"), "--out", str(out), "--nproc-per-node", "2",
           *extra]
    return subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    return proc.returncode, output


def _kill_rank_after_next_checkpoint(proc: subprocess.Popen, out: Path, rank: int = 1) -> int:
    """Wait until rank 0 writes ``last.pt`` anew, then SIGKILL rank ``rank``'s worker (as
    the OOM killer would); the epoch that checkpoint holds."""
    last = out / "checkpoints" / "last.pt"
    before = last.stat().st_mtime_ns if last.exists() else None
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not last.exists() or last.stat().st_mtime_ns == before:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if WORKER_MODULE in child.cmdline() and child.environ().get("RANK") == str(rank):
                child.send_signal(signal.SIGKILL)
                return load_checkpoint(last)["epoch"]
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker of rank {rank} found")


def _weights(out: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    return {**{f"g.{k}": v for k, v in state["generator"].items()},
            **{f"d.{k}": v for k, v in state["discriminator"].items()}}


@pytest.fixture(scope="module")
def uninterrupted(project: Path) -> Path:
    """The reference distributed run (2 processes, global batch 8, 4 per process)."""
    out = project / "uninterrupted"
    code, output = _finish(_start(project, out))
    assert code == 0, output
    return out


# --- pure rules -------------------------------------------------------------------------


def test_the_shards_of_a_global_batch_are_disjoint_and_make_up_the_batch() -> None:
    batch = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    parts = [shard(batch, DistContext(r, 3, r)) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())
    assert [len(p) for p in parts] == [4, 4, 4]
    assert torch.equal(shard(batch, None), batch)


def test_the_global_batch_must_divide_over_the_processes() -> None:
    assert local_batch(8, DistContext(0, 2, 0)) == 4
    with pytest.raises(TrainingError, match="global batch"):
        local_batch(9, DistContext(0, 2, 0))
    with pytest.raises(TrainingError, match="BatchNorm needs 2"):
        local_batch(4, DistContext(0, 4, 0))
    assert local_batch(4, DistContext(0, 4, 0, sync_batchnorm=True)) == 1


def test_a_batch_that_does_not_divide_is_a_config_error_naming_the_key() -> None:
    from components.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train: .*batch_size=10 is the global batch.*3"):
        parse_params({"train": {"batch_size": 10, "distributed": {"nproc_per_node": 3}}})
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        parse_params({"train": {"distributed": {"nproc_per_node": 1, "nnodes": 2}}})


def test_the_launch_command_is_standalone_on_one_node_and_c10d_with_an_endpoint() -> None:
    from components.cli.torchrun import torchrun_command
    from components.config import DistributedConfig

    one = torchrun_command(DistributedConfig(nproc_per_node=2), ["--out", "o"], python="py")
    assert one == ["py", "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes",
                   "1", "--max-restarts", "0", "--standalone", "-m", WORKER_MODULE,
                   "--out", "o"]
    many = torchrun_command(DistributedConfig(nproc_per_node=8, nnodes=2, max_restarts=3,
                                              rdzv_endpoint="node0:29400"), [], python="py")
    assert "--standalone" not in many
    assert many[many.index("--rdzv-endpoint") + 1] == "node0:29400"
    assert many[many.index("--rdzv-backend") + 1] == "c10d"
    assert many[many.index("--nnodes") + 1] == "2"
    assert many[many.index("--max-restarts") + 1] == "3"


def test_failure_message_names_the_rank_and_the_signal(tmp_path) -> None:
    log = ("Root Cause (first observed failure):\n[0]:\n  time      : now\n"
           "  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 42)\n")
    line = failure_message(1, log, tmp_path, tmp_path / "run", tmp_path / "t.log", 0)
    assert "worker rank 1 was killed by SIGKILL" in line and "--resume" in line
    assert "\n" not in line
    (tmp_path / "rank1.txt").write_text("train.batch_size: bad\n")
    line = failure_message(2, log, tmp_path, tmp_path / "run", tmp_path / "t.log", 1)
    assert line == "distributed training failed after 1 restart(s): rank 1: train.batch_size: bad"


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--nproc-per-node", "3"], ["--nproc-per-node 3: train:", "global batch", "3 processes"]),
        (["--nproc-per-node", "2", "--nnodes", "2"], ["train.distributed", "rdzv_endpoint"]),
        (["--nproc-per-node", "2", "--rdzv-endpoint", "no-port"], ["rdzv_endpoint"]),
        (["--nproc-per-node", "2", "-s", "train.distributed.sync_batchnorm=true"],
         ["sync_batchnorm", "CUDA only"]),
    ],
)
def test_bad_launch_options_are_one_line_before_anything_starts(
    project: Path, tmp_path, args, needles
) -> None:
    from cli_support import assert_one_line_error
    from typer.testing import CliRunner

    from components.cli.app import get_app

    out = tmp_path / "run"
    result = CliRunner().invoke(get_app(), ["train", "-p", str(project / "params.yaml"),
                                            "--out", str(out), *args])
    assert_one_line_error(result, *needles)
    assert not (out / "logs").exists()  # torchrun never started


# --- two processes under torchrun ---------------------------------------------------------


def test_ddp_steps_equal_single_process_steps_on_the_whole_batch(tmp_path) -> None:
    """BN-free check (every BatchNorm in eval mode): two steps under DDP on 2 x 4 images
    equal two single-process steps on the 8 images: the all-reduced gradients are the
    whole batch's, the averaged losses its losses. Tolerance: 1e-6 relative on the losses,
    1e-5 absolute on the weights (Adam divides by sqrt(v), which magnifies rounding where a
    gradient is near 0; a missing or summed all-reduce moves weights by ~lr = 1e-3)."""
    out = tmp_path / "steps.pt"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", str(SUPPORT), str(out)],
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp, single = torch.load(out, weights_only=True), two_steps(None)
    for a, b in zip(ddp["losses"], single["losses"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    for net in ("generator", "discriminator"):
        for key, value in single[net].items():
            torch.testing.assert_close(ddp[net][key], value, atol=1e-5, rtol=0, msg=key)
    moved = max((single["generator"][k].float() - v.float()).abs().max().item()
                for k, v in _initial_generator().items())
    assert moved > 1e-4  # the steps changed the weights, so the comparison means something


def _initial_generator() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    g, _ = build_networks(parse_params(STEP_PARAMS).model, 3, 16)
    return g.state_dict()


@pytest.fixture(scope="module")
def single_process(project: Path):
    """The same training in this process, without DDP (``fit`` as ``nestad train`` runs it)."""
    params = parse_params(yaml.safe_load((project / "params.yaml").read_text()))
    splits = load_splits(params.data, include=("train", "val"))
    return fit(splits.train, splits.val, params.model, params.train,
               project / "single" / "checkpoints")


def test_one_process_under_torchrun_from_the_stage_runner_gives_the_same_weights(
    project: Path, single_process
) -> None:
    """``--nproc-per-node 1`` through the in-process stage runner (what the training
    flow's Prefect task calls): torchrun runs as a subprocess, and the whole distributed
    path at world size 1 (DDP, shards, averaged losses, rank-0 writes) reaches the
    single-process weights bit for bit; with ``--evaluate`` rank 0 evaluates."""
    from components.cli.stage_runner import run_nestad_command

    out = project / "one"
    code = run_nestad_command(f"nestad train -p {project / 'params.yaml'} --out {out} "
                              "--nproc-per-node 1 --evaluate", project)
    assert code == 0
    assert (out / "metrics.json").is_file() and (out / "model" / "detector.pt").is_file()
    log = (out / "logs" / "torchrun.log").read_text()
    assert "torch.distributed.run --nproc-per-node 1" in log
    assert load_checkpoint(out / "checkpoints" / "last.pt")["world_size"] == 1
    ref, ddp = _weights(project / "single"), _weights(out)  # the last epoch's weights
    assert ddp.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ddp[key], ref[key]), key


def test_two_processes_train_like_one_within_the_batchnorm_tolerance(
    project: Path, uninterrupted: Path, single_process
) -> None:
    """The same steps, schedule and validation choice as a single-process run with the same
    global batch (8); rank 0 alone wrote the checkpoints and the history. The weights
    differ because each process's BatchNorm normalises its own 4 images (see the module
    docstring): per-epoch losses within 2 % and weights within 3 % (relative L2 norm) of
    the single-process run's. Measured (CPU, torch 2.13): losses within 0.3 %, weights
    0.8 %."""
    import json

    history = json.loads((uninterrupted / "train_history.json").read_text())
    assert history["world_size"] == 2
    assert [e["epoch"] for e in history["epochs"]] == list(range(1, EPOCHS + 1))
    last = load_checkpoint(uninterrupted / "checkpoints" / "last.pt")
    assert last["world_size"] == 2 and len(last["rng_ranks"]) == 2
    assert (uninterrupted / "checkpoints" / "best.pt").is_file()
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir()) == [
        "best.pt", "last.pt"]

    single = single_process
    assert [h.steps for h in single.history] == [e["steps"] for e in history["epochs"]]
    assert [h.lr for h in single.history] == [e["lr"] for e in history["epochs"]]
    for h, e in zip(single.history, history["epochs"], strict=True):
        for key in ("loss_con", "loss_g", "val_recon"):
            assert e[key] == pytest.approx(getattr(h, key), rel=0.02), (h.epoch, key)
    ddp, ref = _weights(uninterrupted), _weights(project / "single")
    params_only = [k for k in ref if ref[k].is_floating_point() and "running" not in k]
    diff = torch.cat([(ddp[k] - ref[k]).flatten() for k in params_only]).norm()
    size = torch.cat([ref[k].flatten() for k in params_only]).norm()
    assert 0 < diff / size < 0.03, float(diff / size)


def test_a_killed_worker_fails_the_run_in_one_line_and_resume_finishes_it(
    project: Path, uninterrupted: Path
) -> None:
    """SIGKILL of rank 1 after a checkpoint: exit 2 and one line naming the rank and the
    signal; ``--resume`` then reaches the uninterrupted run's weights exactly."""
    out = project / "killed"
    proc = _start(project, out)
    _kill_rank_after_next_checkpoint(proc, out)
    code, output = _finish(proc)
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output
    assert lines[-1].startswith("error: distributed training failed: worker rank 1 was "
                                "killed by SIGKILL"), output
    assert "--resume" in lines[-1]

    code, output = _finish(_start(project, out, "--resume"))
    assert code == 0, output
    a, b = _weights(uninterrupted), _weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_torchrun_restart_resumes_from_the_last_checkpoint(
    project: Path, uninterrupted: Path
) -> None:
    """With ``max_restarts: 1`` torchrun restarts the group after rank 1 is killed; the
    restarted workers resume from ``last.pt`` and reach the uninterrupted weights."""
    import json

    out = project / "restarted"
    proc = _start(project, out, "-s", "train.distributed.max_restarts=1")
    epoch = _kill_rank_after_next_checkpoint(proc, out)
    code, output = _finish(proc)
    assert code == 0, output
    assert "restart 1, resuming" in output
    history = json.loads((out / "train_history.json").read_text())
    assert history["resumed_from"] >= epoch
    a, b = _weights(uninterrupted), _weights(out)
    for key in a:
        assert torch.equal(a[key], b[key]), key
