"""Tests for banger.net: links, address allocation, nftables and DNS."""
