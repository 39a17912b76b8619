"""`bangerd`: the daemon. Startup, main loop and shutdown are explicit phases."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from banger import __version__
from banger.config import Settings
from banger.daemon import runner
from banger.daemon.app import App
from banger.daemon.lock import DaemonLock
from banger.daemon.methods import build_registry
from banger.drivers import cgroups
from banger.errors import BangerError
from banger.rpc.server import RpcServer
from banger.security.access import AccessPolicy
from banger.security.secrets import install_redaction
from banger.security.stateroot import open_to_group
from banger.store.db import Store

log = logging.getLogger("banger.daemon")

# How long the services' own shutdown (watchers, agent connections, DNS) may take once calls are done.
SERVICES_GRACE = 10.0


def setup_logging(path: Path, level: str, to_stderr: bool) -> None:
    """Log to a file under the state root (and stderr when asked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(path)]
    if to_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    install_redaction(root)  # no secret value reaches the log, whoever logs it
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


class Daemon:
    """bangerd's lifecycle: startup() -> main_loop() -> shutdown()."""

    def __init__(self, settings: Settings, ready_fd: int | None = None) -> None:
        self.settings = settings
        self.paths = settings.paths
        self.ready_fd = ready_fd
        self.lock = DaemonLock(self.paths.lock)
        self.store: Store | None = None
        self.server: RpcServer | None = None
        self.app: App | None = None
        self._signals = 0

    async def startup(self) -> None:
        self.paths.ensure()
        self.lock.acquire()
        log.info("bangerd %s starting (pid %d, home %s)", __version__, os.getpid(), self.paths.home)
        self.store = Store(self.paths.db)
        self.store.migrate()
        self.app = App.create(self.settings, self.store)
        await self.app.vms.reconcile()
        await self.app.sessions.reconcile()
        with contextlib.suppress(OSError):
            cgroups.collect()  # groups of VMMs that ended while no daemon ran
        policy = AccessPolicy(self.settings, self.app.vms, self.app.owners)
        gid = policy.gid if os.geteuid() == 0 else None
        open_to_group(self.paths, gid)
        self.server = RpcServer(build_registry(self.app), build=self.app.build, middleware=policy, admit=policy.admit)
        await self.server.start(self.paths.socket, group=gid)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        log.info("listening on %s", self.paths.socket)
        self._notify_ready()

    def _notify_ready(self) -> None:
        if self.ready_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"ready\n")
            os.close(self.ready_fd)
        self.ready_fd = None

    def _on_signal(self, sig: int) -> None:
        # First signal: graceful stop. Second: leave now, cleanup or not.
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting immediately", signal.Signals(sig).name)
            os._exit(1)
        log.info("%s received: shutting down", signal.Signals(sig).name)
        assert self.app is not None
        self.app.stop_requested.set()

    async def main_loop(self) -> None:
        assert self.app is not None
        await self.app.stop_requested.wait()

    async def shutdown(self) -> None:
        if self.server is not None:
            await self.server.stop(self.paths.socket)
        if self.app is not None:
            try:
                async with asyncio.timeout(SERVICES_GRACE):
                    await self.app.tunnels.close()
                    await self.app.agent_vms.close()
                    await self.app.sessions.close()
                    await self.app.snapshots.close()
                    await self.app.vms.close()
            except TimeoutError:
                log.error("VM watchers and agent connections did not close within %ss", SERVICES_GRACE)
        if self.store is not None:
            self.store.close()
        if self.app is not None:
            log.info("bangerd stopped")
        self.lock.release()

    async def run(self) -> None:
        try:
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()


def main(argv: list[str] | None = None) -> None:
    """Entry point of `bangerd` (runs in the foreground)."""
    parser = argparse.ArgumentParser(prog="bangerd", description="banger daemon (runs in the foreground)")
    parser.add_argument("--ready-fd", type=int, default=None, help="write 'ready' to this fd once serving")
    parser.add_argument("--debug", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"bangerd {__version__}")
    args = parser.parse_args(argv)
    try:
        settings = Settings.load()
    except BangerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    level = "debug" if args.debug else str(settings.get("log_level"))
    setup_logging(settings.paths.daemon_log, level, to_stderr=sys.stderr.isatty())
    daemon = Daemon(settings, ready_fd=args.ready_fd)
    try:
        clean = runner.run(daemon.run())
    except BangerError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    if not clean:
        # A worker thread is stuck in a blocking call: the interpreter would wait for it at exit, forever.
        logging.shutdown()
        os._exit(0)


if __name__ == "__main__":
    main()
