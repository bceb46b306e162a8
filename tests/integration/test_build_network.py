"""What a Dockerfile's RUN steps can reach (build.network), on the real engine: TCP
listeners on every address of this host, and RUN steps that try to connect to them."""

from __future__ import annotations

import contextlib
import io
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentproc import docker_client
from hostprobe import TOKEN, Listeners, host_addresses, probe_script

from pleaco.builds.builders import BuildRequest, EngineBuilder, KanikoBuilder
from pleaco.builds.engine import BuildEngine, BuildFailed, Cancel
from pleaco.builds.network import BuildNetwork


def context(tmp_path: Path, dockerfile: str, **files: str) -> Path:
    path = tmp_path / f"ctx-{uuid.uuid4().hex[:6]}.tar"
    with tarfile.open(path, "w") as tar:
        for name, text in {"Dockerfile": dockerfile, **files}.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def engine() -> Iterator[BuildEngine]:
    engine = BuildEngine("unix:///var/run/docker.sock", 30, "test-node")
    yield engine
    engine.close()


@pytest.fixture
def network(engine: BuildEngine) -> Iterator[BuildNetwork]:
    """An isolated build network of this test's own (own bridge, own firewall chains),
    removed with its rules afterwards."""
    suffix = uuid.uuid4().hex[:8]
    net = BuildNetwork(engine, "isolated", name=f"pleaco-build-test-{suffix}", bridge=f"plb-{suffix}")
    try:
        yield net
    finally:
        net.remove()
        assert engine.network_inspect(net.name) is None
        rules = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, check=True).stdout
        assert net.bridge not in rules


@pytest.fixture
def images() -> Iterator[list[str]]:
    """Tags the test builds, removed afterwards."""
    tags: list[str] = []
    yield tags
    client = docker_client()
    for tag in tags:
        with contextlib.suppress(Exception):
            client.images.remove(tag, force=True)


def build(engine: BuildEngine, builder: EngineBuilder, tmp_path: Path, dockerfile: str,
          images: list[str]) -> tuple[str, str]:
    """Build ``dockerfile``; its image id and log."""
    tag = f"pleaco-test/buildnet-{uuid.uuid4().hex[:8]}:1"
    images.append(tag)
    req = BuildRequest(build_id="b", app="buildnet", commit="0" * 40, tarball=context(tmp_path, dockerfile),
                       dockerfile="Dockerfile", tag=tag)
    lines: list[str] = []
    image = builder.build(req, lines.append, Cancel())
    return image, "".join(lines)


def test_an_isolated_build_cannot_reach_the_hosts_services(engine: BuildEngine, network: BuildNetwork,
                                                          tmp_path: Path, images: list[str]) -> None:
    network.prepare()  # the build network's own gateway is one of this host's addresses too
    listeners = Listeners(host_addresses())
    try:
        targets = listeners.targets()

        def dockerfile(mode: str) -> str:
            # The mode in the step: the classic builder's cache does not key on the network.
            return f"FROM pleaco/busybox:latest\nRUN echo {mode} && {probe_script(targets)}\nRUN echo built > /proof\n"

        # The same probe on the engine's default bridge (the behaviour before build.network)
        # reaches the host's services: the probe and the listeners work.
        _, log = build(engine, EngineBuilder(engine, BuildNetwork(engine, "host-reachable")), tmp_path,
                       dockerfile("host-reachable"), images)
        assert TOKEN in log and "reached 172.17.0.1:" in log, log
        before = len(listeners.peers)

        image, log = build(engine, EngineBuilder(engine, network), tmp_path, dockerfile("isolated"), images)
        assert image.startswith("sha256:")
        for target in targets:
            assert f"refused {target}" in log and f"reached {target}" not in log, log
        assert TOKEN not in log, log
        assert listeners.peers[before:] == []
    finally:
        listeners.close()


def test_a_build_without_network_needs_builds_in_every_mode(engine: BuildEngine, network: BuildNetwork,
                                                            tmp_path: Path, images: list[str]) -> None:
    for net in (network, BuildNetwork(engine, "none")):
        image, log = build(engine, EngineBuilder(engine, net), tmp_path,
                           f"FROM pleaco/busybox:latest\nRUN echo {uuid.uuid4().hex} > /proof && cat /proof\n", images)
        assert image.startswith("sha256:") and "Successfully built" in log


def test_a_build_without_network_reaches_nothing(engine: BuildEngine, tmp_path: Path, images: list[str]) -> None:
    listeners = Listeners(host_addresses())
    try:
        targets = listeners.targets()
        _, log = build(engine, EngineBuilder(engine, BuildNetwork(engine, "none")), tmp_path,
                       f"FROM pleaco/busybox:latest\nRUN {probe_script(targets)}\n", images)
        for target in targets:
            assert f"refused {target}" in log, log
        assert TOKEN not in log and listeners.peers == []
    finally:
        listeners.close()


def test_kaniko_runs_on_the_isolated_network(engine: BuildEngine, network: BuildNetwork, tmp_path: Path,
                                             images: list[str]) -> None:
    """Kaniko runs RUN steps inside its own container, so that container is what must be
    isolated. No kaniko image can be fetched here: an executor stand-in (busybox, whose
    entrypoint probes the host and exits 1) shows the network the backend gives it."""
    network.prepare()
    listeners = Listeners(host_addresses())
    try:
        executor = f"pleaco-test/probe-executor-{uuid.uuid4().hex[:8]}:1"
        images.append(executor)
        ctx = context(tmp_path, 'FROM pleaco/busybox:latest\nCOPY probe.sh /\nENTRYPOINT ["sh", "/probe.sh"]\n',
                      **{"probe.sh": probe_script(listeners.targets()) + "\nexit 1\n"})
        with open(ctx, "rb") as f:
            docker_client().images.build(fileobj=f, custom_context=True, tag=executor, rm=True)
        req = BuildRequest(build_id="k", app="buildnet", commit="0" * 40,
                           tarball=context(tmp_path, "FROM pleaco/busybox:latest\n"), dockerfile="Dockerfile",
                           tag=f"pleaco-test/kaniko-{uuid.uuid4().hex[:8]}:1", work_dir=tmp_path / "work",
                           run_labels=engine.labels("k", "kaniko"))
        lines: list[str] = []
        with pytest.raises(BuildFailed, match="kaniko exited with 1"):
            KanikoBuilder(engine, executor, 60, network).build(req, lines.append, Cancel())
        log = "".join(lines)
        for target in listeners.targets():
            assert f"refused {target}" in log, log
        assert TOKEN not in log and listeners.peers == []
    finally:
        listeners.close()
        engine.remove_leftovers({"k"})


def test_a_foreign_network_of_that_name_is_refused(engine: BuildEngine, network: BuildNetwork) -> None:
    """A network named like the build network but not made by pleaco (ICC on, no rules) is
    not used: the build fails naming it."""
    docker_client().networks.create(network.name, driver="bridge")
    with pytest.raises(BuildFailed, match=f"network '{network.name}' is not the isolated bridge pleaco makes"):
        network.prepare()
