"""The daemon's state: settings, store and the domain services, shared by every RPC method."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from banger.config import Settings
from banger.images.service import ImageService
from banger.kernels.service import KernelService
from banger.net.policy import NetPolicyService
from banger.net.service import NetworkService
from banger.security.owners import OwnerService
from banger.security.secrets import SecretVault
from banger.store.db import Store
from banger.vms.service import VmService


@dataclass
class App:
    """Everything a method handler may reach; built once at daemon start."""

    settings: Settings
    store: Store
    kernels: KernelService
    images: ImageService
    vms: VmService
    network: NetworkService
    owners: OwnerService
    netpolicies: NetPolicyService
    secrets: SecretVault
    started_at: float = field(default_factory=time.time)
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def create(cls, settings: Settings, store: Store) -> App:
        """Build the services and bring them in line with what is on disk."""
        kernels = KernelService(settings, store)
        images = ImageService(settings, store)
        network = NetworkService(settings, store)
        app = cls(
            settings=settings,
            store=store,
            kernels=kernels,
            images=images,
            vms=VmService(settings, store, kernels, images, network),
            network=network,
            owners=OwnerService(store),
            netpolicies=NetPolicyService(store),
            secrets=SecretVault(settings.paths.home / "secrets"),
        )
        network.policy_of = app.netpolicies.get
        app.kernels.reconcile()
        app.images.reconcile()
        return app
