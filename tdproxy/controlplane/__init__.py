"""Control plane: everything off the hot path (health checks, admin server, config watcher)."""
