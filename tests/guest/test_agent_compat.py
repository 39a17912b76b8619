"""A newer host talks to the older agent a running VM booted with, and says plainly what that agent cannot do.

The older agents here are the real agent.py run through a small launcher that takes away what a milestone-1
agent did not have: the list of kinds in its HELLO, and (for the second) one request kind.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from banger import errors
from banger.guest.protocol import BASE_REQUEST_KINDS, Kind
from tests.guest import conftest

from .conftest import GUEST_DIR, running_agent

LAUNCHER = """
import sys
sys.path.insert(0, {guest!r})
import agent
agent.hello_extras = lambda: {{}}  # an agent from before the kinds list
for kind in {drop!r}:
    del agent.HANDLERS[agent.Kind(kind)]
sys.exit(agent.main())
"""


def older_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drop: tuple[str, ...] = ()) -> None:
    launcher = tmp_path / "old_agent.py"
    launcher.write_text(LAUNCHER.format(guest=str(GUEST_DIR), drop=list(drop)))
    monkeypatch.setattr(conftest, "AGENT", launcher)


def test_current_agent_lists_its_kinds(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_agent(tmp_path) as agent:
            client = await agent.client()
            assert client.agent_kinds is not None and BASE_REQUEST_KINDS <= client.agent_kinds
            assert client.supports(Kind.PORTS)

    asyncio.run(main())


def test_an_agent_without_a_kinds_list_gets_the_base_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    older_agent(tmp_path, monkeypatch)

    async def main() -> None:
        async with running_agent(tmp_path) as agent:
            client = await agent.client()
            assert client.agent_kinds is None
            assert (await client.run(["echo", "old"])).stdout == b"old\n"
            assert client.supports(Kind.EXEC) and not client.supports(Kind.HELLO)

    asyncio.run(main())


def test_a_request_the_older_agent_lacks_says_restart_the_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    older_agent(tmp_path, monkeypatch, drop=("ports",))

    async def main() -> None:
        async with running_agent(tmp_path) as agent:
            client = await agent.client()
            with pytest.raises(errors.UnsupportedError, match="unsupported by this VM's agent: restart the VM"):
                await client.ports()
            assert (await client.health()).version == 1, "the connection stays usable"

    asyncio.run(main())


def test_a_kind_the_agent_did_not_list_is_refused_before_sending(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_agent(tmp_path) as agent:
            client = await agent.client()
            client.agent_kinds = frozenset(client.agent_kinds or ()) - {Kind.PORTS}  # as an agent without it says
            with pytest.raises(errors.UnsupportedError, match="ports is unsupported by this VM's agent: restart"):
                await client.ports()

    asyncio.run(main())
