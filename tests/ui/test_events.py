"""daemon.events: the bus's bounded queues, `banger events`, and the UI's relay of it as server-sent events."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

from banger.daemon.events import EventBus
from tests.conftest import BangerEnv
from tests.kernels.pull.conftest import LoopbackServer, http_server  # noqa: F401  (fixture)
from tests.ui.catalog import serve_catalog
from tests.ui.conftest import run_ui


def test_a_slow_subscriber_loses_events_with_a_marker_instead_of_growing() -> None:
    async def scenario() -> list[dict[str, object]]:
        bus = EventBus(queue_max=3)
        with bus.subscribe() as sub:
            for i in range(10):
                bus.publish("tick", n=i)
            got = [await sub.get() for _ in range(4)]
            bus.publish("tick", n=10)
            got.append(await sub.get())
        bus.publish("tick", n=11)  # nobody listens any more: nothing is kept
        return got

    got = asyncio.run(scenario())
    assert [e.get("n") for e in got[:3]] == [0, 1, 2]
    assert got[3]["type"] == "lost" and got[3]["count"] == 7
    assert got[4]["n"] == 10


def _wait_subscribed(benv: BangerEnv, calls: int) -> None:
    """Until the daemon runs `calls` streaming calls (daemon.status counts its own call out)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = json.loads(benv.cli("daemon", "status", "--json", check=True).stdout)
        if status["inflight"] >= calls:
            return
        time.sleep(0.1)
    raise AssertionError("the event subscription never started")


def test_events_cli_and_ui_stream_kernel_pull_progress(
    daemon: BangerEnv,
    tmp_path: Path,
    http_server: LoopbackServer,  # noqa: F811
) -> None:
    daemon.env["BANGER_CATALOG"] = str(serve_catalog(http_server, tmp_path / "c.json", ["k1"], filler=4 << 20))
    with run_ui(daemon, tmp_path / "xdg") as ui, ui.client() as client:
        watcher = daemon.popen("events", "--json")
        try:
            with client.stream("GET", "/api/events") as sse:
                lines = sse.iter_lines()
                assert next(lines).startswith("retry:")
                _wait_subscribed(daemon, 2)
                daemon.cli("kernel", "pull", "k1", check=True)
                relayed = []
                for line in lines:
                    if line.startswith("data: "):
                        relayed.append(json.loads(line.removeprefix("data: ")))
                        if relayed[-1]["type"] == "op.done":
                            break
            assert relayed[0]["type"] == "subscribed"
            assert relayed[1] == {**relayed[1], "type": "op.start", "op": "kernel.pull", "name": "k1"}
            progress = [e for e in relayed if e["type"] == "op.progress" and e["unit"] == "B" and e["total"]]
            assert progress and progress[-1]["done"] == progress[-1]["total"] >= 4 << 20
            assert relayed[-1]["ok"] is True and relayed[-1]["error"] is None
            assert watcher.stdout is not None
            printed = []
            while not printed or printed[-1]["type"] != "op.done":
                printed.append(json.loads(watcher.stdout.readline()))
            assert [e["type"] for e in printed] == [e["type"] for e in relayed[1:]]
        finally:
            watcher.send_signal(signal.SIGINT)
            watcher.wait(20)
        assert watcher.returncode == 0


def test_events_cli_prints_readable_lines(daemon: BangerEnv, tmp_path: Path, http_server: LoopbackServer) -> None:  # noqa: F811
    daemon.env["BANGER_CATALOG"] = str(serve_catalog(http_server, tmp_path / "c.json", ["k1"]))
    watcher = daemon.popen("events")
    try:
        _wait_subscribed(daemon, 1)
        daemon.cli("kernel", "pull", "k1", check=True)
        daemon.cli("kernel", "pull", "nope")
        assert watcher.stdout is not None
        lines = [watcher.stdout.readline() for _ in range(2)]
        assert "op.start" in lines[0] and "kernel.pull k1" in lines[0]
        rest = ""
        while "op.done" not in rest:
            rest = watcher.stdout.readline()
        assert rest.rstrip().endswith("kernel.pull k1 ok")
        failed = watcher.stdout.readline() + watcher.stdout.readline()
        assert "kernel.pull nope failed: no kernel 'nope' in catalog" in failed
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.wait(20)
