"""The guest side of banger and the host's way to talk to it.

Shipped to every VM on its seed drive (stdlib only, importable as plain siblings, never importing banger):
init.py (PID 1), agent.py, protocol.py (framing), execs.py, transfer.py, ports.py.
Host only: client.py (AgentClient) and seed.py (build_seed).
"""
