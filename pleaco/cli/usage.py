"""What the user typed, beyond what argparse checks: errors exit with status 2."""

from __future__ import annotations

from pleaco.errors import InvalidInput


class UsageError(InvalidInput, ValueError, code="usage"):
    """A command line argparse accepted but pleaco cannot use."""


def parse_env(pairs: list[str]) -> dict[str, str]:
    """``--env NAME=VALUE`` flags as a dict."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {pair!r}: expected NAME=VALUE")
        env[key] = value
    return env
