"""The daemon's state: settings, store and the domain services, shared by every RPC method."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from banger.config import Settings
from banger.store.db import Store


@dataclass
class App:
    """Everything a method handler may reach; built once at daemon start."""

    settings: Settings
    store: Store
    started_at: float = field(default_factory=time.time)
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
