"""Every benchmark in bench/ still imports against today's code (a refactor once broke three of them silently:
they run by hand, not in CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BENCHES = sorted((REPO / "bench").glob("bench_*.py"))


def test_there_are_benchmarks() -> None:
    assert len(BENCHES) >= 10


@pytest.mark.parametrize("bench", BENCHES, ids=lambda p: p.stem)
def test_benchmark_imports(bench: Path) -> None:
    name = bench.stem
    code = f"import sys; sys.path.insert(0, 'bench'); import {name}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
