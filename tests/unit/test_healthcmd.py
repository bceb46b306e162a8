"""Health commands: what a deploy may give and what the engine gets."""

from __future__ import annotations

from typing import Any

import pytest

from pleaco.apps import AppSpec, ValidationError, validate_deploy
from pleaco.healthcmd import HealthCommand, HealthCommandError, parse_health_cmd


@pytest.mark.parametrize(("given", "test"), [
    ("redis-cli ping", ("CMD-SHELL", "redis-cli ping")),
    (["redis-cli", "ping"], ("CMD", "redis-cli", "ping")),
    (["CMD", "pg_isready"], ("CMD", "pg_isready")),
    (["CMD-SHELL", "pg_isready || exit 1"], ("CMD-SHELL", "pg_isready || exit 1")),
    ({"test": "true", "interval": 1, "timeout": 0.5, "retries": 1, "start_period": 0}, ("CMD-SHELL", "true")),
])
def test_forms_a_deploy_may_give(given: Any, test: tuple[str, ...]) -> None:
    assert parse_health_cmd(given).test == test


def test_the_engine_gets_nanoseconds_and_the_spec_round_trips() -> None:
    check = parse_health_cmd({"test": ["redis-cli", "ping"], "interval": 1.5, "retries": 4})
    assert check.to_docker() == {"test": ["CMD", "redis-cli", "ping"], "interval": 1_500_000_000,
                                 "timeout": 5_000_000_000, "retries": 4, "start_period": 0}
    assert HealthCommand.from_value(check.to_value()) == check
    spec, _ = validate_deploy("cache", {"image": "pleaco/redis", "health_cmd": "redis-cli ping"}, 10)
    assert AppSpec.from_value("cache", spec.to_value()) == spec
    assert spec.health_cmd == HealthCommand(("CMD-SHELL", "redis-cli ping"))


@pytest.mark.parametrize(("given", "problem"), [
    ("", "health_cmd: the command is empty"),
    ([], "health_cmd: expected a shell line or a list"),
    (["CMD"], "health_cmd: the command is empty"),
    (["CMD-SHELL", "a", "b"], "health_cmd: CMD-SHELL takes one shell line"),
    ([1, 2], "health_cmd: expected a shell line or a list"),
    ("x" * 5000, "health_cmd: the command must be under 4096 bytes"),
    ({"test": "true", "interval": 0}, "health_cmd.interval: 0 must be"),
    ({"test": "true", "timeout": float("nan")}, "health_cmd.timeout: nan is not a number"),
    ({"test": "true", "retries": 0}, "health_cmd.retries: 0 must be"),
    ({"test": "true", "retries": True}, "health_cmd.retries: True must be"),
    ({"test": "true", "start_period": -1}, "health_cmd.start_period: -1 must be"),
    ({"test": "true", "every": 1}, "health_cmd.every: unknown field"),
])
def test_bad_commands_are_named(given: Any, problem: str) -> None:
    with pytest.raises(HealthCommandError) as exc:
        parse_health_cmd(given)
    assert str(exc.value).startswith(problem), str(exc.value)
    with pytest.raises(ValidationError, match="health_cmd"):
        validate_deploy("cache", {"image": "pleaco/redis", "health_cmd": given}, 10)


def test_a_health_path_and_a_command_are_not_both_taken() -> None:
    with pytest.raises(ValidationError, match="not both"):
        validate_deploy("web", {"image": "x", "port": 80, "health": "/h", "health_cmd": "true"}, 10)
