"""banger's web UI: a Starlette app run by `banger ui` as the calling user, speaking the daemon's RPC."""
