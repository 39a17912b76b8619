"""The real agent.py (as a subprocess) driven by the real AgentClient: exec, tty, signals, concurrency, ports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from banger import errors
from banger.guest import protocol
from banger.guest.client import AgentClient

from .conftest import AgentHarness, running_agent

Body = Callable[[AgentClient], Awaitable[None]]


def with_client(tmp_path: Path, body: Body) -> None:
    async def main() -> None:
        async with running_agent(tmp_path) as agent:
            await body(await agent.client())

    asyncio.run(main())


def test_health_reports_agent(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        h = await c.health()
        assert h.version == 1
        assert h.uptime > 0 and h.agent_uptime >= 0
        assert len(h.load) == 3 and h.hostname == socket.gethostname()
        assert h.pid != os.getpid()

    with_client(tmp_path, body)


def test_exec_exit_codes_and_separate_streams(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        r = await c.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
        assert (r.status.exit_code, r.status.signal) == (7, None)
        assert r.stdout == b"out\n" and r.stderr == b"err\n"
        ok = await c.run(["true"])
        assert ok.status.ok
        env = await c.run(["sh", "-c", 'echo "$FOO:$PWD"'], env={"FOO": "bar"}, cwd="/tmp")
        assert env.stdout == b"bar:/tmp\n"

    with_client(tmp_path, body)


def test_exec_stdin_is_streamed(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        r = await c.run(["tr", "a-z", "A-Z"], input=b"hello agent\n")
        assert r.stdout == b"HELLO AGENT\n"
        big = os.urandom(3 * 1024 * 1024)
        r = await c.run(["cat"], input=big)
        assert r.status.ok and r.stdout == big

    with_client(tmp_path, body)


def test_missing_command_and_cwd_are_errors(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        with pytest.raises(errors.BangerError, match="command not found: no-such-tool"):
            await c.run(["no-such-tool"])
        with pytest.raises(errors.BangerError, match="working directory does not exist"):
            await c.run(["true"], cwd="/no/such/dir")
        assert (await c.run(["true"])).status.ok  # the session survives failed requests

    with_client(tmp_path, body)


def test_tty_exec_gets_a_pty_and_resizes(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        out = bytearray()
        seen = asyncio.Event()

        def sink(data: bytes) -> None:
            out.extend(data)
            seen.set()

        script = "tty; stty size; read line; stty size"
        handle = await c.start_exec(["sh", "-c", script], tty=True, rows=24, cols=80, stdout=sink)

        async def wait_for(text: bytes) -> None:
            while text not in out:
                seen.clear()
                await asyncio.wait_for(seen.wait(), 30)

        await wait_for(b"24 80")
        await handle.resize(40, 100)
        await handle.write(b"go\n")
        await wait_for(b"40 100")
        status = await asyncio.wait_for(handle.wait(), 30)
        assert status.ok
        lines = out.decode().splitlines()
        assert lines[0].startswith("/dev/pts/")

    with_client(tmp_path, body)


def test_signal_is_forwarded(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        out = bytearray()
        ready = asyncio.Event()

        def sink(data: bytes) -> None:
            out.extend(data)
            if b"ready" in out:
                ready.set()

        script = 'trap "echo got-term; exit 3" TERM; echo ready; while :; do sleep 0.05; done'
        handle = await c.start_exec(["sh", "-c", script], stdout=sink)
        await asyncio.wait_for(ready.wait(), 30)
        await handle.signal(signal.SIGTERM)
        status = await asyncio.wait_for(handle.wait(), 30)
        assert status.exit_code == 3 and b"got-term" in out
        killed = await c.start_exec(["sleep", "30"])
        await killed.signal(signal.SIGKILL)
        assert await asyncio.wait_for(killed.wait(), 30) == type(status)(None, signal.SIGKILL)

    with_client(tmp_path, body)


def test_slow_consumer_does_not_block_other_streams(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        release = asyncio.Event()
        received = 0

        async def slow_sink(data: bytes) -> None:
            nonlocal received
            await release.wait()
            received += len(data)

        size = 4_000_000
        slow = await c.start_exec(["head", "-c", str(size), "/dev/zero"], stdout=slow_sink)
        fast = await asyncio.wait_for(c.run(["echo", "fast"]), 30)
        assert fast.stdout == b"fast\n"
        h = await asyncio.wait_for(c.health(), 30)
        assert h.version == 1
        await asyncio.sleep(0.2)
        assert received == 0
        release.set()
        status = await asyncio.wait_for(slow.wait(), 60)
        assert status.ok and received == size

    with_client(tmp_path, body)


def test_output_left_after_exit_is_not_cut_short(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        got = bytearray()

        async def slow_sink(data: bytes) -> None:
            if not got:
                # 300 kB is the 256 KiB window plus less than a pipe: the process exits at once, and the rest
                # waits for credit longer than the agent's drain grace.
                await asyncio.sleep(2.5)
            got.extend(data)

        status = await c.exec(["head", "-c", "300000", "/dev/zero"], stdout=slow_sink)
        assert status.ok and len(got) == 300000
        # A background grandchild holding stdout open does not keep the exec from finishing.
        started = time.monotonic()
        r = await c.run(["sh", "-c", "sleep 30 & echo done"])
        assert r.stdout == b"done\n" and time.monotonic() - started < 10

    with_client(tmp_path, body)


def test_failing_sink_cancels_the_process(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        marker = tmp_path / "pid"

        def bad_sink(data: bytes) -> None:
            raise RuntimeError("sink broke")

        with pytest.raises(RuntimeError, match="sink broke"):
            await c.exec(["sh", "-c", f"echo $$ > {marker}; echo hi; exec sleep 30"], stdout=bad_sink, timeout=20)
        await _wait_gone(int(marker.read_text()))
        assert (await c.run(["echo", "still"])).stdout == b"still\n"

    with_client(tmp_path, body)


def test_exec_timeout_kills_the_process(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        marker = tmp_path / "pid"
        with pytest.raises(errors.TimeoutError_):
            await c.exec(["sh", "-c", f"echo $$ > {marker}; exec sleep 30"], timeout=1.0)
        pid = int(marker.read_text())
        await _wait_gone(pid)

    with_client(tmp_path, body)


async def _wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"process {pid} is still running")


def test_exec_as_another_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root to switch users, like the agent in a guest")

    async def body(c: AgentClient) -> None:
        r = await c.run(["sh", "-c", "id -u; echo $HOME"], user="nobody")
        uid, home = r.stdout.decode().split()
        assert uid == "65534" and home == "/nonexistent"
        with pytest.raises(errors.BangerError, match="no such user"):
            await c.run(["true"], user="no-such-user-here")

    with_client(tmp_path, body)


def test_ports_lists_listeners_with_pid(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        with socket.socket() as tcp, socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            tcp.listen()
            udp.bind(("::1", 0))
            found = await c.ports()
            t = [p for p in found if p.proto == "tcp" and p.port == tcp.getsockname()[1]]
            u = [p for p in found if p.proto == "udp6" and p.port == udp.getsockname()[1]]
            assert len(t) == 1 and t[0].address == "127.0.0.1" and t[0].pid == os.getpid()
            assert len(u) == 1 and u[0].address == "::1" and u[0].pid == os.getpid()
            assert t[0].comm

    with_client(tmp_path, body)


def test_poweroff_signals_init(tmp_path: Path) -> None:
    # A sleeping process stands in for banger-init: the agent must send it SIGTERM.
    fake_init = subprocess.Popen(["sleep", "60"])

    async def main() -> int:
        async with running_agent(tmp_path, "--init-pid", str(fake_init.pid)) as agent:
            await (await agent.client()).poweroff()
            # The agent signals right after replying; tearing it down before then would race that.
            return await asyncio.to_thread(fake_init.wait, 10)

    try:
        assert asyncio.run(main()) == -signal.SIGTERM
    finally:
        fake_init.kill()
        fake_init.wait()


def test_poweroff_refused_without_init(tmp_path: Path) -> None:
    async def body(c: AgentClient) -> None:
        with pytest.raises(errors.InvalidInputError, match="not started by banger-init"):
            await c.poweroff()

    with_client(tmp_path, body)


async def _reconnect_body(agent: AgentHarness, tmp_path: Path) -> None:
    first = await agent.client()
    marker = tmp_path / "pid"
    handle = await first.start_exec(["sh", "-c", f"echo $$ > {marker}; exec sleep 60"])
    while not marker.exists() or not marker.read_text().strip():
        await asyncio.sleep(0.02)
    pid = int(marker.read_text())
    await first.close()
    with pytest.raises(errors.BangerError):
        await handle.wait()
    second = await agent.client()
    assert (await second.run(["echo", "again"])).stdout == b"again\n"
    await _wait_gone(pid)  # the old session's processes do not outlive it
    # A host that dies mid-frame leaves a torn frame behind; the next session must still get through.
    await second.close()
    reader, writer = await agent.accept()
    writer.write(b"garbage" + b'BGR1\x00\x00\x00\x10\x00\x00\x00\x00{"t":')
    await writer.drain()
    writer.close()
    third = await agent.client()
    assert (await third.health()).version == 1
    assert agent.proc.poll() is None


def test_agent_survives_host_disconnect(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_agent(tmp_path) as agent:
            await _reconnect_body(agent, tmp_path)

    asyncio.run(main())


def test_hello_after_garbage_on_same_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_agent(tmp_path) as agent:
            reader, writer = await agent.accept()
            # Half a frame header claiming a 60 KiB header: the agent must resync and still answer HELLO.
            writer.write(b"\x00\x01BGR1\x00\x00\xf0\x00\x00\x00\x00\x00")
            await writer.drain()
            client = await AgentClient.open(reader, writer, timeout=20)
            agent.clients.append(client)
            assert (await client.run(["echo", "ok"])).stdout == b"ok\n"

    asyncio.run(main())


def test_unknown_request_kinds_get_unsupported(tmp_path: Path) -> None:
    # A newer host probing an older agent (e.g. for long-running sessions) must get an answer, not silence.
    async def main() -> None:
        async with running_agent(tmp_path) as agent:
            reader, writer = await agent.accept()
            writer.write(protocol.SYNC_PADDING + protocol.encode(protocol.Kind.HELLO, 0, nonce="n1", version=1))
            header = json.dumps({"t": "session-open", "id": 5, "name": "build"}).encode()
            writer.write(struct.pack(">4sII", protocol.MAGIC, len(header), 0) + header)
            await writer.drain()
            frames: list[protocol.Frame] = []
            while not frames or frames[-1].kind != protocol.Kind.END:
                frames.append(await asyncio.wait_for(protocol.read_frame(reader), 10))
            hellos = [f.header["nonce"] for f in frames if f.kind == protocol.Kind.HELLO]
            assert sorted(hellos, key=str) == [None, "n1"]  # the agent's announcement on connecting, and our answer
            end = frames[-1]
            assert end.id == 5 and end.header["ok"] is False and end.header["error"]["code"] == "unsupported"
            writer.close()

    asyncio.run(main())


def test_reidentify_runs_the_hosts_module_text_in_the_agent(tmp_path: Path) -> None:
    # The agent runs on this host here, so the module text is a harmless one (the real reidentify.py would set the
    # host's clock and hostname); what is tested is the request: the text the host sent, its run() on a thread of
    # the agent's own process, the report as the reply, and an error in it as the request's error.
    source = (
        "import os, threading\n"
        "def run(identity):\n"
        "    main = threading.current_thread() is threading.main_thread()\n"
        "    return {'echo': identity, 'pid': os.getpid(), 'main': main}\n"
    )

    async def body(c: AgentClient) -> None:
        assert c.supports(protocol.Kind.REIDENTIFY)
        reply = await c.call(protocol.Kind.REIDENTIFY, 30, source=source, identity={"hostname": "c1"})
        health = await c.health()
        assert reply["report"] == {"echo": {"hostname": "c1"}, "pid": health.pid, "main": False}
        broken = "def run(identity):\n    raise OSError('cannot write /etc/hostname')\n"
        with pytest.raises(errors.BangerError, match="cannot write /etc/hostname"):
            await c.call(protocol.Kind.REIDENTIFY, 30, source=broken, identity={})
        with pytest.raises(errors.BangerError, match="source"):
            await c.call(protocol.Kind.REIDENTIFY, 30, identity={})
        assert (await c.health()).pid == health.pid  # the agent serves on

    with_client(tmp_path, body)
