"""The guest kernel command line: banger's own arguments replace exactly their namesakes, nothing more."""

from __future__ import annotations

from banger.vms.cmdline import FALLBACK_CMDLINE, GUEST_CMDLINE, guest_cmdline


def test_kernel_arguments_that_merely_start_like_ours_are_kept() -> None:
    line = "console=ttyS0 rootwait rootfstype=ext4 rootflags=data=ordered rodata=off ro root=/dev/sda1 init=/bin/sh rw"
    got = guest_cmdline(line).split()
    assert got == [
        "console=ttyS0",
        "rootwait",
        "rootfstype=ext4",
        "rootflags=data=ordered",
        "rodata=off",
        *GUEST_CMDLINE.split(),
    ]


def test_only_bangers_root_init_and_mode_remain() -> None:
    got = guest_cmdline("root=LABEL=x ro init=/sbin/init initrd=/boot/x rw quiet").split()
    assert [a for a in got if a.startswith(("root=", "init="))] == ["root=/dev/vda", "init=/sbin/banger-init"]
    assert got.count("rw") == 1 and "ro" not in got
    assert "initrd=/boot/x" in got and "quiet" in got


def test_no_default_line_uses_the_fallback() -> None:
    assert guest_cmdline(None) == f"{FALLBACK_CMDLINE} {GUEST_CMDLINE}"
    assert guest_cmdline("") == f"{FALLBACK_CMDLINE} {GUEST_CMDLINE}"
