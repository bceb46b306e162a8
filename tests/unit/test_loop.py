"""The loop runner: metrics for every loop, errors logged once with their traceback and
retried with back-off, wakes coalesced, dead loops restarted, and a stop that always
finishes."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from pleaco import logs
from pleaco.metrics import Registry
from pleaco.reconcile.loop import Loop, LoopRunner, RunnerConfig


class Counting(Loop):
    name = "counting"
    interval = 60.0

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self.torn_down = False

    async def step(self) -> str | None:
        self.steps += 1
        return None

    async def teardown(self) -> None:
        self.torn_down = True


class Failing(Loop):
    name = "failing"
    interval = 0.01

    def __init__(self, fail_times: int) -> None:
        super().__init__()
        self.fail_times = fail_times
        self.steps = 0

    async def step(self) -> str | None:
        self.steps += 1
        if self.steps <= self.fail_times:
            raise ValueError("broken on purpose")
        return "engine_unreachable" if self.steps == self.fail_times + 1 else None


class DiesInSetup(Loop):
    name = "dies"
    interval = 60.0

    def __init__(self) -> None:
        super().__init__()
        self.setups = 0

    async def setup(self) -> None:
        self.setups += 1
        if self.setups == 1:
            raise RuntimeError("setup failed once")

    async def step(self) -> str | None:
        return None


POLL = 0.005  # seconds between looks at a condition (polled with a deadline)


async def until(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(POLL)


def metric(registry: Registry, line_start: str) -> float:
    for line in registry.render().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_every_loop_shows_in_the_metrics_and_a_failing_step_is_logged_with_its_traceback_and_retried(
        caplog: pytest.LogCaptureFixture) -> None:
    logs.setup("info")
    logging.getLogger("pleaco").propagate = True  # let caplog see the records
    registry = Registry()
    runner = LoopRunner(registry, RunnerConfig(max_backoff=0.05))
    counting, failing = Counting(), Failing(fail_times=3)
    runner.add(counting)
    runner.add(failing)

    async def main() -> None:
        runner.start()
        await until(lambda: failing.steps >= 5 and counting.steps >= 1)
        await runner.stop()

    with caplog.at_level(logging.ERROR, logger="pleaco"):
        asyncio.run(main())
    logging.getLogger("pleaco").propagate = False
    assert metric(registry, 'pleaco_reconcile_runs_total{loop="counting",result="ok"}') >= 1
    assert metric(registry, 'pleaco_reconcile_runs_total{loop="failing",result="error"}') == 3
    assert metric(registry, 'pleaco_reconcile_runs_total{loop="failing",result="engine_unreachable"}') == 1
    assert metric(registry, 'pleaco_reconcile_runs_total{loop="failing",result="ok"}') >= 1
    failed = [r for r in caplog.records if r.getMessage() == "loop.step_failed"]
    assert len(failed) == 1  # once per distinct error, not once per retry
    assert failed[0].exc_info is not None and failed[0].exc_info[0] is ValueError
    assert counting.torn_down


def test_wakes_are_coalesced_and_step_the_loop_soon() -> None:
    runner = LoopRunner(Registry())
    counting = Counting()
    runner.add(counting)

    async def main() -> None:
        runner.start()
        await until(lambda: counting.steps == 1)
        for _ in range(50):
            counting.wake()
        await until(lambda: counting.steps >= 2)
        counting.wake()  # one more: had the 50 not been coalesced, this would not be step 3
        await until(lambda: counting.steps >= 3)
        steps = counting.steps
        await runner.stop()
        assert steps == 3

    asyncio.run(main())


def test_a_loop_whose_task_dies_is_restarted_and_counted() -> None:
    registry = Registry()
    runner = LoopRunner(registry, RunnerConfig(restart_delay=0.01))
    dies = DiesInSetup()
    runner.add(dies)

    async def main() -> None:
        runner.start()
        await until(lambda: dies.setups == 2 and metric(registry, 'pleaco_reconcile_runs_total{loop="dies"') > 0)
        await runner.stop()

    asyncio.run(main())
    assert metric(registry, 'pleaco_loop_restarts_total{loop="dies"}') == 1


def test_two_loops_of_one_name_are_refused() -> None:
    runner = LoopRunner(Registry())
    runner.add(Counting())
    with pytest.raises(ValueError, match="counting"):
        runner.add(Counting())


class BrokenTeardown(Counting):
    name = "broken-teardown"

    async def teardown(self) -> None:
        raise RuntimeError("teardown failed")


def test_stop_finishes_and_tears_every_loop_down_whatever_one_raises(caplog: pytest.LogCaptureFixture) -> None:
    logs.setup("info")
    logging.getLogger("pleaco").propagate = True
    runner = LoopRunner(Registry())
    broken, fine = BrokenTeardown(), Counting()
    runner.add(broken)
    runner.add(fine)

    async def main() -> None:
        runner.start()
        await until(lambda: broken.steps >= 1 and fine.steps >= 1)
        await runner.stop()  # must not raise

    with caplog.at_level(logging.ERROR, logger="pleaco"):
        asyncio.run(main())
    logging.getLogger("pleaco").propagate = False
    assert fine.torn_down
    assert [r.getMessage() for r in caplog.records] == ["loop.stop_failed"]


class Hanging(Loop):
    """A loop whose second step never returns (an engine call that never answers)."""

    name = "hanging"
    interval = 0.01

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    async def step(self) -> str | None:
        self.steps += 1
        if self.steps >= 2:
            await asyncio.Event().wait()
        return None


def test_stuck_names_only_the_loop_whose_step_has_run_longer_than_the_bound() -> None:
    async def main() -> None:
        runner = LoopRunner(Registry())
        hanging, idle = runner.add(Hanging()), runner.add(Counting())
        runner.start()
        try:
            await until(lambda: hanging.steps >= 2 and idle.steps >= 1)
            now = time.monotonic()  # the clock is an argument: the bound is passed without waiting
            assert runner.stuck(now, after=60.0) == []  # the step started just now
            assert runner.stuck(now + 61.0, after=60.0) == ["hanging"]  # idle waits for its next step: not stuck
        finally:
            await runner.stop()
        assert runner.stuck(time.monotonic() + 1e6, after=60.0) == []  # a stopped loop runs no step

    asyncio.run(main())


def test_a_loop_whose_step_grows_with_its_work_is_stuck_only_past_its_own_bound() -> None:
    class Polling(Hanging):
        name = "poll"

        def step_bound(self, default: float) -> float:
            return default + 5 * 120.0  # five repositories, each up to its git timeout

    async def main() -> None:
        runner = LoopRunner(Registry())
        poll = runner.add(Polling())
        runner.start()
        try:
            await until(lambda: poll.steps >= 2)
            now = time.monotonic()
            assert runner.stuck(now + 61.0, after=60.0) == []
            assert runner.stuck(now + 661.0, after=60.0) == ["poll"]
        finally:
            await runner.stop()

    asyncio.run(main())
