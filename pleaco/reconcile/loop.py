"""One shape for every loop, and the runner that owns what every loop needs.

In the manner of controller-runtime: a loop is a small class with a name, an interval and
one ``step()`` that reads the desired state, observes the real world, acts, and is safe to
run again at any moment. Everything else is the runner's:

- **waking**: ``wake()`` from any thread; wakes that arrive while a step runs are coalesced
  into one more step (and a loop may ask for a short ``settle`` wait to gather a burst);
- **timing**: a step at least every ``interval`` seconds, ``pleaco_reconcile_duration_seconds``;
- **results**: ``pleaco_reconcile_runs_total{loop,result}`` for every loop, where a step may
  name its own result (``"engine_unreachable"``) and an exception counts as ``"error"``;
- **failures**: a step that raises is logged once with its whole traceback (again only when
  the error changes, or after it recovered), and retried with exponential back-off;
- **supervision**: a loop whose task dies anyway (its ``setup`` raised) is logged, counted in
  ``pleaco_loop_restarts_total`` and started again; ``stop()`` cancels every loop and waits
  for its ``teardown``, whatever the loops raised.

Blocking calls (Docker Engine) go through ``Loop.blocking``: one executor for every loop,
handed in by the runner, so a slow engine cannot starve the default executor (which
aiohttp's resolver and others use) and no loop keeps a pool of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pleaco import logs
from pleaco.metrics import Counter, Histogram, Registry

log = logs.get("pleaco.reconcile.loop")

T = TypeVar("T")


@dataclass(frozen=True)
class RunnerConfig:
    # Threads for blocking engine calls, shared by every loop. The app loop runs up to
    # start_concurrency container actions at once; a few more keep the proxy's and the
    # status calls from queueing behind them.
    engine_threads: int = 10
    # Retry back-off after a failed step: doubling from the loop's interval up to this
    # many seconds, so a persistent fault costs one log line and one try a minute.
    max_backoff: float = 60.0
    # Wait before starting a loop again whose task died (setup failed).
    restart_delay: float = 1.0


class Loop:
    """A reconcile loop: subclasses set ``name`` and ``interval`` and implement ``step``."""

    name: str = "loop"
    interval: float = 1.0
    # Seconds to wait after being woken before stepping, to gather a burst of wakes (50
    # containers finishing their start) into one step. 0: step at once.
    settle: float = 0.0

    def __init__(self) -> None:
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -- called by anyone ----------------------------------------------------------------

    def wake(self) -> None:
        """Ask for a step soon; safe from any thread, and before the loop runs (no-op)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call (the engine's) on the runner's shared executor."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- implemented by loops ------------------------------------------------------------

    async def setup(self) -> None:
        """Before the first step (open sessions, bind sockets). Raising restarts the loop."""

    async def step(self) -> str | None:
        """One idempotent pass. Returns a result label for the metrics (None: "ok")."""
        raise NotImplementedError

    async def teardown(self) -> None:
        """After the last step, also when cancelled: release what ``setup`` took."""

    def next_wait(self) -> float:
        """Seconds until the next step when nobody wakes the loop."""
        return self.interval

    def step_bound(self, default: float) -> float:
        """Seconds one step may run before the runner calls this loop stuck (``default``:
        the agent's ``loop_stuck_after``). A loop whose step grows with its work, each
        piece bounded by a timeout of its own, says so here."""
        return default

    def wants_settle(self) -> bool:
        """Whether to wait ``settle`` seconds after a wake (e.g. only while actions run)."""
        return self.settle > 0


class LoopRunner:
    """Runs and supervises the agent's loops (see the module doc)."""

    def __init__(self, registry: Registry, cfg: RunnerConfig | None = None) -> None:
        self.cfg = cfg or RunnerConfig()
        self.loops: list[Loop] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._step_started: dict[str, float] = {}  # loop -> monotonic start of its running step
        self._stopping = False
        self.executor = ThreadPoolExecutor(self.cfg.engine_threads, thread_name_prefix="engine")
        self.m_runs = registry.register(
            Counter("pleaco_reconcile_runs_total", "Loop steps by loop and result.", ("loop", "result"))
        )
        self.m_duration = registry.register(
            Histogram("pleaco_reconcile_duration_seconds", "Duration of loop steps.", ("loop",))
        )
        self.m_restarts = registry.register(
            Counter("pleaco_loop_restarts_total", "Loops restarted after their task died.", ("loop",))
        )

    def add(self, loop: Loop) -> Loop:
        if any(existing.name == loop.name for existing in self.loops):
            raise ValueError(f"a loop named {loop.name!r} is already added")
        loop._executor = self.executor
        self.loops.append(loop)
        self.m_runs.inc(0, loop=loop.name, result="ok")  # every loop shows from the start
        return loop

    def start(self) -> None:
        for loop in self.loops:
            self._tasks[loop.name] = asyncio.create_task(self._supervise(loop), name=f"loop {loop.name}")

    async def stop(self) -> None:
        """Cancel every loop and wait for its teardown; never raises."""
        self._stopping = True
        for task in self._tasks.values():
            task.cancel()
        for name, task in self._tasks.items():
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # a loop's teardown failed: logged, the others still stop
                log.error("loop.stop_failed", exc_info=True, loop=name)
        self._tasks.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def stuck(self, now: float, after: float) -> list[str]:
        """The loops whose current step started more than ``after`` seconds (or the
        loop's own ``step_bound``) before ``now`` (``time.monotonic()``): hung on
        something that never answers. A loop waiting for its next step, or backing off,
        is not stuck; builds run in the build service's own pools, outside its step, so a
        long build does not count."""
        loops = {loop.name: loop for loop in self.loops}
        return sorted(name for name, started in self._step_started.items()
                      if now - started > after and now - started > loops[name].step_bound(after))

    async def _supervise(self, loop: Loop) -> None:
        while True:
            try:
                await self._run(loop)
                return  # only a cancelled loop ends; _run never returns otherwise
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    raise  # its teardown failed as it stopped: stop() logs it, nothing restarts
                self.m_restarts.inc(loop=loop.name)
                log.error("loop.died", exc_info=True, loop=loop.name, error=str(exc),
                          restart_s=self.cfg.restart_delay)
                await asyncio.sleep(self.cfg.restart_delay)

    async def _run(self, loop: Loop) -> None:
        loop._loop = asyncio.get_running_loop()
        await loop.setup()
        failures = 0
        last_error = ""
        try:
            while True:
                loop._wake.clear()
                started = time.monotonic()
                wait = loop.next_wait()
                self._step_started[loop.name] = started
                try:
                    result = await loop.step() or "ok"
                    if failures:
                        log.info("loop.recovered", loop=loop.name, failures=failures)
                    failures, last_error = 0, ""
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    result = "error"
                    failures += 1
                    error = f"{type(exc).__name__}: {exc}"
                    if error != last_error:  # once per distinct error, with the whole stack
                        log.error("loop.step_failed", exc_info=True, loop=loop.name, error=error,
                                  failures=failures)
                        last_error = error
                    wait = min(self.cfg.max_backoff, max(loop.interval, 0.1) * 2.0 ** min(failures - 1, 16))
                finally:
                    self._step_started.pop(loop.name, None)
                    self.m_duration.observe(time.monotonic() - started, loop=loop.name)
                self.m_runs.inc(loop=loop.name, result=result)
                if failures:
                    # Backing off: a wake does not cut it short, or a store write per second
                    # would retry a broken step once a second.
                    await asyncio.sleep(wait)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(loop._wake.wait(), wait)
                if loop._wake.is_set() and loop.wants_settle():
                    await asyncio.sleep(loop.settle)
        finally:
            await loop.teardown()
