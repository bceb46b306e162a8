"""The reverse proxy: Caddy 2 in a container on every node, configured through its admin API."""
