"""Builders: turn a source tarball into an image in the local engine.

Two backends behind one interface:

- ``engine`` (the default): Docker Engine's build API with the tarball as the context. It
  works offline on local base images, and its layer cache is kept per app by building with
  ``cache_from`` the app's previous image.
- ``kaniko``: the kaniko executor (a maintained fork: upstream GoogleContainerTools/kaniko
  was archived in June 2025; the image is ``kaniko_image`` in the config) runs as a
  container with the context and an output directory mounted, writes an image tarball
  (``--no-push --tar-path``), and the tarball is loaded into the engine. Kaniko resolves
  base images from a registry itself, so it needs one reachable (or a mirror).

Both run the Dockerfile's RUN steps on the network ``build.network`` names (see
``pleaco.builds.network``): by default one that reaches the internet's package registries
but not the host's own services nor private networks. The engine backend passes it as the
build's ``network_mode``; kaniko runs RUN steps inside its own container, so that container
is put on it.
"""

from __future__ import annotations

import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from pleaco.builds.config import BuildConfig
from pleaco.builds.engine import BuildEngine, BuildFailed, Cancel, LogFn
from pleaco.builds.network import BuildNetwork


@dataclass(frozen=True)
class BuildRequest:
    build_id: str
    app: str
    commit: str
    tarball: Path
    dockerfile: str
    tag: str  # repository:tag the image gets
    build_args: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # the image's
    run_labels: dict[str, str] = field(default_factory=dict)  # a builder container's
    cache_from: list[str] = field(default_factory=list)
    work_dir: Path | None = None  # scratch space for backends that need files


class EngineBuilder:
    name = "engine"

    def __init__(self, engine: BuildEngine, network: BuildNetwork | None = None) -> None:
        self.engine = engine
        self.network = network or BuildNetwork(engine)

    def build(self, req: BuildRequest, log: LogFn, cancel: Cancel) -> str:
        network_mode = self.network.prepare()
        with open(req.tarball, "rb") as context:
            image = self.engine.build(
                context, tag=req.tag, dockerfile=req.dockerfile, build_args=req.build_args,
                labels=req.labels, cache_from=req.cache_from, log=log, cancel=cancel, network_mode=network_mode,
            )
        if not image:
            raise BuildFailed("the engine reported no image id")
        return image


class KanikoBuilder:
    name = "kaniko"

    def __init__(self, engine: BuildEngine, image: str, time_limit: float, network: BuildNetwork | None = None) -> None:
        self.engine = engine
        self.image = image
        self.time_limit = time_limit
        self.network = network or BuildNetwork(engine)

    def available(self) -> bool:
        return self.engine.image_id(self.image) is not None

    def build(self, req: BuildRequest, log: LogFn, cancel: Cancel) -> str:
        if not self.available():
            raise BuildFailed(f"kaniko executor image {self.image!r} is not present on this node")
        if req.work_dir is None:
            raise BuildFailed("kaniko needs a work directory")
        work = req.work_dir
        shutil.rmtree(work, ignore_errors=True)
        (work / "context").mkdir(parents=True)
        (work / "out").mkdir()
        with tarfile.open(req.tarball) as tar:
            tar.extractall(work / "context", filter="data")
        args = ["--context=dir:///workspace", f"--dockerfile=/workspace/{req.dockerfile}", "--no-push",
                f"--destination={req.tag}", "--tar-path=/out/image.tar", "--cache=false"]
        args += [f"--build-arg={k}={v}" for k, v in sorted(req.build_args.items())]
        args += [f"--label={k}={v}" for k, v in sorted(req.labels.items())]
        network_mode = self.network.prepare()
        result = self.engine.run_to_completion(
            self.image, args, labels=req.run_labels, time_limit=self.time_limit, cancel=cancel,
            network_mode=network_mode, binds=[f"{work / 'context'}:/workspace:ro", f"{work / 'out'}:/out"], log=log,
        )
        if result.timed_out or result.exit_code != 0:
            raise BuildFailed(f"kaniko exited with {result.exit_code}" if not result.timed_out else "kaniko timed out")
        with open(work / "out" / "image.tar", "rb") as f:
            self.engine.load(f)
        image = self.engine.image_id(req.tag)
        shutil.rmtree(work, ignore_errors=True)
        if image is None:
            raise BuildFailed(f"kaniko's image tarball did not hold {req.tag}")
        return image


def builder_for(cfg: BuildConfig, engine: BuildEngine) -> EngineBuilder | KanikoBuilder:
    """The backend ``build.backend`` names, on the network ``build.network`` names."""
    network = BuildNetwork(engine, cfg.network, cfg.network_allow)
    if cfg.backend == "kaniko":
        return KanikoBuilder(engine, cfg.kaniko_image, cfg.timeout, network)
    return EngineBuilder(engine, network)
