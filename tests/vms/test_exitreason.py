"""The reason recorded for a VMM that exited on its own, read from the guest's last console lines."""

from __future__ import annotations

from banger.vms import exitreason

PANIC = "[   30.694703] Kernel panic - not syncing: sysrq triggered crash"


def test_a_panic_far_above_the_end_of_its_trace_is_found() -> None:
    tail = "\n".join(["boot line"] * 50 + [PANIC] + [f"[   30.698385]  trace line {i}" for i in range(60)])
    reason = exitreason.from_console(tail)
    assert reason.startswith(exitreason.UNEXPECTED) and "Kernel panic - not syncing" in reason


def test_no_crash_on_the_console_is_the_plain_reason() -> None:
    assert exitreason.from_console("banger-agent: listening\n") == exitreason.UNEXPECTED
