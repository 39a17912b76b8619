"""Who owns each VM (the uid that created it): the one service over the `vm_owners` table."""

from __future__ import annotations

from banger.store.db import Store

ROOT_UID = 0


class OwnerService:
    """VM id -> owner uid. A VM without a row (made before owners existed) belongs to root."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def assign(self, vm_id: str, uid: int) -> None:
        """Record (or change) a VM's owner."""
        self.store.execute(
            "INSERT INTO vm_owners (vm_id, uid) VALUES (?, ?) ON CONFLICT(vm_id) DO UPDATE SET uid = excluded.uid",
            (vm_id, uid),
        )

    def owner(self, vm_id: str) -> int:
        """The uid owning vm_id (root when none was recorded)."""
        recorded = self.recorded(vm_id)
        return ROOT_UID if recorded is None else recorded

    def recorded(self, vm_id: str) -> int | None:
        """The recorded owner of vm_id, None when there is no record."""
        row = self.store.one("SELECT uid FROM vm_owners WHERE vm_id = ?", (vm_id,))
        return int(row["uid"]) if row else None

    def owned_by(self, uid: int) -> set[str]:
        """Ids of the VMs uid owns."""
        rows = self.store.query("SELECT vm_id FROM vm_owners WHERE uid = ?", (uid,))
        return {str(r["vm_id"]) for r in rows}

    def all(self) -> dict[str, int]:
        """Every recorded VM id -> owner uid."""
        return {str(r["vm_id"]): int(r["uid"]) for r in self.store.query("SELECT vm_id, uid FROM vm_owners")}
