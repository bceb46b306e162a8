"""Constant-rate HTTP load against the proxy on 127.0.0.1, for rollout tests.

A background thread runs an asyncio loop that starts one request every 1/rate seconds
(open loop: a slow answer does not slow the arrivals) over keep-alive connections, and
records every outcome. Bounded: it stops on ``stop()`` or after ``max_seconds``.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class LoadResult:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    bodies: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)

    @property
    def rate(self) -> float:
        return self.total / self.seconds if self.seconds else 0.0


class Load:
    def __init__(self, url: str, host: str, rate: float = 250.0, max_seconds: float = 90.0) -> None:
        self.url = url
        self.host = host
        self.rate = rate
        self.max_seconds = max_seconds
        self.result = LoadResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self._stop.set()
        self._thread.join(self.max_seconds + 30)
        return self.result

    def seen(self, greeting: str) -> int:
        """How many answers so far carried this greeting."""
        with self._lock:
            return self.result.bodies[greeting]

    async def _one(self, session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(self.url, headers={"Host": self.host}) as resp:
                body = (await resp.text()).strip()
                with self._lock:
                    if resp.status == 200:
                        self.result.ok += 1
                        # pleaco/hello answers "hello from HOST (GREETING)": count greetings.
                        self.result.bodies[body.rsplit("(", 1)[-1].rstrip(")") if "(" in body else body[:40]] += 1
                    else:
                        self.result.failures.append(f"{resp.status} {body[:80]}")
        except Exception as exc:  # every failure is recorded, none may escape
            with self._lock:
                self.result.failures.append(f"{type(exc).__name__}: {exc}")

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as session:
            started = time.monotonic()
            tasks: set[asyncio.Task[None]] = set()
            n = 0
            while not self._stop.is_set() and time.monotonic() - started < self.max_seconds:
                n += 1
                task = asyncio.create_task(self._one(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(max(0.0, started + n / self.rate - time.monotonic()))
            # The offered rate: requests started over the time spent starting them.
            self.result.seconds = time.monotonic() - started
            if tasks:
                await asyncio.gather(*tasks)
