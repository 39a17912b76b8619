"""Agent VMs: the opencode server as a supervised session of kind `agent`, ready once its health endpoint answers.

The binary comes in through a cached derived image (`agent_image`: the VM's image plus the binary, built once per
image and opencode version), so nothing is copied per VM. A VM whose disk lacks it (made before that) gets it
copied in at start (`_install`). The server runs in the VM's workspace when it has one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from banger.agents import opencode
from banger.agents.provider import CredentialProxy, Provider
from banger.aio import in_thread_cancellable
from banger.errors import BangerError, InvalidInputError, NotFoundError, TimeoutError_
from banger.guest.client import AgentClient
from banger.images.derived import DerivedFile, DerivedSpec
from banger.images.service import ImageService
from banger.progress import Progress, ProgressEvent, no_progress
from banger.sessions.service import SessionService
from banger.tunnels.service import TunnelService
from banger.vms.model import VmRecord, VmState

log = logging.getLogger("banger.agents")

AGENTS = ("opencode",)
SESSION_NAME = "opencode"
PORT = 4096
PROVIDER_GUEST_PORT = 4097  # guest loopback port whose reverse tunnel reaches the VM's credential proxy
HEALTH_TIMEOUT = 900.0  # opencode needs ~30 s on an idle host under TCG; a loaded one is many times slower
SECRETS_FILE = "agent.json"
MAX_REPLY = 32 << 20
PROVIDER_ID = "banger"
# Run in the guest through the agent: GET a path of the opencode server with its password, print status and body.
_HTTP_SCRIPT = """
import base64, json, os, sys, urllib.error, urllib.request
method, port, path = sys.argv[1:4]
pw = os.environ["OPENCODE_SERVER_PASSWORD"]
body = sys.stdin.buffer.read() if method != "GET" else None
req = urllib.request.Request("http://127.0.0.1:" + port + path, data=body, method=method)
req.add_header("Authorization", "Basic " + base64.b64encode(b"opencode:" + pw.encode()).decode())
req.add_header("Content-Type", "application/json")
try:
    with urllib.request.urlopen(req, timeout=120) as r:
        sys.stdout.write(json.dumps({"status": r.status, "body": r.read().decode(errors="replace")}))
except urllib.error.HTTPError as e:
    sys.stdout.write(json.dumps({"status": e.code, "body": e.read().decode(errors="replace")}))
except OSError as e:
    sys.stdout.write(json.dumps({"status": 0, "body": str(e)}))
