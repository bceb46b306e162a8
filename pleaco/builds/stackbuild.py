"""A connected repository that holds a compose file: a push deploys it as a stack.

The build pipeline (pleaco.builds.service) finds the compose file in the fetched source
(``COMPOSE_FILES``, the Compose specification's names, the first found wins), has it checked
whole before it builds anything, builds the image of every service with ``build`` from its
context directory, tests and scans each, and deploys the stack with those images. Reading
compose files and deploying stacks is pleaco.stacks' (a layer above): the agent hands the
pipeline a ``StackCheck``, which answers a ``StackRelease``.

This module holds the pipeline's side of that seam, and the source's: a service's build
context as a tarball of its own (the Docker build API takes the context as the root of a tar).
"""

from __future__ import annotations

import copy
import posixpath
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pleaco.builds.engine import Cancel

# The Compose specification's file names, in its order of preference.
COMPOSE_FILES = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")


class ContextError(ValueError):
    """A service's build context or Dockerfile is not in the commit; the message names them."""


@dataclass(frozen=True)
class ServiceBuild:
    """One service's image to build: from ``context`` (a directory of the repository, ""
    for its root) with ``dockerfile`` (relative to the context)."""

    service: str
    app: str  # STACK-SERVICE
    context: str
    dockerfile: str
    args: dict[str, str]


@dataclass(frozen=True)
class ServiceRelease:
    """What a stack release did to one service's app."""

    service: str
    app: str
    revision: int
    changed: bool  # a new release (its replicas roll); False: left as it was


class StackRelease(Protocol):
    """A repository's compose file, checked whole: what to build, and how to deploy it."""

    @property
    def builds(self) -> tuple[ServiceBuild, ...]: ...

    def deploy(self, images: dict[str, str], release_info: dict[str, Any], cancel: Cancel) -> list[ServiceRelease]:
        """Deploy the stack with the built ``images`` (by service); blocks until its waves
        are written. Raises a PleacoError naming what stood in the way, Cancelled when
        ``cancel`` stops it (between waves: those written stay)."""
        ...


# (stack, compose file name, its bytes, a reader of the commit's files by path relative to
# the compose file) -> the checked release. Raises InvalidInput (or Conflict) naming the
# file, the service and the key; nothing is written.
StackCheck = Callable[[str, str, bytes, Callable[[str], str]], StackRelease]


def read_text(tarball: Path, base: str) -> Callable[[str], str]:
    """A reader of the commit's files for a compose file in directory ``base``: a path
    relative to ``base`` that stays inside the repository, read from the tarball (never
    from the node's own files). OSError when it is not there."""

    def read(name: str) -> str:
        path = posixpath.normpath(posixpath.join(base, name))
        if name.startswith("/") or path == ".." or path.startswith("../"):
            raise OSError(f"{name!r} is not a file in the repository")
        with tarfile.open(tarball) as tar:
            try:
                member = tar.getmember(path)
            except KeyError:
                raise FileNotFoundError(f"no file {path!r} in the repository") from None
            try:
                # A symbolic link is followed within the commit only (tarfile finds its
                # target among the members, never on the node).
                f = tar.extractfile(member) if member.isfile() or member.issym() else None
            except KeyError:
                f = None
            if f is None:
                raise OSError(f"{path!r} is not a file of the repository")
            return f.read().decode()

    return read


def context_tarball(tarball: Path, build: ServiceBuild, out: Path) -> Path:
    """The build context of ``build`` as a tarball whose root is its directory: the source
    tarball itself for the repository's root, else a copy of that directory's members
    (written to ``out``). Raises ContextError when the directory or its Dockerfile is missing."""
    where = f"services.{build.service}.build"
    dockerfile = posixpath.normpath(posixpath.join(build.context, build.dockerfile))
    if dockerfile.startswith("../") or (build.context and not dockerfile.startswith(build.context + "/")):
        raise ContextError(f"{where}.dockerfile: {build.dockerfile!r} is outside the context {build.context!r}")
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
        if build.context and build.context not in names:
            raise ContextError(f"{where}.context: no directory {build.context!r} in the repository")
        if dockerfile not in names:
            raise ContextError(f"{where}.dockerfile: no file {dockerfile!r} in the repository")
        if not build.context:
            return tarball
        prefix = build.context + "/"
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w") as ctx:
            for member in tar.getmembers():
                if not member.name.startswith(prefix):
                    continue
                moved = copy.copy(member)
                moved.name = member.name[len(prefix):]
                ctx.addfile(moved, tar.extractfile(member) if member.isfile() else None)
    return out
