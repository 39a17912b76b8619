"""The daemon's RPC surface: each module registers the `<area>.<verb>` methods of one area."""

from __future__ import annotations

from banger.daemon.app import App
from banger.daemon.methods import (
    daemon_area,
    events_area,
    image_area,
    kernel_area,
    net_area,
    session_area,
    snapshot_area,
    tunnel_area,
    vm_area,
    workspace_area,
)
from banger.rpc.registry import MethodRegistry


def build_registry(app: App) -> MethodRegistry:
    """All methods, bound to the daemon's App."""
    reg = MethodRegistry()
    for area in (
        daemon_area,
        kernel_area,
        image_area,
        vm_area,
        net_area,
        events_area,
        workspace_area,
        tunnel_area,
        session_area,
        snapshot_area,
    ):
        area.register(reg, app)
    return reg
