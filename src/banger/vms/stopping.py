"""Stopping a VMM within one deadline: the agent's clean power-off first, the VMM's own way next, then SIGKILL.

`vm stop --timeout T` promises an answer within T seconds plus the moment a SIGKILL takes: every step below
draws from the same budget, so an agent that hangs or a guest that ignores the request cannot stretch it.
"""

from __future__ import annotations

import asyncio
import logging

from banger.drivers import process
from banger.drivers.base import StopOutcome, VmmDriver, VmmHandle
from banger.errors import BangerError
from banger.vms.agents import AgentEndpoint, AgentPool

log = logging.getLogger("banger.vms")

# At most this much of the budget goes to reaching the agent and handing it the request.
AGENT_SHARE = 5.0


async def stop_vmm(
    driver: VmmDriver, handle: VmmHandle, agents: AgentPool, vm_id: str, endpoint: AgentEndpoint, timeout: float
) -> StopOutcome:
    """Shut the guest down within `timeout` seconds, killing the VMM when the budget is spent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(timeout, 0.0)

    def left() -> float:
        return max(deadline - loop.time(), 0.0)

    asked = False
    try:
        async with asyncio.timeout(min(AGENT_SHARE, left())):
            client = await agents.get(vm_id, endpoint, min(AGENT_SHARE, left()))
            await client.poweroff(timeout=None)
        asked = True
    except (BangerError, OSError, TimeoutError) as exc:
        log.info("vm %s: the agent could not take the power-off request (%s)", vm_id, exc or type(exc).__name__)
    if asked:
        if await process.wait_exit(handle, left()):
            process.remove_sockets(handle)
            return StopOutcome.GRACEFUL
        log.info("vm %s: the guest did not power off within %ss; killing its VMM", vm_id, timeout)
    elif left() > 0:
        try:
            async with asyncio.timeout(left()):
                return await driver.stop(handle, left())
        except TimeoutError:
            log.info("vm %s: no clean stop within %ss; killing its VMM", vm_id, timeout)
    await driver.kill(handle)
    return StopOutcome.KILLED
