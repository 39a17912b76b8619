"""Session records as the store keeps them, and the states a session moves through."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

RUNNING, EXITED, LOST = "running", "exited", "lost"


@dataclass
class SessionRecord:
    """One row of the sessions table."""

    vm_id: str
    name: str
    kind: str
    command: list[str]
    tty: bool
    restart: str
    state: str
    exit_code: int | None
    signal: int | None
    started_at: str
    ended_at: str | None
    restarts: int
    meta: dict[str, Any]

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> SessionRecord:
        return cls(
            vm_id=row["vm_id"],
            name=row["name"],
            kind=row["kind"],
            command=json.loads(row["command"]),
            tty=bool(row["tty"]),
            restart=row["restart"],
            state=row["state"],
            exit_code=row["exit_code"],
            signal=row["signal"],
            started_at=row["started_at"],
            ended_at=row["ended_at"],
            restarts=row["restarts"],
            meta=json.loads(row["meta"] or "{}"),
        )


def iso(epoch: float | None) -> str | None:
    """A guest's epoch seconds as an ISO 8601 UTC time."""
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def now() -> str:
    """The current time, ISO 8601 UTC."""
    return datetime.now(UTC).isoformat(timespec="seconds")
