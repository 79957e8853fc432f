"""Opening Optuna storages: SQLite and journal files."""
from __future__ import annotations

import sqlite3

import optuna
import pytest
from optuna.storages import JournalStorage, RDBStorage

from nasloc.storage import HeartbeatJournalStorage, StorageError, open_storage


# ------------------------------------------------------------------------------------------- open_storage
def test_open_storage_picks_the_backend_and_creates_folders(tmp_path):
    sqlite = open_storage(f"sqlite:///{tmp_path}/a/b/study.db")
    assert isinstance(sqlite, RDBStorage) and (tmp_path / "a/b/study.db").is_file()
    assert sqlite.get_heartbeat_interval() and sqlite.get_heartbeat_stale_trial_callback() is not None
    assert isinstance(open_storage(tmp_path / "c/study.sqlite"), RDBStorage)
    journal = open_storage(tmp_path / "d/study.log")
    assert isinstance(journal, HeartbeatJournalStorage) and (tmp_path / "d").is_dir()
    assert journal.get_heartbeat_interval() == 30
    # an existing SQLite file is never mistaken for a journal, whatever its name
    sqlite3.connect(tmp_path / "study.bin").execute("CREATE TABLE t (x)").connection.commit()
    assert isinstance(open_storage(tmp_path / "study.bin"), RDBStorage)


def test_open_only_never_creates_a_storage(tmp_path):
    for missing, message in ((f"sqlite:///{tmp_path}/none.db", "no such SQLite file"),
                             (tmp_path / "none.db", "no such file"), (tmp_path / "run/none.log", "no such file")):
        with pytest.raises(StorageError, match=message):
            open_storage(missing, create=False)
    assert list(tmp_path.iterdir()) == []


def test_open_only_finds_a_relative_path_under_base(tmp_path, monkeypatch):
    run = tmp_path / "run"
    optuna.create_study(storage=open_storage(run / "study.db"), study_name="db")
    optuna.create_study(storage=open_storage(run / "study.log"), study_name="log")
    monkeypatch.chdir(tmp_path)
    sqlite = open_storage("study.db", create=False, base=run, heartbeat_interval=None)
    journal = open_storage("study.log", create=False, base=run, heartbeat_interval=None)
    assert isinstance(sqlite, RDBStorage) and sqlite.get_heartbeat_interval() is None
    assert type(journal) is JournalStorage  # no heartbeat: Optuna's own journal storage
    assert [s.study_name for s in journal.get_all_studies()] == ["log"]
    assert [s.study_name for s in sqlite.get_all_studies()] == ["db"]
    with pytest.raises(StorageError, match="no such file"):
        open_storage("study.log", create=False)  # without base, relative to the working folder only
