"""Fixtures for session tests: the shared installed state root of tests/vms (kernel and image from the cache)."""

from tests.vms.conftest import debian_image, debian_kernel, debian_rootfs_tar, vm_home  # noqa: F401
