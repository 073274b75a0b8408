"""Control plane: config reload, health checks, the admin server. Never on the hot path."""
