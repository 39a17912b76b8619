"""Guest networking on the host: bridge and TAPs (links), address leases (ipam), NAT (nft) and DNS (dns)."""