"""


def opencode_env(password: str, provider_url: str | None = None, model: str | None = None) -> dict[str, str]:
    """opencode's environment: its server password, its provider (banger's proxy: no key), and no self-update,
    model list, LSP or plugin downloads."""
    config: dict[str, Any] = {"$schema": "https://opencode.ai/config.json", "permission": "allow", "autoupdate": False}
    if provider_url is not None and model is not None:
        config["provider"] = {
            PROVIDER_ID: {
                "npm": "@ai-sdk/openai-compatible",
                "name": "banger provider",
                "options": {"baseURL": provider_url},
                "models": {model: {"name": model}},
            }
        }
        config["model"] = f"{PROVIDER_ID}/{model}"
    return {
        "OPENCODE_SERVER_PASSWORD": password,
        "OPENCODE_DISABLE_AUTOUPDATE": "1",
        "OPENCODE_DISABLE_MODELS_FETCH": "1",
        "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
        "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
        "OPENCODE_CONFIG_CONTENT": json.dumps(config),
        "HOME": "/root",
    }


class AgentVmService:
    """Sets up and talks to the coding agent of agent VMs."""

    def __init__(self, sessions: SessionService) -> None:
        self.sessions = sessions
        self.vms = sessions.vms
        self._proxies: dict[str, CredentialProxy] = {}
        self.tunnels: TunnelService | None = None  # set by App.create (the tunnel service is built after this one)
        self.workspace_dir: Callable[[str], str | None] | None = None  # VM name -> its workspace in the guest
        self.vms.state_listeners.append(self._vm_changed)

    def _vm_changed(self, vm: VmRecord) -> None:
        if vm.state is not VmState.RUNNING and vm.id in self._proxies:
            proxy = self._proxies.pop(vm.id)
            task = asyncio.get_running_loop().create_task(proxy.close())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def close(self) -> None:
        """At daemon stop: the provider proxies end (the key was only ever in memory)."""
        for vm_id in list(self._proxies):
            await self._proxies.pop(vm_id).close()

    async def guest_base_url(self, vm: VmRecord, provider: Provider) -> str:
        """Start the VM's credential proxy and return the URL the guest reaches it at.

        The proxy serves in-process connections only; a reverse tunnel (tunnels/service.py) makes guest
        127.0.0.1:PROVIDER_GUEST_PORT reach it through the agent channel, so it works with or without a network,
        and the provider's key stays on the host.
        """
        if self.tunnels is None:
            raise BangerError("agent VMs need the tunnel service (internal wiring error)")
        old = self._proxies.pop(vm.id, None)
        if old is not None:
            await old.close()
        proxy = CredentialProxy(provider)
        self._proxies[vm.id] = proxy
        await self.tunnels.remove_reverse(vm.id, PROVIDER_GUEST_PORT)
        await self.tunnels.add_reverse(vm.id, PROVIDER_GUEST_PORT, proxy.connect)
        return proxy.url_for("127.0.0.1", PROVIDER_GUEST_PORT)

    def _secrets_path(self, vm: VmRecord) -> Path:
        return self.vms.vm_dir(vm.id) / SECRETS_FILE

    def password(self, vm: VmRecord) -> str:
        """The opencode server password of an agent VM (kept by the daemon, mode 0600)."""
        try:
            return str(json.loads(self._secrets_path(vm).read_text())["password"])
        except (OSError, ValueError, KeyError):
            raise InvalidInputError(
                f"VM {vm.name} is not an agent VM", hint="create it with --agent opencode"
            ) from None

    def _new_password(self, vm: VmRecord) -> str:
        password = secrets.token_urlsafe(24)
        path = self._secrets_path(vm)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"agent": "opencode", "password": password}, f)
        return password

    async def binary(self, agent: str, progress: Progress = no_progress) -> opencode.OpencodeBinary:
        """The agent's pinned binary, fetched on the host and cached (see opencode.ensure_binary)."""
        if agent not in AGENTS:
            raise InvalidInputError(f"unknown agent {agent!r} (choose {', '.join(AGENTS)})")
        cache_root = self.sessions.settings.paths.cache
        return await in_thread_cancellable(
            lambda cancel: opencode.ensure_binary(cache_root, progress=progress, cancel=cancel)
        )

    async def agent_image(self, images: ImageService, base: str, agent: str, progress: Progress = no_progress) -> str:
        """The image an agent VM boots: `base` plus the agent's binary, a cached derived image."""
        binary = await self.binary(agent, progress)
        files = tuple(DerivedFile(host, guest, mode) for host, guest, mode in opencode.opencode_files(binary))
        return await images.ensure_derived(DerivedSpec(base, files=files, label=f"{base}-{agent}"), progress=progress)

    def mark(self, vm_name: str, agent: str) -> None:
        """Make a VM an agent VM whose server starts later (`setup`): after its workspace is in, for one."""
        if agent not in AGENTS:
            raise InvalidInputError(f"unknown agent {agent!r} (choose {', '.join(AGENTS)})")
        self._new_password(self.vms.get(vm_name))

    async def setup(
        self,
        vm_name: str,
        agent: str,
        *,
        workdir: str | None = None,
        provider: Provider | None = None,
        progress: Progress = no_progress,
    ) -> dict[str, Any]:
        """Install (when missing) and start the agent's server in a running VM; returns once it is healthy.

        It runs in `workdir`, by default the VM's workspace when it has one (see `workspace_dir`)."""
        binary = await self.binary(agent, progress)
        vm = self.sessions.running_vm(vm_name)
        client = await self.sessions.agent(vm)
        await self._install(client, binary, progress)
        if self.tunnels is not None:
            self.tunnels.skip_port(vm.id, PORT)  # banger's own server in the guest: never forwarded automatically
        if workdir is None and self.workspace_dir is not None:
            workdir = self.workspace_dir(vm.name)
        password = self._new_password(vm)
        url = await self.guest_base_url(vm, provider) if provider is not None else None
        with contextlib.suppress(NotFoundError):  # the server of a previous boot, lost with it
            await self.sessions.remove(vm.id, SESSION_NAME, force=True)
        progress(ProgressEvent(step="start opencode serve"))
        started = time.monotonic()
        argv = ["opencode", "serve", "--hostname", "127.0.0.1", "--port", str(PORT)]
        await self.sessions.start(
            vm.name,
            argv,
            name=SESSION_NAME,
            env=opencode_env(password, url, provider.model if provider else None),
            cwd=workdir,
            user=None,
            tty=False,
            rows=24,
            cols=80,
            restart="on-failure",
            kind="agent",
        )
        progress(ProgressEvent(step="wait for opencode health"))
        health = await self.wait_healthy(client, password, HEALTH_TIMEOUT)
        elapsed = time.monotonic() - started
        log.info("vm %s: opencode %s healthy after %.1fs", vm.name, health.get("version"), elapsed)
        return {"agent": agent, "version": health.get("version"), "healthy_after_s": round(elapsed, 1)}

    def agent_of(self, vm: VmRecord) -> str | None:
        """The coding agent of an agent VM, None for other VMs."""
        try:
            return str(json.loads(self._secrets_path(vm).read_text())["agent"])
        except (OSError, ValueError, KeyError):
            return None

    async def resume(
        self, vm_name: str, *, provider: Provider | None = None, progress: Progress = no_progress
    ) -> dict[str, Any]:
        """After an agent VM (re)started: its agent server again ({} for other VMs)."""
        vm = self.vms.get(vm_name)
        agent = self.agent_of(vm)
        if agent is None:
            return {}
        with contextlib.suppress(NotFoundError):
            if self.sessions.get(vm, SESSION_NAME).state == "running":
                return {"agent": {"agent": agent, "running": True}}  # it was running already
        return {"agent": await self.setup(vm.id, agent, provider=provider, progress=progress)}

    async def _install(self, client: AgentClient, binary: opencode.OpencodeBinary, progress: Progress) -> None:
        """Copy the binary in when the guest lacks this version (a VM whose image was not derived with it).

        Its size tells whether it is there: hashing 185 MB under TCG would cost more than the boot. The guest
        cannot gain anything by faking it (the binary runs in the guest only)."""
        for host_path, guest_path, mode in opencode.opencode_files(binary):
            check = await client.run(["stat", "-c", "%s %a", guest_path], timeout=60)
            if check.status.ok and check.stdout.split() == [
                str(host_path.stat().st_size).encode(),
                f"{mode:o}".encode(),
            ]:
                continue
            progress(ProgressEvent(step=f"copy {host_path.name} into the guest"))
            await client.put(host_path, guest_path)
            await client.run(["chmod", f"{mode:o}", guest_path], timeout=30)

    async def http(
        self, client: AgentClient, password: str, method: str, path: str, body: Any = None
    ) -> tuple[int, Any]:
        """One HTTP call to the guest's opencode server, made inside the guest through the agent."""
        data = json.dumps(body).encode() if body is not None else None
        argv = ["python3", "-c", _HTTP_SCRIPT, method, str(PORT), path]
        env = {"OPENCODE_SERVER_PASSWORD": password}  # not in argv, where every guest process could read it
        out, err = bytearray(), bytearray()

        def take(buf: bytearray) -> Callable[[bytes], None]:
            def sink(chunk: bytes) -> None:
                if len(buf) + len(chunk) > MAX_REPLY:  # the guest is untrusted: bound what we hold
                    raise BangerError(f"opencode's answer to {method} {path} exceeds {MAX_REPLY} bytes")
                buf.extend(chunk)

            return sink

        await client.exec(argv, stdin=data, env=env, stdout=take(out), stderr=take(err), timeout=300)
        done_stdout, done_stderr = bytes(out), bytes(err)
        try:
            reply = json.loads(done_stdout)
            status, text = int(reply["status"]), str(reply["body"])
        except (ValueError, KeyError):
            return 0, done_stderr.decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    async def wait_healthy(self, client: AgentClient, password: str, timeout: float) -> dict[str, Any]:
        """Poll GET /global/health through the agent until it says healthy."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            status, body = await self.http(client, password, "GET", "/global/health")
            if status == 200 and isinstance(body, dict) and body.get("healthy", True):
                return body
            last = body
            await _sleep(1.0)
        raise TimeoutError_(f"opencode did not become healthy within {timeout:.0f}s (last answer: {last!r:.200})")


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
