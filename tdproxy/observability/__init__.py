"""Observability: access log, metrics, logging set-up."""
