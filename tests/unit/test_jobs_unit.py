"""One-off jobs' command validation (pleaco.stacks.jobs); the jobs themselves run against
the real engine in tests/integration/test_jobs.py."""

from __future__ import annotations

import pytest

from pleaco.stacks.jobs import MAX_ARGS, MAX_COMMAND_BYTES, JobInputError, validate_command


def test_a_command_is_a_list_of_strings() -> None:
    assert validate_command({"command": ["sh", "-c", "echo hi"]}) == ("sh", "-c", "echo hi")


@pytest.mark.parametrize(("body", "named"), [
    (["true"], "body"),
    ({"command": ["true"], "tty": True}, "body"),
    ({"command": []}, "non-empty"),
    ({"command": "true"}, "non-empty list"),
    ({"command": ["a\x00b"]}, "NUL"),
    ({"command": ["x", 5]}, "argument 5"),
    ({"command": ["\ud800"]}, "UTF-8"),
    ({"command": ["x"] * (MAX_ARGS + 1)}, f"at most {MAX_ARGS}"),
    ({"command": ["x" * (MAX_COMMAND_BYTES + 1)]}, f"limit of {MAX_COMMAND_BYTES}"),
])
def test_bad_commands_are_named(body: object, named: str) -> None:
    with pytest.raises(JobInputError, match=named):
        validate_command(body)
