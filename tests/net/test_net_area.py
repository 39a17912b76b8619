"""network.* RPC methods and the `banger network` CLI over a real NetworkService in a namespace.

The daemon's App and the RPC socket are stood in for: the methods get an object holding the real service and a
minimal VM lookup, and the CLI's `rpc()` is routed straight to the registry. Everything under them is real.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from banger.cli import net_cmds
from banger.daemon.methods import net_area
from banger.errors import NotFoundError
from banger.net.service import NetworkService
from banger.rpc.registry import MethodRegistry
from banger.store.db import Store

from .conftest import Namespaces
from .test_service import add_vm, nft_table, run_service, store  # noqa: F401  (store is a fixture)


@dataclass
class _Vm:
    id: str
    name: str


class _Vms:
    """What net_area asks of the VM service: a VM by name, and its per-VM lock."""

    def __init__(self, db: Store) -> None:
        self.db = db
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    def get(self, name: str) -> _Vm:
        row = self.db.one("SELECT id, name FROM vms WHERE name=? OR id=?", (name, name))
        if row is None:
            raise NotFoundError(f"no VM named {name!r}")
        return _Vm(row["id"], row["name"])


def _registry(svc: NetworkService) -> MethodRegistry:
    reg = MethodRegistry()
    net_area.register(reg, SimpleNamespace(network=svc, vms=_Vms(svc.store)))  # type: ignore[arg-type]
    return reg


@pytest.mark.net
def test_methods_and_cli(netns: Namespaces, tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    vm = add_vm(store, "121212121212", "web")
    add_vm(store, "343434343434", "db")

    async def body(svc: NetworkService, ns: str) -> None:
        reg = _registry(svc)
        ip = svc.allocate(vm, "web")
        svc.allocate("343434343434", "db")
        await svc.plug(vm)

        # vm.forward moved to tunnel_area (tests/tunnels); rows published on every address are DNAT'ed here.
        svc.set_forwards(vm, [(8080, 80)])
        assert f"dnat to {ip}:80" in (nft_table(netns, ns) or "")

        status = await reg.call("network.status", None, {})
        assert [lease["vm"] for lease in status["leases"]] == ["web", "db"]
        hosted = await reg.call("network.setup_host", None, {})
        assert hosted["configured"] is False

        loop = asyncio.get_running_loop()

        def rpc(method: str, params: dict[str, Any] | None = None, **_: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(reg.call(method, None, params or {}), loop).result()

        monkeypatch.setattr(net_cmds, "rpc", rpc)
        runner = CliRunner()
        out = await asyncio.to_thread(runner.invoke, net_cmds.network, ["status"])
        assert out.exit_code == 0, out.output
        assert "banger0 172.30.77.1/24 (up)" in out.output
        assert "172.30.77.1:53 for *.vm" in out.output
        assert f"web  {ip}" in out.output
        assert "table ip banger" in out.output and f"dnat to {ip}:80" in out.output
        out = await asyncio.to_thread(runner.invoke, net_cmds.network, ["status", "--json"])
        assert json.loads(out.output)["forwards"][0]["host_port"] == 8080
        out = await asyncio.to_thread(runner.invoke, net_cmds.network, ["setup-host"])
        assert out.exit_code == 0 and "server=/vm/172.30.77.1" in out.output

    run_service(netns, tmp_path, store, body)
