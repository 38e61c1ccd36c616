"""DVC versioning in a throw-away git repository: init, add, local-remote round trip,
S3 remote settings, and pipeline helpers called from another working directory."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.data import version as versioning
from components.errors import VersioningError


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """A git work tree with ``data/toy/*.png``; DVC's site cache kept inside tmp_path."""
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site"))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        file = root / "data" / "toy" / "images" / f"{i}.png"
        file.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
        file.write_bytes(buf.getvalue())
    (root / "data" / "toy" / "manifest.csv").write_text("path\n")
    return root


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_dvc_round_trip_through_a_local_remote(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # DVC must not depend on the cwd
    assert versioning.ensure_repo(project) is True
    assert versioning.ensure_repo(project) is False
    assert (project / ".dvc" / "config").is_file()

    version = versioning.track_data(project)
    dvc_file = yaml.safe_load((project / "data.dvc").read_text())
    assert version == dvc_file["outs"][0]["md5"] and version.endswith(".dir")
    assert dvc_file["outs"][0]["path"] == "data" and dvc_file["outs"][0]["nfiles"] == 7
    assert versioning.data_version(project) == version

    with pytest.raises(VersioningError, match="no DVC remote configured"):
        versioning.push(project)
    versioning.configure_remote(project, tmp_path / "remote")
    assert versioning.push(project) == 7 + 1  # 7 files and the directory listing

    before = _hashes(project / "data")
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    stats = versioning.pull(project)
    assert stats["fetched"] == 8
    assert _hashes(project / "data") == before
    assert versioning.data_version(project) == version


def test_a_change_to_the_data_is_a_new_version(project):
    versioning.ensure_repo(project)
    first = versioning.track_data(project)
    (project / "data" / "toy" / "manifest.csv").write_text("path\nimages/new.png\n")
    second = versioning.track_data(project)
    assert second != first and versioning.data_version(project) == second


def test_s3_remote_keeps_credentials_out_of_the_shared_config(project):
    versioning.ensure_repo(project)
    versioning.configure_remote(
        project,
        "s3://bucket/nestad",
        name="s3store",
        endpoint_url="http://127.0.0.1:9000",
        access_key_id="AKIDEXAMPLE",
        secret_access_key="s3cr3t",
    )
    shared = (project / ".dvc" / "config").read_text()
    local = (project / ".dvc" / "config.local").read_text()
    assert "url = s3://bucket/nestad" in shared
    assert "endpointurl = http://127.0.0.1:9000" in shared and "remote = s3store" in shared
    assert "s3cr3t" not in shared and "AKIDEXAMPLE" not in shared
    assert "secret_access_key = s3cr3t" in local and "access_key_id = AKIDEXAMPLE" in local
    ignored = (project / ".dvc" / ".gitignore").read_text()
    assert "/config.local" in ignored


def test_errors_name_the_project_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site"))
    with pytest.raises(VersioningError, match=r"not found; the data is not tracked yet"):
        versioning.data_version(tmp_path)
    with pytest.raises(VersioningError, match="not a DVC repository"):
        versioning.status(tmp_path)
    versioning.ensure_repo(tmp_path)  # no git here: DVC runs without an SCM
    with pytest.raises(VersioningError, match="no such folder to track"):
        versioning.track_data(tmp_path, "nothing")


def test_reproduce_and_status_work_from_another_directory(project, tmp_path, monkeypatch):
    versioning.ensure_repo(project)
    (project / "params.yaml").write_text("prepare:\n  factor: 2\n")
    (project / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "prepare": {
                        "cmd": f"{sys.executable} -c \"open('out.txt', 'w').write('ok')\"",
                        "params": ["prepare.factor"],
                        "outs": ["out.txt"],
                    }
                }
            }
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert versioning.reproduce(project, "prepare") == ["prepare"]
    assert (project / "out.txt").read_text() == "ok"
    assert versioning.status(project) == {}
    assert versioning.reproduce(project, "prepare") == []  # up to date
    (project / "params.yaml").write_text("prepare:\n  factor: 3\n")
    assert "prepare" in versioning.status(project)
    assert versioning.reproduce(project) == ["prepare"]
    with pytest.raises(VersioningError, match="dvc repro"):
        versioning.reproduce(project, "missing_stage")
    (project / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "broken": {
                        "cmd": f'{sys.executable} -c "raise SystemExit(3)"',
                        "outs": ["never.txt"],
                    }
                }
            }
        )
    )
    with pytest.raises(VersioningError, match=r"failed to reproduce .*broken.*exited with 3"):
        versioning.reproduce(project, "broken")


def test_reproduce_single_leaves_a_stale_upstream_stage_alone(tmp_path, monkeypatch):
    project = tmp_path / "proj"
    project.mkdir()
    versioning.ensure_repo(project)
    (project / "params.yaml").write_text("first:\n  value: 1\n")
    write = "import sys, pathlib; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])"
    (project / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "first": {"cmd": f'{sys.executable} -c "{write}" one.txt ${{first.value}}',
                              "params": ["first.value"], "outs": ["one.txt"]},
                    "second": {"cmd": f'{sys.executable} -c "{write}" two.txt 2',
                               "deps": ["one.txt"], "outs": ["two.txt"]},
                }
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    assert versioning.reproduce(project) == ["first", "second"]
    (project / "params.yaml").write_text("first:\n  value: 5\n")  # first is stale now
    assert versioning.reproduce(project, "second", single=True) == []  # not looked at
    assert (project / "one.txt").read_text() == "1"
    assert versioning.reproduce(project, "second") == ["first", "second"]
    assert (project / "one.txt").read_text() == "5"


def test_reproduce_routes_stage_commands_through_a_runner(tmp_path, monkeypatch):
    """The runner runs the commands it takes in this process; DVC still records dvc.lock;
    one it declines runs in a shell; a non-zero status fails the stage."""
    project = tmp_path / "proj"
    project.mkdir()
    versioning.ensure_repo(project)
    (project / "params.yaml").write_text("prepare:\n  factor: 2\n")
    shell_cmd = f"{sys.executable} -c \"open('shell.txt', 'w').write('shell')\""
    (project / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "inproc": {"cmd": "make-out 7", "params": ["prepare.factor"],
                               "outs": ["out.txt"]},
                    "shell": {"cmd": shell_cmd, "outs": ["shell.txt"]},
                    "fails": {"cmd": "make-out fail", "outs": ["never.txt"]},
                }
            }
        )
    )
    calls: list[tuple[str, Path]] = []

    def runner(cmd: str, cwd: Path) -> int | None:
        calls.append((cmd, cwd))
        if not cmd.startswith("make-out"):
            return None
        if cmd.endswith("fail"):
            return 4
        (cwd / "out.txt").write_text(f"in process {os.getpid()}")
        return 0

    monkeypatch.chdir(tmp_path)
    assert versioning.reproduce(project, "inproc", run_command=runner) == ["inproc"]
    assert (project / "out.txt").read_text() == f"in process {os.getpid()}"
    assert calls == [("make-out 7", project)]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert lock["inproc"]["outs"][0]["path"] == "out.txt"
    assert versioning.reproduce(project, "inproc", run_command=runner) == []  # up to date
    assert versioning.reproduce(project, "shell", run_command=runner) == ["shell"]
    assert (project / "shell.txt").read_text() == "shell"
    with pytest.raises(VersioningError, match=r"failed to reproduce .*fails.*exited with 4"):
        versioning.reproduce(project, "fails", run_command=runner)
    assert len(calls) == 3
    # Outside the call, DVC runs commands in a shell again.
    from dvc.stage import run as stage_run

    assert stage_run._run.__module__ == "dvc.stage.run"


@pytest.mark.integration
def test_dvc_round_trip_through_an_s3_compatible_remote(project, moto_endpoint, monkeypatch):
    import boto3

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")  # the standard chain; nothing in DVC's config
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="dvc-store")
    versioning.ensure_repo(project)
    version = versioning.track_data(project)
    versioning.configure_remote(project, "s3://dvc-store/nestad", endpoint_url=moto_endpoint)
    assert versioning.push(project) == 8
    before = _hashes(project / "data")
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    versioning.pull(project)
    assert _hashes(project / "data") == before and versioning.data_version(project) == version
    assert not (project / ".dvc" / "config.local").exists()
