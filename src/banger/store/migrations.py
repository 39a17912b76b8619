"""Schema migrations, applied in order; index+1 is the schema version (PRAGMA user_version).

Never edit a released migration: add a new one.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: kernels and images
    """
    CREATE TABLE kernels (
        name TEXT PRIMARY KEY,
        distro TEXT NOT NULL,
        arch TEXT NOT NULL,
        kernel_version TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        source TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        path TEXT NOT NULL,
        created_at TEXT NOT NULL,
        manifest TEXT NOT NULL
    );
    CREATE TABLE images (
        name TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        path TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        info TEXT NOT NULL
    );
    """,
    # 2: VMs and their IP leases
    """
    CREATE TABLE vms (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        reason TEXT,
        vmm TEXT NOT NULL,
        kernel TEXT NOT NULL REFERENCES kernels(name) ON DELETE RESTRICT,
        image TEXT NOT NULL REFERENCES images(name) ON DELETE RESTRICT,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_bytes INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        spec TEXT NOT NULL,
        runtime TEXT
    );
    CREATE TABLE ip_leases (
        ip TEXT PRIMARY KEY,
        vm_id TEXT NOT NULL UNIQUE REFERENCES vms(id) ON DELETE CASCADE,
        created_at TEXT NOT NULL
    );
    """,
    # 3: guest sessions (long-running processes inside a VM)
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        argv TEXT NOT NULL,
        state TEXT NOT NULL,
        exit_code INTEGER,
        created_at TEXT NOT NULL,
        UNIQUE (vm_id, name)
    );
    """,
    # 4: published ports (host port -> guest port); banger's nft table carries them while the VM runs
    """
    CREATE TABLE forwards (
        proto TEXT NOT NULL,
        host_port INTEGER NOT NULL,
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        guest_port INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (proto, host_port)
    );
    CREATE INDEX forwards_by_vm ON forwards(vm_id);
    """,
    # 5-10: no-ops. A pre-release build reserved these slots for the milestone-2 work streams and applied them
    # empty to some state roots (whose databases are at version 10); the real schema follows from 11 on, so those
    # databases get it too.
    "SELECT 1;",
    "SELECT 1;",
    "SELECT 1;",
    "SELECT 1;",
    "SELECT 1;",
    "SELECT 1;",
    # 11: workspaces and derived images (issue 10)
    """
    CREATE TABLE workspaces (
        vm_id TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        host_path TEXT NOT NULL,
        guest_path TEXT NOT NULL,
        guest_user TEXT NOT NULL,
        base_commit TEXT NOT NULL,
        base_ref TEXT NOT NULL,
        head_commit TEXT NOT NULL,
        branch TEXT,
        created_at TEXT NOT NULL
    );
    """,
    # 12: tunnels, publishing, SSH (issue 11). Published ports get the host address they listen on: rows from
    # before were DNAT'ed on every non-loopback address, so they become 0.0.0.0 (which now serves loopback too).
    # vm_tunnels: per-VM tunnel settings, the public keys to authorize and the pinned SSH host keys.
    """
    ALTER TABLE forwards ADD COLUMN address TEXT NOT NULL DEFAULT '0.0.0.0';
    CREATE TABLE vm_tunnels (
        vm_id TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        forward_ports TEXT NOT NULL,
        reverse TEXT NOT NULL DEFAULT '[]',
        ssh_keys TEXT NOT NULL DEFAULT '[]',
        host_keys TEXT NOT NULL DEFAULT '[]',
        sshd INTEGER
    );
    """,
    # 13: guest sessions and agent VMs (issue 12): replaces migration 3's unused sessions table. The output itself
    # lives in a bounded file per session under the VM's directory; the row is the daemon's record of the state.
    """
    DROP TABLE sessions;
    CREATE TABLE sessions (
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        command TEXT NOT NULL,
        tty INTEGER NOT NULL,
        restart TEXT NOT NULL,
        state TEXT NOT NULL,
        exit_code INTEGER,
        signal INTEGER,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        restarts INTEGER NOT NULL DEFAULT 0,
        meta TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (vm_id, name)
    );
    """,
    # 14: snapshots and clones (issue 14): a VM's saved machine (device state, RAM image, frozen disk) on disk
    """
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        vm_id TEXT,
        vm_name TEXT NOT NULL,
        vmm TEXT NOT NULL,
        vmm_version TEXT NOT NULL,
        created_at TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        implicit INTEGER NOT NULL DEFAULT 0,
        machine TEXT NOT NULL,
        info TEXT NOT NULL
    );
    """,
    # 15: security (issue 15): who owns each VM, and each VM's network policy (owned by security/owners.py)
    """
    CREATE TABLE vm_owners (
        vm_id TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        uid INTEGER NOT NULL
    );
    CREATE INDEX vm_owners_by_uid ON vm_owners(uid);
    CREATE TABLE vm_network_policy (
        vm_id TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        policy TEXT NOT NULL
    );
    """,
]
