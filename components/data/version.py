"""Data versioning with DVC: the only module that drives it.

``data/`` is tracked as one output by the top-level ``data.dvc``; its md5 (a directory
hash ending in ``.dir``) is the data version that training, evaluation and the registry
record. DVC runs in-process through ``dvc.repo.Repo``. Every target is passed as an
absolute path, and DVC runs with the cwd at the repo root (see ``_repo``).

Remotes: a local folder, or S3 (``dvc-s3``) with an ``endpointurl`` for S3-compatible
servers. Credentials, when given at all, go only to ``.dvc/config.local`` (git-ignored);
otherwise dvc-s3 uses the standard AWS credential chain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from components.errors import VersioningError

DATA_TARGET = "data"

CommandRunner = Callable[[str, Path], int | None]
"""Runs a stage's command line in this process, in the given working folder, and returns
its exit status; or returns None when it does not handle that command (DVC then runs it
in a shell, as usual)."""


def _git_toplevel(path: Path) -> Path | None:
    for folder in (path, *path.parents):
        if (folder / ".git").exists():
            return folder
    return None


@contextlib.contextmanager
def _repo(root: Path, action: str) -> Iterator[Any]:
    """Open the DVC repo at ``root``; turn DVC's errors into one-line VersioningErrors."""
    from dvc.config import NoRemoteError
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(str(root))
    except NotDvcRepoError:
        raise VersioningError(
            f"{root}: not a DVC repository (`nestad ingest` initialises one, or run `dvc init`)"
        ) from None
    try:
        # DVC is cwd-sensitive beyond targets: its run cache builds stages from the relative
        # path "dvc.yaml" (dvc/stage/cache.py) and status() keys stages relative to the cwd.
        # So DVC runs with the cwd at the root (process-wide: don't call DVC concurrently).
        with contextlib.chdir(root), repo:
            yield repo
    except NoRemoteError:
        raise VersioningError(
            f"dvc {action} in {root}: no DVC remote configured (add one with "
            "`nestad data-remote <folder or s3://bucket/prefix>`)"
        ) from None
    except DvcException as exc:
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""  # e.g. why a stage failed
        raise VersioningError(f"dvc {action} in {root}: {exc}{cause}") from None


def ensure_repo(root: Path) -> bool:
    """Make ``root`` a DVC repository if it is not one; True when it was initialised now.

    Inside a git work tree DVC stages its own config files in git's index (as `dvc init`
    does); outside one it runs without an SCM.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(root).absolute()
    if (root / ".dvc").is_dir():
        return False
    top = _git_toplevel(root)
    try:
        Repo.init(str(root), no_scm=top is None, subdir=top is not None and top != root).close()
    except DvcException as exc:
        raise VersioningError(f"dvc init in {root}: {exc}") from None
    with _repo(root, "config") as repo, repo.config.edit() as conf:
        conf["core"]["analytics"] = False  # these machines have no internet to report to
    return True


def track_data(root: Path, target: str = DATA_TARGET) -> str:
    """``dvc add`` the folder ``root/target`` (writing ``root/<target>.dvc``); return the
    data version."""
    root = Path(root).absolute()
    path = root / target
    if not path.is_dir():
        raise VersioningError(f"{path}: no such folder to track")
    with _repo(root, "add") as repo:
        repo.add([str(path)])
    return data_version(root, target)


def data_version(root: Path, target: str = DATA_TARGET) -> str:
    """The md5 recorded in ``root/<target>.dvc``: the version of the tracked data."""
    dvc_file = Path(root).absolute() / f"{target}.dvc"
    try:
        outs = yaml.safe_load(dvc_file.read_text())["outs"]
        return str(outs[0]["md5"])
    except FileNotFoundError:
        raise VersioningError(
            f"{dvc_file}: not found; the data is not tracked yet (run `nestad ingest`)"
        ) from None
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise VersioningError(f"{dvc_file}: unreadable DVC file ({exc})") from None


def configure_remote(
    root: Path,
    url: str | Path,
    *,
    name: str = "storage",
    default: bool = True,
    endpoint_url: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
) -> None:
    """Add or update a DVC remote: a local folder, or ``s3://bucket/prefix``.

    ``endpoint_url`` points S3 at a compatible server. Credentials are written only to
    ``.dvc/config.local``; without them dvc-s3 uses the standard AWS chain.
    """
    root, url = Path(root).absolute(), str(url)
    if "://" not in url:  # a local folder
        url = str(Path(url).expanduser().absolute())
    with _repo(root, "remote") as repo:
        with repo.config.edit() as conf:
            remote = conf["remote"].setdefault(name, {})
            remote["url"] = url
            if endpoint_url:
                remote["endpointurl"] = endpoint_url
            if default:
                conf["core"]["remote"] = name
        if access_key_id or secret_access_key:
            with repo.config.edit("local") as local:
                secret = local["remote"].setdefault(name, {})
                if access_key_id:
                    secret["access_key_id"] = access_key_id
                if secret_access_key:
                    secret["secret_access_key"] = secret_access_key


def push(root: Path, remote: str | None = None, target: str = DATA_TARGET) -> int:
    """Upload the tracked data to the remote; the number of files transferred."""
    root = Path(root).absolute()
    with _repo(root, "push") as repo:
        return int(repo.push(targets=[str(root / f"{target}.dvc")], remote=remote))


def pull(root: Path, remote: str | None = None, target: str = DATA_TARGET) -> dict[str, Any]:
    """Download the tracked data and check it out; DVC's stats (fetched, added...)."""
    root = Path(root).absolute()
    with _repo(root, "pull") as repo:
        result = repo.pull(targets=[str(root / f"{target}.dvc")], remote=remote)
    return dict(result.get("stats", {}))


