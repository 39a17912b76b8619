"""Fixtures for agent VM tests: the shared installed state root of tests/vms, plus a warm opencode cache."""

from tests.vms.conftest import debian_image, debian_kernel, debian_rootfs_tar, vm_home  # noqa: F401
