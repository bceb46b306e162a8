"""The load loop's report: traffic, replicas, their CPU and memory from cgroup files (v1
and v2 layouts in a temporary tree), and an app that goes quiet reported once with zeros."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pleaco.cluster.load import LoadView
from pleaco.cluster.messages import AppLoadEntry
from pleaco.config import ConfigError, load
from pleaco.ingress.load import LoadReporter
from pleaco.ingress.traffic import TrafficStats
from pleaco.metrics import Registry
from pleaco.runtime.docker import ContainerInfo
from pleaco.runtime.usage import CgroupUsage

ME = "0123456789abcdef0123456789abcdef"


def container(cid: str, app: str, state: str = "running") -> ContainerInfo:
    return ContainerInfo(id=cid, name=cid, app=app, node=ME, release=1, replica=0, state=state, exit_code=None,
                         image="img", host_port=None, created=0)


def cgroup_v1(root: Path, cid: str, cpu_ns: int, usage: int, inactive: int) -> None:
    cpu, mem = root / "cpuacct" / "docker" / cid, root / "memory" / "docker" / cid
    cpu.mkdir(parents=True, exist_ok=True)
    mem.mkdir(parents=True, exist_ok=True)
    (cpu / "cpuacct.usage").write_text(f"{cpu_ns}\n")
    (mem / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (mem / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {inactive}\n")


def cgroup_v2(root: Path, cid: str, cpu_us: int, current: int, inactive: int) -> None:
    d = root / "system.slice" / f"docker-{cid}.scope"
    d.mkdir(parents=True, exist_ok=True)
    (d / "cpu.stat").write_text(f"usage_usec {cpu_us}\nuser_usec 1\n")
    (d / "memory.current").write_text(f"{current}\n")
    (d / "memory.stat").write_text(f"anon 1\ninactive_file {inactive}\n")


def test_cgroup_files_give_cpu_seconds_and_memory_without_inactive_cache(tmp_path: Path) -> None:
    cgroup_v1(tmp_path, "a", 2_500_000_000, 100 << 20, 20 << 20)
    cgroup_v2(tmp_path, "b", 1_500_000, 50 << 20, 10 << 20)
    usage = CgroupUsage(tmp_path)
    a, b = usage.read("a"), usage.read("b")
    assert a is not None and a.cpu_seconds == 2.5 and a.memory == 80 << 20
    assert b is not None and b.cpu_seconds == 1.5 and b.memory == 40 << 20
    assert usage.read("gone") is None


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_the_report_has_traffic_replicas_and_their_usage_and_a_quiet_app_once_more(tmp_path: Path) -> None:
    clock = Clock()
    registry = Registry()
    traffic = TrafficStats(registry, clock=clock)
    traffic.set_hosts({"web.test": "web", "api.test": "api"})
    containers = [container("w1", "web"), container("w2", "web"), container("x", "web", "exited")]
    view: Any = SimpleNamespace(observed=SimpleNamespace(containers=containers))
    sent: list[list[AppLoadEntry]] = []
    loads = LoadView(ME, 10.0)
    reporter = LoadReporter(2.0, view, traffic, sent.append, loads, registry, usage=CgroupUsage(tmp_path),
                            clock=clock)
    cgroup_v1(tmp_path, "w1", 1_000_000_000, 30 << 20, 0)
    cgroup_v1(tmp_path, "w2", 3_000_000_000, 10 << 20, 0)
    reporter.replicas = reporter.sample_replicas([c for c in containers if c.running])
    traffic.feed_lines([b'{"request":{"host":"web.test"},"duration":0.01,"status":200}'] * 8
                       + [b'{"request":{"host":"api.test"},"duration":0.5,"status":200}'])
    clock.now += 1.0
    cgroup_v1(tmp_path, "w1", 1_500_000_000, 30 << 20, 0)  # 0.5 s of CPU in 1 s: half a core
    cgroup_v1(tmp_path, "w2", 3_000_000_000, 12 << 20, 0)
    reporter.replicas = reporter.sample_replicas([c for c in containers if c.running])
    first = {e.app: e for e in reporter.entries()}
    assert set(first) == {"web", "api"}
    web = first["web"]
    assert web.replicas == 2 and web.cpu == pytest.approx(0.5) and web.memory == 42 << 20
    assert web.rps == 4.0 and web.concurrency == pytest.approx(8 * 0.01 / 2) and web.p50 is not None
    assert first["api"].replicas == 0
    # Traffic gone and api has no replica here: reported once more, with zeros, then not.
    clock.now += 20.0
    second = {e.app: e for e in reporter.entries()}
    assert second["api"].rps == 0 and second["api"].p99 is None and second["web"].replicas == 2
    third = {e.app for e in reporter.entries()}
    assert third == {"web"}
    text = registry.render()
    assert 'pleaco_replica_cpu_cores{app="web",container="w1"} 0.5' in text
    assert 'pleaco_replica_memory_bytes{app="web",container="w2"} 12582912' in text


def test_reports_come_faster_while_some_app_is_autoscaled(tmp_path: Path) -> None:
    autoscaled = {"on": False}
    view: Any = SimpleNamespace(observed=SimpleNamespace(containers=[]))
    reporter = LoadReporter(2.0, view, None, lambda entries: None, LoadView(ME, 10.0), Registry(),
                            usage=CgroupUsage(tmp_path), autoscaled=lambda: autoscaled["on"], autoscale_interval=1.0)
    assert reporter.next_wait() == 2.0
    autoscaled["on"] = True
    assert reporter.next_wait() == 1.0
    # Never slower than the load interval, whatever the setting.
    slow = LoadReporter(2.0, view, None, lambda entries: None, LoadView(ME, 10.0), Registry(),
                        usage=CgroupUsage(tmp_path), autoscaled=lambda: True, autoscale_interval=5.0)
    assert slow.next_wait() == 2.0


def test_the_autoscale_load_interval_is_validated() -> None:
    assert load(env={"PLEACO_PROXY_AUTOSCALE_LOAD_INTERVAL": "0.5"}).proxy.autoscale_load_interval == 0.5
    with pytest.raises(ConfigError, match=r"proxy\.autoscale_load_interval: must be greater than 0"):
        load(env={"PLEACO_PROXY_AUTOSCALE_LOAD_INTERVAL": "0"})
