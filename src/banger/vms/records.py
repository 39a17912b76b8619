"""Writing VM rows: the insert of a new VM, and its undoing when the rest of the creation fails."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from banger.errors import BangerError
from banger.store.db import Store
from banger.vms.model import VmRecord

if TYPE_CHECKING:
    from banger.net.service import NetworkService

log = logging.getLogger("banger.vms")


def insert(store: Store, vm: VmRecord) -> None:
    """Insert a new VM's row (sqlite3.IntegrityError on a clashing name or id, or a kernel/image gone)."""
    store.execute(
        "INSERT INTO vms (id, name, state, reason, vmm, kernel, image, vcpus, memory_mib, disk_bytes, "
        "created_at, spec, runtime) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,NULL)",
        (
            vm.id,
            vm.name,
            vm.state.value,
            None,
            vm.vmm,
            vm.kernel,
            vm.image,
            vm.vcpus,
            vm.memory_mib,
            vm.disk_bytes,
            vm.created_at,
            json.dumps(vm.spec),
        ),
    )


async def undo_insert(store: Store, network: NetworkService | None, vm_id: str) -> None:
    """Remove a just-inserted VM row with its lease and published ports, so a failed create leaves nothing.

    `network` (None for a VM without one) drops the lease's DNS name and nft rules; deleting the row removes the
    lease and port rows with it (ON DELETE CASCADE), whatever the network step managed.
    """
    try:
        if network is not None:
            await network.release(vm_id)
    except (BangerError, OSError) as exc:
        log.error("vm %s: could not release its network after a failed create: %s", vm_id, exc)
    finally:
        store.execute("DELETE FROM vms WHERE id=?", (vm_id,))
