"""The daemon's state: settings, store and the domain services, shared by every RPC method."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from banger.agents.conversations import Conversations
from banger.agents.service import AgentVmService
from banger.buildinfo import code_id
from banger.config import Settings
from banger.daemon.events import EventBus
from banger.images.service import ImageService
from banger.kernels.service import KernelService
from banger.net.policy import NetPolicyService
from banger.net.service import NetworkService
from banger.security.owners import OwnerService
from banger.security.secrets import SecretVault
from banger.sessions.service import SessionService
from banger.snapshots.service import SnapshotService
from banger.store.db import Store
from banger.tunnels.service import TunnelService
from banger.vms.service import VmService
from banger.workspace.service import WorkspaceService


@dataclass
class App:
    """Everything a method handler may reach; built once at daemon start."""

    settings: Settings
    store: Store
    kernels: KernelService
    images: ImageService
    vms: VmService
    network: NetworkService
    workspaces: WorkspaceService
    tunnels: TunnelService
    sessions: SessionService
    agent_vms: AgentVmService
    conversations: Conversations
    snapshots: SnapshotService
    owners: OwnerService
    netpolicies: NetPolicyService
    secrets: SecretVault
    started_at: float = field(default_factory=time.time)
    # The code this daemon loaded (buildinfo.code_id at startup): the handshake compares the CLI's with it.
    build: str = field(default_factory=code_id)
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    events: EventBus = field(default_factory=EventBus)

    @classmethod
    def create(cls, settings: Settings, store: Store) -> App:
        """Build the services and bring them in line with what is on disk."""
        kernels = KernelService(settings, store)
        images = ImageService(settings, store)
        network = NetworkService(settings, store)
        vms = VmService(settings, store, kernels, images, network)
        sessions = SessionService(settings, store, vms)
        agent_vms = AgentVmService(sessions)
        app = cls(
            settings=settings,
            store=store,
            kernels=kernels,
            images=images,
            vms=vms,
            network=network,
            snapshots=SnapshotService(settings, store, vms),
            sessions=sessions,
            agent_vms=agent_vms,
            conversations=Conversations(agent_vms),
            workspaces=WorkspaceService(store, vms),
            tunnels=TunnelService(settings, store, vms, network),
            owners=OwnerService(store),
            netpolicies=NetPolicyService(store),
            secrets=SecretVault(settings.paths.home / "secrets"),
        )
        app.vms.on_change = lambda what, vm: app.events.publish(
            f"vm.{what}", vm=vm.name, vm_id=vm.id, state=vm.state.value, reason=vm.reason
        )
        network.policy_of = app.netpolicies.get
        agent_vms.tunnels = app.tunnels
        agent_vms.workspace_dir = app.workspaces.default_cwd
        app.kernels.reconcile()
        app.images.reconcile()
        return app
