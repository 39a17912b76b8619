"""Streaming runner: output lines become progress messages; failures keep the tool's error lines; timeouts kill."""

from __future__ import annotations

import threading
import time

import pytest

from banger.errors import CancelledError, ToolError
from banger.images.runner import run_streaming
from banger.progress import ProgressEvent

SCRIPT = """
echo "I: step one"
echo "E: the actual cause" >&2
for i in 1 2 3 4 5; do echo "I: cleanup $i"; done
exit 3
"""


def test_lines_streamed_and_error_lines_kept() -> None:
    events: list[ProgressEvent] = []
    with pytest.raises(ToolError) as exc:
        run_streaming(["sh", "-c", SCRIPT], step="bootstrap x", progress=events.append)
    msg = str(exc.value)
    assert msg.startswith("bootstrap x: sh exited with 3: E: the actual cause | ")
    assert msg.endswith("I: cleanup 5") and "I: step one" not in msg
    assert [e.message for e in events][:2] == ["I: step one", "E: the actual cause"]
    assert {e.step for e in events} == {"bootstrap x"}


def test_success_and_env() -> None:
    events: list[ProgressEvent] = []
    run_streaming(["sh", "-c", 'echo "$XBPS_ARCH"'], step="s", progress=events.append, env={"XBPS_ARCH": "x86_64"})
    assert [e.message for e in events] == ["x86_64"]


def test_timeout_kills_the_tool() -> None:
    started = time.monotonic()
    with pytest.raises(ToolError, match="s: sleep timed out after 0.5s"):
        run_streaming(["sleep", "30"], step="s", progress=lambda e: None, timeout=0.5)
    assert time.monotonic() - started < 10


def test_missing_tool() -> None:
    with pytest.raises(ToolError, match="not found"):
        run_streaming(["/nonexistent/tool"], step="s", progress=lambda e: None)


def test_cancel_terminates_gracefully_then_raises() -> None:
    cancel = threading.Event()
    events: list[ProgressEvent] = []

    def on_event(event: ProgressEvent) -> None:
        events.append(event)
        if event.message == "ready":
            cancel.set()

    # The tool must get SIGTERM (so mmdebstrap can unmount and remove its tempdir), not an outright SIGKILL.
    script = 'trap "echo got TERM; exit 143" TERM; echo ready; sleep 30 & wait'
    started = time.monotonic()
    with pytest.raises(CancelledError, match="bootstrap: cancelled"):
        run_streaming(["sh", "-c", script], step="bootstrap", progress=on_event, cancel=cancel)
    assert time.monotonic() - started < 10
    assert [e.message for e in events] == ["ready", "got TERM"]
