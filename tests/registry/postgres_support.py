"""A throw-away PostgreSQL server for the registry tests: a cluster in a temp dir on
127.0.0.1 (Debian's ``postgresql`` package; ``.ci/run`` installs it where missing).

``initdb`` refuses to run as root, so as root the cluster belongs to the ``postgres``
user (Debian's package creates it), else ``nobody``; its folder is made under /tmp, which
that user can reach (pytest's own temp folders are private to root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_support import free_port


def pg_bin(name: str) -> str | None:
    """``initdb``/``pg_ctl`` on PATH, else under Debian's /usr/lib/postgresql/<ver>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def _as_owner() -> tuple[list[str], int | None, int | None]:
    """The command prefix (and uid, gid) that runs the server as a non-root user."""
    if os.geteuid() != 0:
        return [], None, None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"], entry.pw_uid, entry.pw_gid
    pytest.skip("running as root and no postgres/nobody user to own a PostgreSQL cluster")


@contextlib.contextmanager
def postgres_server(database: str = "mlflow", user: str = "mlflow") -> Iterator[str]:
    """Start a fresh cluster (trust auth, loopback only, no fsync: a test store) and yield
    ``postgresql://user@127.0.0.1:port/database``; stop it and delete it afterwards."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed; .ci/run installs it")
    prefix, uid, gid = _as_owner()
    root = Path(tempfile.mkdtemp(prefix="nestad-pg-", dir="/tmp" if uid is not None else None))
    if uid is not None:
        os.chown(root, uid, gid)
    data, port = root / "db", free_port()
    run = {"capture_output": True, "text": True, "cwd": root}
    done = subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", user,
                           "-E", "UTF8", "--no-sync"], **run)
    if done.returncode:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed: {done.stderr[-2000:]}")
    options = (f"-k {root} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off "
               "-c synchronous_commit=off -c full_page_writes=off")
    done = subprocess.run([*prefix, pg_ctl, "-D", str(data), "-o", options, "-l",
                           str(root / "server.log"), "-w", "-t", "120", "start"], **run)
    try:
        if done.returncode:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            pytest.fail(f"pg_ctl start failed: {done.stderr[-1000:]} {log[-2000:]}")
        import psycopg2

        deadline = time.monotonic() + 60
        while True:
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=port, user=user,
                                        dbname="postgres")
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        conn.close()
        yield f"postgresql://{user}@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       **run)
        shutil.rmtree(root, ignore_errors=True)

