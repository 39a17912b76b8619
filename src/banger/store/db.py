"""SQLite store (WAL, foreign keys on) with versioned migrations; only the daemon opens it."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from banger.errors import BangerError
from banger.store.migrations import MIGRATIONS

log = logging.getLogger("banger.store")


class SchemaTooNewError(BangerError):
    """The database was written by a newer banger."""


class Store:
    """A single SQLite connection shared by the daemon; writes go through transaction()."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.RLock()

    def close(self) -> None:
        self.conn.close()

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> list[int]:
        """Apply pending migrations, each in its own transaction; refuse a schema newer than we know."""
        current = self.schema_version
        latest = len(MIGRATIONS)
        if current > latest:
            raise SchemaTooNewError(
                f"database {self.path} has schema version {current}, newer than this banger knows ({latest}); "
                "upgrade banger or use another BANGER_HOME"
            )
        applied = []
        for version in range(current + 1, latest + 1):
            with self.transaction():
                for stmt in _split_sql(MIGRATIONS[version - 1]):
                    self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version={version}")
            log.info("store: migrated schema to version %d", version)
            applied.append(version)
        return applied

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            else:
                self.conn.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.conn.execute(sql, args).fetchall()

    def one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self.conn.execute(sql, args).fetchone()
            return row

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one write statement in its own transaction; returns rows changed."""
        with self.transaction() as conn:
            return conn.execute(sql, args).rowcount


def _split_sql(script: str) -> list[str]:
    """Split a migration script on ';' line ends (migrations hold no semicolons inside strings)."""
    return [s.strip() for s in script.split(";\n") if s.strip().strip(";")]
