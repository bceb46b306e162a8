"""HTTP health probes of app replicas."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp

# The probe's shape, for whoever takes it as a parameter (the app loop; unit tests hand it
# pleaco.runtime.memory.MemoryEngine.probe): (session, host, port, path, timeout) -> passed.
Probe = Callable[[aiohttp.ClientSession, str, int, str, float], Awaitable[bool]]


async def probe(session: aiohttp.ClientSession, host: str, port: int, path: str, timeout: float) -> bool:
    """True when GET http://host:port/path answers 2xx or 3xx within ``timeout`` seconds."""
    try:
        async with session.get(
            f"http://{host}:{port}{path}",
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as resp:
            return 200 <= resp.status < 400
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False
