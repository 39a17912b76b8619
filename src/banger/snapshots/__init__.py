"""Snapshots of running VMs and the clones made from them."""
