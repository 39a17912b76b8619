"""A kernel catalog served on loopback, for pulls the UI shows (reuses the kernel tests' real HTTP server)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.kernels.pull.conftest import LoopbackServer, Route, entry_for, good_members, tar_bytes, zst


def serve_catalog(
    server: LoopbackServer, path: Path, names: list[str], filler: int = 0, chunk_delay: float = 0.0
) -> Path:
    """Write a catalog at `path` whose entries `names` are real bundles on `server` (padded by `filler` bytes)."""
    entries = []
    for name in names:
        bundle = zst(tar_bytes(good_members(os.urandom(filler))))
        url = server.add(f"/{name}.tar.zst", Route(body=bundle, chunk_delay=chunk_delay))
        entries.append(entry_for(name, url, bundle).to_json())
    path.write_text(json.dumps({"version": 1, "entries": entries}))
    return path
