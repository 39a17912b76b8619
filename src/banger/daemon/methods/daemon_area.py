"""daemon.* methods: status, stop, and a cancellable sleep used to check cancellation end to end."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from banger import __version__
from banger.buildinfo import build_info
from banger.daemon.app import App
from banger.progress import ProgressEvent
from banger.rpc.registry import MethodRegistry
from banger.rpc.server import CallContext

log = logging.getLogger("banger.daemon")


def register(reg: MethodRegistry, app: App) -> None:
    @reg.method("daemon.status")
    async def status(ctx: CallContext) -> dict[str, Any]:
        """Daemon pid, version, uptime, state root and what it is doing."""
        paths = app.settings.paths
        info = build_info()
        return {
            "running": True,
            "pid": os.getpid(),
            "version": __version__,
            "commit": info.commit,
            "build_date": info.date,
            "build": app.build,
            "uptime_s": round(time.time() - app.started_at, 3),
            "home": str(paths.home),
            "socket": str(paths.socket),
            "log": str(paths.daemon_log),
            "schema_version": app.store.schema_version,
            "inflight": _inflight_calls(),
        }

    @reg.method("daemon.stop")
    async def stop(ctx: CallContext) -> dict[str, Any]:
        """Ask the daemon to shut down gracefully (in-flight calls are cancelled and cleaned up)."""
        log.info("stop requested over RPC")
        asyncio.get_running_loop().call_soon(app.stop_requested.set)
        return {"stopping": True, "pid": os.getpid()}

    @reg.method("daemon.sleep")
    async def sleep(ctx: CallContext, seconds: float = 3600.0) -> dict[str, Any]:
        """Diagnostic: sleep with progress ticks; logs its cleanup when cancelled."""
        start = time.monotonic()
        try:
            while (left := seconds - (time.monotonic() - start)) > 0:
                ctx.progress(ProgressEvent(step="sleeping", done=int(seconds - left), total=int(seconds), unit="s"))
                await asyncio.sleep(min(1.0, left))
            return {"slept": seconds}
        finally:
            log.info("daemon.sleep %s: cleanup ran after %.2fs", ctx.request_id, time.monotonic() - start)


def _inflight_calls() -> int:
    return sum(1 for t in asyncio.all_tasks() if t.get_name().startswith("rpc:")) - 1
