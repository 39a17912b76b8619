"""banger: a microVM manager for developers and coding agents."""

__version__ = "0.1.0"
# Version of the CLI<->daemon wire protocol (checked by the rpc.hello handshake).
PROTOCOL_VERSION = 1
