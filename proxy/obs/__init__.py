"""Observability leaves: Prometheus metrics, memory readings, systemd notifications.
They import nothing of the daemon's layers."""
