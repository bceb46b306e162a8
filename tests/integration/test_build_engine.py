"""The kaniko backend (needs its executor image on this node: nothing can be pulled here), and
images moving as save/load streams."""

from __future__ import annotations

import contextlib
import io
import tarfile
import uuid
from pathlib import Path

import pytest
from agentproc import docker_client

from pleaco.builds.builders import BuildRequest, KanikoBuilder
from pleaco.builds.config import BuildConfig
from pleaco.builds.engine import BuildEngine, BuildFailed, Cancel

KANIKO = BuildConfig().kaniko_image


def _has_kaniko() -> bool:
    try:
        docker_client().images.get(KANIKO)
    except Exception:
        return False
    return True


def _context(tmp_path: Path) -> Path:
    path = tmp_path / "ctx.tar"
    with tarfile.open(path, "w") as tar:
        data = b"FROM pleaco/busybox:latest\nRUN echo built-by-kaniko > /proof\n"
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_kaniko_without_its_image_fails_clearly(tmp_path: Path) -> None:
    engine = BuildEngine("unix:///var/run/docker.sock", 30, "test-node")
    builder = KanikoBuilder(engine, "pleaco-test/no-such-kaniko:none", 60)
    assert not builder.available()
    req = BuildRequest(build_id="x", app="x", commit="0" * 40, tarball=_context(tmp_path), dockerfile="Dockerfile",
                       tag="pleaco-test/kaniko-x:1", work_dir=tmp_path / "work")
    with pytest.raises(BuildFailed, match="kaniko executor image 'pleaco-test/no-such-kaniko:none' is not present"):
        builder.build(req, lambda _: None, Cancel())
    engine.close()


@pytest.mark.skipif(not _has_kaniko(), reason=f"kaniko executor image {KANIKO} is not present locally "
                    "(no registry is reachable here; load it with `docker load` to run this test)")
def test_kaniko_builds_an_image(tmp_path: Path) -> None:
    engine = BuildEngine("unix:///var/run/docker.sock", 30, "test-node")
    tag = f"pleaco-test/kaniko-{uuid.uuid4().hex[:8]}:1"
    try:
        req = BuildRequest(build_id="k", app="k", commit="0" * 40, tarball=_context(tmp_path),
                           dockerfile="Dockerfile", tag=tag, work_dir=tmp_path / "work")
        lines: list[str] = []
        image = KanikoBuilder(engine, KANIKO, 300).build(req, lines.append, Cancel())
        assert image.startswith("sha256:") and lines
    finally:
        docker_client().images.remove(tag, force=True) if engine.image_id(tag) else None
        engine.close()


def test_an_image_travels_as_a_save_stream_and_loads_back() -> None:
    """What a node without an image gets from the node that built it: ``docker save``
    streamed into ``docker load``, the image id unchanged."""
    engine = BuildEngine("unix:///var/run/docker.sock", 30, "test-node")
    client = docker_client()
    tag = f"pleaco-test/travel-{uuid.uuid4().hex[:8]}:1"
    try:
        client.images.get("pleaco/busybox:latest").tag(tag)
        original = engine.image_id(tag)
        stream = b"".join(engine.save(tag))
        client.images.remove(tag)
        assert engine.image_id(tag) is None
        loaded = engine.load(io.BytesIO(stream))
        assert loaded == [tag] and engine.image_id(tag) == original
    finally:
        with contextlib.suppress(Exception):
            client.images.remove(tag, force=True)
        engine.close()
