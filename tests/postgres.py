"""A real, throw-away PostgreSQL server on localhost for tests: :func:`postgres_server` and the
``postgres_url`` fixture.

It needs the server binaries (``initdb``, ``postgres``) of Debian's ``postgresql`` package, which
``.ci/run`` installs; they live in ``/usr/lib/postgresql/<version>/bin``, outside ``PATH``. Without
them a test that asks for the server FAILS with a message saying so: the storage is part of what
the suite checks, so it must not be skipped silently.

PostgreSQL refuses to run as root. As root, the data folder is made in ``/tmp`` (which the
``postgres`` user can reach, unlike pytest's ``/tmp/pytest-of-root``), handed to the ``postgres``
system user, and ``initdb``/``postgres`` run as that user.

Run by hand, ``python tests/postgres.py`` starts a server and prints its URL until Ctrl-C.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

DATABASE = "nasloc"
USER = "postgres"  # the superuser role initdb creates (-U); authentication is "trust" on localhost only
INSTALL_HINT = ("install Debian's PostgreSQL server: apt-get install postgresql "
                "(.ci/run does this before running the tests)")


def find_binaries() -> Path:
    """The folder holding ``initdb`` and ``postgres`` (the newest installed version first), or fail."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")],
                        reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.insert(0, str(Path(initdb).parent))
    for folder in candidates:
        if os.access(Path(folder, "initdb"), os.X_OK) and os.access(Path(folder, "postgres"), os.X_OK):
            return Path(folder)
    pytest.fail(f"PostgreSQL server binaries (initdb, postgres) not found in PATH or /usr/lib/postgresql/*/bin; "
                f"{INSTALL_HINT}", pytrace=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server(database: str = DATABASE, timeout: float = 120.0) -> Iterator[str]:
    """Start a fresh server on 127.0.0.1 with one empty database; yield its SQLAlchemy URL
    (``postgresql+psycopg2://postgres@127.0.0.1:PORT/DATABASE``); stop it and delete its files."""

    bindir = find_binaries()
    as_root = os.geteuid() == 0
    run_as: dict = {}
    if as_root:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail(f"running as root, but there is no 'postgres' system user to run the server as; {INSTALL_HINT}",
                        pytrace=False)
        run_as = dict(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
    root = Path(tempfile.mkdtemp(prefix="nasloc-pg-", dir="/tmp" if as_root else None))
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    sockets.mkdir()
    if as_root:
        for path in (root, sockets):
            os.chown(path, account.pw_uid, account.pw_gid)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    if as_root:
        env["HOME"] = account.pw_dir
    server = None
    try:
        init = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync",
             "--no-instructions"],
            capture_output=True, text=True, env=env, cwd=root, timeout=timeout, **run_as)
        if init.returncode != 0:
            pytest.fail(f"initdb failed ({init.returncode}): {init.stderr.strip() or init.stdout.strip()}", pytrace=False)
        for attempt in range(3):  # the port was free a moment ago; another process may take it meanwhile
            port = free_port()
            with open(log, "ab") as out:
                server = subprocess.Popen(
                    [str(bindir / "postgres"), "-D", str(data), "-k", str(sockets), "-p", str(port),
                     "-h", "127.0.0.1",
                     # a test database: durability is not needed, speed is
                     "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, **run_as)
            if _wait_ready(server, port, timeout):
                break
            _stop(server)
            server = None
        if server is None:
            pytest.fail(f"the PostgreSQL server did not start; its log ({log}):\n{_tail(log)}", pytrace=False)
        yield create_database(f"postgresql+psycopg2://{USER}@127.0.0.1:{port}/postgres", database)
    finally:
        if server is not None:
            _stop(server)
        shutil.rmtree(root, ignore_errors=True)


def create_database(url: str, name: str) -> str:
    """Create the empty database ``name`` on the server of ``url``; returns its URL."""
    import psycopg2
    import sqlalchemy

    where = sqlalchemy.engine.make_url(url)
    connection = psycopg2.connect(host=where.host, port=where.port, user=where.username, dbname="postgres")
    try:
        connection.autocommit = True  # CREATE DATABASE can't run in a transaction
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()
    return where.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database on localhost for the module (see :func:`postgres_server`)."""
    with postgres_server() as url:
        yield url


def _wait_ready(server: subprocess.Popen, port: int, timeout: float) -> bool:
    import psycopg2

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return False  # exited: the port was taken, or a real failure (the log says)
        try:
            psycopg2.connect(host="127.0.0.1", port=port, user=USER, dbname="postgres", connect_timeout=2).close()
            return True
        except psycopg2.OperationalError:
            time.sleep(0.2)
    return False


def _stop(server: subprocess.Popen) -> None:
    """Fast shutdown (SIGINT: disconnect clients, stop); SIGKILL if it hangs."""
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


if __name__ == "__main__":
    with postgres_server() as url:
        print(url, flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
