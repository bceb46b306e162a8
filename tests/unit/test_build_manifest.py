"""pleaco.toml parsing: every field, and errors that name the field."""

from __future__ import annotations

import pytest

from pleaco.builds.manifest import Manifest, ManifestError, parse

FULL = """
[app]
name = "hello"
[build]
dockerfile = "docker/Dockerfile"
args = { VERSION = "1.2" }
[test]
command = ["sh", "-c", "./run-tests"]
timeout = 30
[run]
port = 8080
health = "/healthz"
replicas = 2
[scale]
min = 1
max = 10
target_concurrency = 50
[scan]
fail_on = "high"
"""


def test_full_manifest() -> None:
    m = parse(FULL)
    assert m == Manifest(name="hello", dockerfile="docker/Dockerfile", build_args={"VERSION": "1.2"},
                         test_command=["sh", "-c", "./run-tests"], test_timeout=30.0, port=8080, health="/healthz",
                         replicas=2, scale_min=1, scale_max=10, target_concurrency=50, fail_on="high")


def test_defaults_and_string_command() -> None:
    m = parse('[test]\ncommand = "make test"\n')
    assert m.test_command == ["sh", "-c", "make test"]
    assert m.dockerfile == "Dockerfile" and m.fail_on == "critical" and m.port is None
    assert parse("") == Manifest()


@pytest.mark.parametrize(("text", "message"), [
    ("[tset]\ncommand = 'x'", "unknown table [tset]"),
    ("[test]\ncomand = ['x']", "[test] comand: unknown field"),
    ("[run]\nport = 80800", "[run] port: expected an integer 1..65535"),
    ("[run]\nport = true", "[run] port: expected an integer"),
    ("[run]\nhealth = '/h'", "[run] health: a health path needs a port"),
    ("[run]\nport = 80\nhealth = 'healthz'", "[run] health: 'healthz' must be a path"),
    ("[scan]\nfail_on = 'severe'", "[scan] fail_on: expected one of none, low, medium, high, critical"),
    ("[build]\ndockerfile = '../Dockerfile'", "[build] dockerfile: '../Dockerfile' must be a path inside"),
    ("[build]\nargs = { 'A B' = 'x' }", "[build] args: 'A B' must be a valid name"),
    ("[test]\ncommand = []", "[test] command: expected a list of strings"),
    ("[test]\ncommand = [1]", "[test] command: expected a list of strings"),
    ("[scale]\nmin = 5\nmax = 2", "[scale] min: 5 is above max 2"),
    ("test = 1", "test: expected a table [test]"),
    ("[run\nport = 1", "not valid TOML"),
])
def test_errors_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse(text)
    assert str(err.value).startswith("pleaco.toml: ") and message in str(err.value)
