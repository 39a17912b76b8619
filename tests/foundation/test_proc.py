"""The subprocess choke point: tool errors carry the tool's words; cancellation kills the child promptly."""

from __future__ import annotations

import threading
import time

import pytest

from banger import proc
from banger.errors import CancelledError, ToolError


def test_failure_quotes_the_tool() -> None:
    with pytest.raises(ToolError, match=r"unpack: sh exited with 3: boom"):
        proc.run(["sh", "-c", "echo boom >&2; exit 3"], step="unpack")


def test_cancel_on_kills_a_running_child() -> None:
    event = threading.Event()
    result: dict[str, object] = {}

    def work() -> None:
        start = time.monotonic()
        try:
            with proc.cancel_on(event):
                proc.run(["sleep", "30"])
        except CancelledError as exc:
            result["error"] = exc
        result["took"] = time.monotonic() - start

    t = threading.Thread(target=work)
    t.start()
    time.sleep(0.3)
    event.set()
    t.join(10)
    assert isinstance(result.get("error"), CancelledError)
    assert float(result["took"]) < 5  # type: ignore[arg-type]


def test_cancel_on_passes_input_and_output_through() -> None:
    with proc.cancel_on(threading.Event()):
        out = proc.run(["sh", "-c", "sleep 0.5; cat"], input=b"x" * 200_000)
    assert out.stdout == b"x" * 200_000
