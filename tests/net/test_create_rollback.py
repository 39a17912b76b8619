"""A VM create that fails after its row is written leaves nothing: no row, no lease, no directory.

Real store, real NetworkService in a namespace, real root disk clone. The kernel and image services are
stand-ins that answer `get` from the rows this test inserts (a real kernel and image need minutes to make, and
only their rows matter here); the fault is a real SQLite trigger that aborts the write of the leased address
into the VM's row.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from banger.config import DEFAULTS, Paths, Settings
from banger.errors import BangerError
from banger.images.service import ImageService
from banger.kernels.service import KernelService
from banger.net.service import NetworkService
from banger.store.db import Store
from banger.vms.service import VmService

from .conftest import Namespaces


@pytest.mark.net
def test_integrity_error_after_the_row_leaves_nothing(netns: Namespaces, tmp_path: Path) -> None:
    ns = netns.new("rollback")
    settings = Settings(paths=Paths(tmp_path / "home"), values={**DEFAULTS, "subnet": "172.30.78.0/24"})
    store = Store(tmp_path / "b.db")
    store.migrate()
    image = tmp_path / "image.ext4"
    image.write_bytes(b"\0" * 65536)
    store.execute("INSERT INTO kernels VALUES ('k', 'debian', 'x86_64', '6.1', '00', 't', 0, '/x', '2026', '{}')")
    store.execute("INSERT INTO images VALUES ('i', 'test', ?, 0, '2026', '{}')", (str(image),))
    # The fault: recording the leased address in the VM's row fails, after the row and the lease exist.
    store.execute("CREATE TRIGGER inject BEFORE UPDATE OF spec ON vms BEGIN SELECT RAISE(ABORT, 'injected'); END")
    kernels, images = KernelService(settings, store), ImageService(settings, store)

    def kernel_get(name: str) -> dict[str, Any]:
        return {"name": name, "boots_on": {"qemu": True}}

    def image_get(name: str) -> dict[str, Any]:
        return {"name": name, "path": str(image)}

    kernels.get = kernel_get  # type: ignore[method-assign]
    images.get = image_get  # type: ignore[method-assign]

    async def main() -> None:
        network = NetworkService(settings, store, netns=ns, upstreams=[])
        vms = VmService(settings, store, kernels, images, network)
        try:
            with pytest.raises(BangerError):
                await vms.create(
                    name="rb",
                    image="i",
                    kernel="k",
                    vcpus=1,
                    memory_mib=256,
                    disk_size=None,
                    vmm="qemu",
                )
            assert network.available, network.reason
            assert store.query("SELECT id FROM vms") == []
            assert store.query("SELECT ip FROM ip_leases") == [], "the lease went with the row"
            assert list(settings.paths.vms.iterdir()) == [], "the VM directory went too"
            # The address is free again: the next VM gets the first one.
            store.execute("DROP TRIGGER inject")
            vm = await vms.create(name="rb", image="i", kernel="k", vcpus=1, memory_mib=256, disk_size=None, vmm="qemu")
            assert vm.spec["ip"] == "172.30.78.2"
        finally:
            await network.teardown(force=True)

    try:
        asyncio.run(main())
    finally:
        store.close()
