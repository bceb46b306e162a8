"""The agent's host: one agent per data dir (and, later, systemd and releases)."""
