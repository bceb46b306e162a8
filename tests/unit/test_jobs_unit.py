"""One-off jobs' command validation (pleaco.stacks.jobs); the jobs themselves run against
the real engine in tests/integration/test_jobs.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import pytest

from pleaco.apps import validate_deploy
from pleaco.reconcile.container import release_container
from pleaco.reconcile.drain import Drain
from pleaco.reconcile.view import NodeView
from pleaco.runtime.docker import LABEL_APP, LABEL_JOB, JobSpec
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


def test_a_jobs_container_is_its_releases_replica_with_the_jobs_command() -> None:
    spec, _ = validate_deploy("db", {"image": "img", "port": 8080, "env": {"A": "1"}, "volumes": ["data:/data"],
                                     "entrypoint": ["env", "X=1"], "command": ["serve"], "memory": "64m"}, 10)
    spec = replace(spec, stack="shop")
    view = NodeView("n" * 32, cast(Any, None), Drain(0.0), cluster_network=True)
    view.network, view.resolvers, view.names_suffix = "pleaco", ("10.210.0.1",), "internal"
    replica = release_container(spec, view, 0)
    job = JobSpec.of(replica, "ab12cd34", ("migrate", "--all"))
    assert (job.command, job.entrypoint, job.port) == (("migrate", "--all"), ("env", "X=1"), None)
    for same in ("image", "env", "volumes", "network", "dns", "dns_search", "memory", "pids", "release"):
        assert getattr(job, same) == getattr(replica, same), same
    assert job.network == "pleaco" and job.dns_search == ("shop.internal",)
    # Named and labelled as a job: the app loop never takes it for a replica.
    assert job.name == f"pleaco-job-db-ab12cd34-{'n' * 12}"
    assert job.labels()[LABEL_JOB] == "ab12cd34" and LABEL_APP not in job.labels()
