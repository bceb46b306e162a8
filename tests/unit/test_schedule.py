"""The tick/claim rule of scheduled jobs (pleaco/stacks/schedule.py): who claims a tick,
which unfinished runs are orphans, and schedules' input checks."""

from __future__ import annotations

import pytest

from pleaco.stacks.cron import CronError
from pleaco.stacks.jobs import JobInputError
from pleaco.stacks.schedule import Run, decide_claim, is_orphan, parse_schedule


def test_only_the_owner_claims_a_matching_tick_without_a_record() -> None:
    assert decide_claim(None, owner=True, matches=True)
    assert not decide_claim(None, owner=False, matches=True)
    assert not decide_claim(None, owner=True, matches=False)
    # A tick with a record, whatever its state (a runner that died), is never started again.
    for state in ("claimed", "running", "failed", "succeeded"):
        assert not decide_claim({"node": "a", "state": state}, owner=True, matches=True)


def run(node: str, state: str) -> Run:
    return Run("web", "backup", 7, node, state)


def test_orphans() -> None:
    live = ["me", "b"]
    assert is_orphan(run("gone", "running"), "me", live, False) == "node gone running it is gone"
    assert is_orphan(run("gone", "claimed"), "me", live, False) is not None
    assert is_orphan(run("b", "running"), "me", live, False) is None  # alive: it may finish
    assert is_orphan(run("me", "running"), "me", live, True) is None  # this node runs it now
    assert is_orphan(run("me", "running"), "me", live, False) == "the agent running it restarted"
    assert is_orphan(run("gone", "succeeded"), "me", live, False) is None
    assert is_orphan(run("gone", "failed"), "me", live, False) is None


def test_schedule_input() -> None:
    s = parse_schedule("web", "backup", {"cron": "*/5 * * * *", "command": ["sh", "-c", "echo"]})
    assert s.to_value() == {"cron": "*/5 * * * *", "command": ["sh", "-c", "echo"], "source": "api"}
    with pytest.raises(CronError, match="hour"):
        parse_schedule("web", "backup", {"cron": "0 25 * * *", "command": ["true"]})
    with pytest.raises(JobInputError, match="job name"):
        parse_schedule("web", "Back_up", {"cron": "* * * * *", "command": ["true"]})
    with pytest.raises(JobInputError, match="command"):
        parse_schedule("web", "backup", {"cron": "* * * * *", "command": []})
    with pytest.raises(JobInputError, match="body"):
        parse_schedule("web", "backup", {"cron": "* * * * *"})
