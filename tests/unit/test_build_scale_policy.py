"""A build's release gives the app the [scale] policy of its pleaco.toml."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_build_model import _service

from pleaco.builds.manifest import parse
from pleaco.builds.service import StepFailed
from pleaco.scale import AutoscalePolicy


def test_a_release_gives_the_app_the_manifests_scale_policy(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    conn = svc.connect("web", "https://github.com/o/web.git", None, None).connection
    b = svc.push(conn, "a" * 40, delivery="d1").build
    assert b is not None
    b.image = "img-a"
    svc._release(b, parse("[scale]\nmin = 2\nmax = 5\ntarget_concurrency = 20\n"))
    assert svc.apps.autoscale("web") == AutoscalePolicy(2, 5, target=20.0)
    assert svc.apps.replicas("web") == 2  # moved into the range
    # A manifest without [scale] leaves the policy; one over the cluster's max releases nothing.
    b.image = "img-b"
    svc._release(b, parse(""))
    assert svc.apps.autoscale("web") == AutoscalePolicy(2, 5, target=20.0)
    revision = svc.apps.get("web").revision  # type: ignore[union-attr]
    b.image = "img-c"
    with pytest.raises(StepFailed, match=r"\[scale\] max: 50 is above this cluster's max_replicas \(10\)"):
        svc._release(b, parse("[scale]\nmax = 50\n"))
    assert svc.apps.get("web").revision == revision  # type: ignore[union-attr]


def test_a_release_keeps_the_limits_deploy_set(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    conn = svc.connect("web", "https://github.com/o/web.git", None, None).connection
    svc.apps.deploy("web", {"image": "img-0", "memory": "64m", "cpus": 0.5, "pids": 30, "max_conns": 8,
                            "volumes": ["data:/data"]})
    b = svc.push(conn, "a" * 40, delivery="d1").build
    assert b is not None
    b.image = "img-a"
    svc._release(b, parse(""))
    spec = svc.apps.get("web")
    assert spec is not None and spec.image == "img-a" and (spec.memory, spec.cpus, spec.pids) == (64 << 20, 0.5, 30)
    assert spec.max_conns == 8
    assert [str(m) for m in spec.volumes] == ["data:/data"]
