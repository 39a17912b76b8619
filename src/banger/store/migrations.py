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
    # 5-10: reserved for the milestone-2 work streams, so parallel branches cannot collide on a schema version.
    # Each is a no-op until its stream fills it in; none of them has been released as a no-op.
    # 5: reliability (issue 9)
    "SELECT 1;",
    # 6: workspaces and derived images (issue 10)
    "SELECT 1;",
    # 7: tunnels, publishing, SSH (issue 11)
    "SELECT 1;",
    # 8: guest sessions and agent VMs (issue 12)
    "SELECT 1;",
    # 9: snapshots and clones (issue 14)
    "SELECT 1;",
    # 10: security (issue 15): who owns each VM, and each VM's network policy (owned by security/owners.py)
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
