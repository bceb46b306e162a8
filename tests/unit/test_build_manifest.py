"""pleaco.toml parsing: every field, and errors that name the field."""

from __future__ import annotations

import pytest

from pleaco.builds.manifest import Manifest, ManifestError, parse
from pleaco.scale import AutoscalePolicy

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
                         replicas=2, scale_min=1, scale_max=10, target_concurrency=50, fail_on="high",
                         autoscale=AutoscalePolicy(1, 10, metric="concurrency", target=50.0))


def test_scale_is_an_autoscale_policy() -> None:
    m = parse('[scale]\nmin = 0\nmax = 4\nmetric = "rps"\ntarget = 300\nstable_window = 30\n'
              'panic_window = 3\nscale_to_zero_after = 600\n')
    assert m.autoscale == AutoscalePolicy(0, 4, metric="rps", target=300.0, stable_window=30.0, panic_window=3.0,
                                          scale_to_zero_after=600.0)
    assert parse("[scale]\nmax = 3\n").autoscale == AutoscalePolicy(1, 3)
    assert parse("[run]\nreplicas = 2\n").autoscale is None


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
    ("[scale]\nmin = 1", "[scale] max: missing"),
    ("[scale]\nmax = 2\nmetric = 'memory'", "[scale] metric: 'memory' is not one of"),
    ("[scale]\nmax = 2\ntarget = -1", "[scale] target: must be greater than 0"),
    ("[scale]\nmax = 2\ntarget = nan", "[scale] target: must be a finite number"),
    ("[scale]\nmin = 0\nmax = 2", "[scale] min: 0 scales the app to zero"),
    ("[scale]\nmax = 2\ntarget_concurrency = 5\ntarget = 3", "[scale] target_concurrency: give it, or"),
    ("[scale]\nmax = 2\npanic_window = 90", "[scale] panic_window: 90 s is longer"),
    ("test = 1", "test: expected a table [test]"),
    ("[run\nport = 1", "not valid TOML"),
])
def test_errors_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse(text)
    assert str(err.value).startswith("pleaco.toml: ") and message in str(err.value)
