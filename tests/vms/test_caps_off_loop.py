"""The host probe (VMM `--version` runs) happens in a thread: the daemon's event loop keeps serving meanwhile."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from banger.config import DEFAULTS, Paths, Settings
from banger.images.service import ImageService
from banger.kernels.service import KernelService
from banger.net.service import NetworkService
from banger.store.db import Store
from banger.vms.service import VmService


def test_host_probe_does_not_block_the_loop(tmp_path: Path) -> None:
    slow = tmp_path / "slow-qemu"
    slow.write_text("#!/bin/sh\nsleep 1.5\necho 'QEMU emulator version 7.2.0'\n")
    slow.chmod(0o755)
    settings = Settings(paths=Paths(tmp_path / "home"), values={**DEFAULTS, "qemu_bin": str(slow)})
    store = Store(tmp_path / "b.db")
    store.migrate()
    vms = VmService(
        settings,
        store,
        KernelService(settings, store),
        ImageService(settings, store),
        NetworkService(settings, store, upstreams=[]),
    )

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        task = asyncio.create_task(ticker())
        caps = await vms.load_caps()
        task.cancel()
        assert caps.qemu.version == "7.2.0"
        began = time.monotonic()
        assert vms.caps() is caps and await vms.load_caps() is caps, "probed once, then cached"
        assert time.monotonic() - began < 0.1
        return ticks

    try:
        assert asyncio.run(main()) >= 10, "the loop stalled while the probe ran"
    finally:
        store.close()
