"""Who may use the daemon and what it does on their behalf: callers, VM owners, limits, host paths as the caller."""
