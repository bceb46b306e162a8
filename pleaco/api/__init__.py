"""The HTTP API: the aiohttp server and the client the CLI uses."""
