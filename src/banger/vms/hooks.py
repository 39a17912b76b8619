"""What other services learn of a VM's life: it runs (booted, or re-adopted by a restarted daemon), it stopped."""

from __future__ import annotations

from typing import Protocol

from banger.vms.model import VmRecord


class VmHooks(Protocol):
    """Called by the VM service; a hook that fails is logged and never fails the lifecycle operation."""

    async def vm_running(self, vm: VmRecord) -> None:
        """The VM runs and its agent answered (or it was re-adopted after a daemon restart)."""

    async def vm_stopped(self, vm_id: str) -> None:
        """The VM's VMM is gone (stopped, killed, crashed) or the VM is being removed."""
