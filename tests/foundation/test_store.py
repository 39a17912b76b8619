"""The SQLite store: WAL + foreign keys, migrations from an older schema, refusal of a newer one."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from banger.store.db import SchemaTooNewError, Store, _split_sql
from banger.store.migrations import MIGRATIONS
from tests.conftest import VENV_BIN, BangerEnv


def make_v1_db(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    for stmt in _split_sql(MIGRATIONS[0]):
        conn.execute(stmt)
    conn.execute(
        "INSERT INTO kernels VALUES ('old-k','debian','x86_64','6.1','ab'*32,'import:/x',10,'/k','2026-01-01','{}')"
    )
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()


def test_wal_and_foreign_keys(tmp_path: Path) -> None:
    store = Store(tmp_path / "b.db")
    store.migrate()
    assert store.one("PRAGMA journal_mode")[0] == "wal"  # type: ignore[index]
    assert store.one("PRAGMA foreign_keys")[0] == 1  # type: ignore[index]
    with pytest.raises(sqlite3.IntegrityError):
        store.execute(
            "INSERT INTO vms (id,name,state,vmm,kernel,image,vcpus,memory_mib,disk_bytes,created_at,spec) "
            "VALUES ('1','a','created','qemu','missing','missing',1,1,1,'now','{}')"
        )
    store.close()


def test_a_database_at_the_reserved_placeholder_version_gets_the_real_schema(tmp_path: Path) -> None:
    """A pre-release build applied versions 5-10 as empty placeholders: such a database still gets every table."""
    db = tmp_path / "b.db"
    conn = sqlite3.connect(db)
    for migration in MIGRATIONS[:4]:
        for stmt in _split_sql(migration):
            conn.execute(stmt)
    conn.execute("PRAGMA user_version=10")
    conn.commit()
    conn.close()
    store = Store(db)
    assert store.migrate() == list(range(11, len(MIGRATIONS) + 1))
    tables = {r[0] for r in store.query("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"workspaces", "vm_tunnels", "sessions", "snapshots", "vm_owners", "vm_network_policy"} <= tables
    store.close()


def test_migrates_older_schema_keeping_rows(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    make_v1_db(db)
    store = Store(db)
    applied = store.migrate()
    assert applied == list(range(2, len(MIGRATIONS) + 1))
    assert store.schema_version == len(MIGRATIONS)
    row = store.one("SELECT name, kernel_version FROM kernels")
    assert row is not None and tuple(row) == ("old-k", "6.1")
    assert store.migrate() == []  # idempotent
    store.close()


def test_newer_schema_refused(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(SchemaTooNewError, match="newer than this banger knows"):
        Store(db).migrate()


def test_daemon_migrates_at_start_and_refuses_newer(banger_env: BangerEnv) -> None:
    make_v1_db(banger_env.home / "banger.db")
    # The daemon drops records of kernels whose directory is gone; this one is there.
    (banger_env.home / "kernels" / "old-k").mkdir(parents=True)
    banger_env.cli("daemon", "start", check=True)
    status = json.loads(banger_env.cli("daemon", "status", "--json", check=True).stdout)
    assert status["schema_version"] == len(MIGRATIONS)
    banger_env.cli("daemon", "stop", check=True)
    conn = sqlite3.connect(banger_env.home / "banger.db")
    assert conn.execute("SELECT count(*) FROM kernels").fetchone()[0] == 1
    conn.execute("PRAGMA user_version=99")
    conn.close()
    proc = subprocess.run([str(VENV_BIN / "bangerd")], env=banger_env.env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "schema version 99" in proc.stderr
