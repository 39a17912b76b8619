"""The guest kernel's command line: the kernel's own defaults, minus what banger sets itself, plus banger's."""

from __future__ import annotations

# Arguments banger adds to every guest's kernel command line: the root disk and banger's init stub.
GUEST_CMDLINE = "root=/dev/vda rw init=/sbin/banger-init"
# Used when a kernel ships no default line of its own.
FALLBACK_CMDLINE = "console=ttyS0 reboot=k panic=1"
# Keys whose value banger decides (`key=value`), and bare flags it decides; everything else is the kernel's.
_OWN_KEYS = frozenset({"root", "init"})
_OWN_FLAGS = frozenset({"rw", "ro"})


def _ours(arg: str) -> bool:
    """Whether banger sets this argument itself: exact flags and exact keys only, never a mere prefix
    (`rootwait`, `rootfstype=`, `rootflags=`, `rodata=` and `initrd=` belong to the kernel's line)."""
    key, sep, _ = arg.partition("=")
    return key in _OWN_KEYS if sep else arg in _OWN_FLAGS


def guest_cmdline(kernel_default: str | None) -> str:
    """The full command line for a guest booting a kernel whose own default line is `kernel_default`."""
    base = (kernel_default or FALLBACK_CMDLINE).split()
    return " ".join([*(a for a in base if not _ours(a)), GUEST_CMDLINE])
