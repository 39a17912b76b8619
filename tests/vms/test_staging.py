"""The staging journal: a copy out cut short by a SIGKILLed daemon is removed at the next start, nothing else is."""

from __future__ import annotations

import tempfile
from pathlib import Path

from banger.vms.staging import StagingJournal


def test_sweep_removes_recorded_staging_directories_only(tmp_path: Path) -> None:
    journal = StagingJournal(tmp_path / "run" / "staging")
    staged = Path(tempfile.mkdtemp(prefix=".notes.banger-", dir=tmp_path))
    (staged / "half-written").write_bytes(b"x" * 100)
    journal.add(str(staged))
    # A recorded path that does not have the staging shape (a user's directory) is never deleted.
    mine = tmp_path / "mine"
    mine.mkdir()
    journal.add(str(mine))
    done = Path(tempfile.mkdtemp(prefix=".done.banger-", dir=tmp_path))
    journal.add(str(done))
    journal.remove(str(done))  # its copy finished: it is the copy's own to remove
    journal.sweep()
    assert not staged.exists()
    assert mine.is_dir() and done.is_dir()
    assert list((tmp_path / "run" / "staging").iterdir()) == []
