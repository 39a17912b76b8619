"""The process on the other end of the daemon's socket, as the kernel reports it (SO_PEERCRED, SO_PEERGROUPS)."""

from __future__ import annotations

import array
import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

# Not exported by Python's socket module; Linux >= 4.13 (include/uapi/asm-generic/socket.h).
SO_PEERGROUPS = 59
_MAX_GROUPS = 65536


@dataclass(frozen=True)
class Caller:
    """uid, primary gid and supplementary gids of the client process; the daemon acts for exactly these ids."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        """uid 0: may do everything, on every VM."""
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        """Whether the caller holds gid as its primary or a supplementary group."""
        return gid == self.gid or gid in self.groups

    @property
    def username(self) -> str:
        """Login name, or the uid as text when the passwd database has none."""
        return user_name(self.uid)

    @classmethod
    def of_daemon(cls) -> Caller:
        """The daemon process itself (tests and in-process callers without a socket)."""
        return cls(os.getpid(), os.getuid(), os.getgid(), tuple(os.getgroups()))

    @classmethod
    def from_socket(cls, sock: socket.socket) -> Caller:
        """Ids of the peer of a connected Unix socket, as they were when it connected."""
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        return cls(pid, uid, gid, _peer_groups(sock))


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """Supplementary groups of the peer; empty when the kernel cannot tell (then only the primary gid counts)."""
    size = 64 * 4
    while size <= _MAX_GROUPS * 4:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == 34:  # ERANGE: buffer too small for this caller's groups
                size *= 4
                continue
            return ()
        gids = array.array("I")
        gids.frombytes(raw[: len(raw) - len(raw) % 4])
        return tuple(int(g) for g in gids)
    return ()


def user_name(uid: int) -> str:
    """Login name of uid, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_id(name: str) -> int | None:
    """gid of a group name, None when no such group exists."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