def reproduce(root: Path, stage: str | None = None,
              run_command: CommandRunner | None = None, single: bool = False) -> list[str]:
    """``dvc repro`` one stage of ``root/dvc.yaml`` (all when None); the stages that ran.

    DVC decides what is stale, restores from its run cache, records ``dvc.lock`` and
    caches the outputs as ever. With ``run_command``, the commands it handles run in this
    process instead of a child shell (no interpreter start or imports per stage); a
    non-zero status fails the stage as a failed command would.

    ``single`` (``dvc repro --single-item``) leaves the stage's upstream unchecked, for a
    caller that has just reproduced it: DVC then does not re-hash the upstream data (a few
    seconds for 60,000 images) once per stage.
    """
    root = Path(root).absolute()
    dvc_yaml = root / "dvc.yaml"
    target = f"{dvc_yaml}:{stage}" if stage else str(dvc_yaml)
    with _repo(root, "repro") as repo, _commands_through(run_command):
        ran = repo.reproduce(targets=[target], single_item=single and stage is not None)
        return [stage.addressing for stage in ran]


@contextlib.contextmanager
def _commands_through(run_command: CommandRunner | None) -> Iterator[None]:
    """Route DVC's stage commands through ``run_command`` for the duration of the block.

    DVC 3 runs every command of a stage through ``dvc.stage.run._run(executable, cmd,
    cwd=..., env=...)``; that one function is swapped, so everything around it (the run
    cache, removing stale outputs, the repo lock, dvc.lock) is DVC's own. Were a DVC
    release to drop that function, commands would simply run in a shell again.
    """
    from dvc.stage import run as stage_run
    from dvc.stage.exceptions import StageCmdFailedError

    shell_run = getattr(stage_run, "_run", None)
    if run_command is None or shell_run is None:
        yield
        return

    def run(executable: str | None, cmd: str, **kwargs: Any) -> None:
        status = run_command(cmd, Path(kwargs.get("cwd") or "."))
        if status is None:
            shell_run(executable, cmd, **kwargs)
        elif status != 0:
            raise StageCmdFailedError(cmd, status)

    stage_run._run = run
    try:
        yield
    finally:
        stage_run._run = shell_run


def status(root: Path) -> dict[str, Any]:
    """``dvc status``: what changed since the last commit of pipelines and data
    (empty when everything is up to date)."""
    with _repo(Path(root).absolute(), "status") as repo:
        return dict(repo.status())
